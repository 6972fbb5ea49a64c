"""Weight broadcast throughput: the actor's weights from one source to 1, 2, 3 receivers over
real gloo groups (separate processes), next to a plain memory copy of the same bytes in the
same run.

    .venv/bin/python benchmarks/bench_weight_sync.py [--sizes-mb 4,64,256] [--repeats 3]

Prints a table and writes benchmarks/results/bench_weight_sync.json. A state dict of the given
size is made of float32 matrices (like a model's); GB/s counts the payload bytes once per
broadcast (not once per receiver).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from respec_async.endpoints import free_tcp_port  # noqa: E402
from transport.weights import WeightGroup, host_rendezvous_store, manifest_of, weights_checksum  # noqa: E402


def synthetic_state(num_bytes: int) -> dict[str, torch.Tensor]:
    rows = 1024
    per = rows * 1024 * 4  # 4 MiB float32 matrices
    state = {}
    for i in range(max(1, num_bytes // per)):
        state[f"layers.{i}.weight"] = torch.randn(rows, 1024)
    return state


def member(rendezvous: str, me: str, members: list[str], size: int, repeats: int, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    state = synthetic_state(size)
    group = WeightGroup(rendezvous, name="bench", timeout_s=120)
    group.form(0, members, me)
    times = []
    for version in range(repeats + 1):  # the first is a warm-up
        if group.rank == 0:
            stats = group.broadcast(state, version)
        else:
            staged, stats = group.receive(manifest_of(state), version)
        if version:
            times.append(stats.seconds)
    if group.rank != 0:
        out.put(("checksum", me, weights_checksum(staged)))
    else:
        out.put(("checksum", me, weights_checksum(state)))
        out.put(("times", me, times))


def memcpy_seconds(state: dict[str, torch.Tensor], repeats: int) -> float:
    flat = torch.cat([t.reshape(-1) for t in state.values()])
    dst = torch.empty_like(flat)
    dst.copy_(flat)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        dst.copy_(flat)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run_case(size: int, num_receivers: int, repeats: int) -> dict:
    rendezvous = f"tcp://127.0.0.1:{free_tcp_port('127.0.0.1')}"
    store = host_rendezvous_store(rendezvous)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    members = ["trainer-0"] + [f"generator-{i}" for i in range(num_receivers)]
    procs = [ctx.Process(target=member, args=(rendezvous, m, members, size, repeats, out)) for m in members]
    for p in procs:
        p.start()
    checksums, times = {}, []
    for _ in range(len(members) + 1):
        kind, who, value = out.get(timeout=600)
        if kind == "checksum":
            checksums[who] = value
        else:
            times = value
    for p in procs:
        p.join()
    del store
    state = synthetic_state(size)
    num_bytes = sum(t.numel() * 4 for t in state.values())
    seconds = statistics.median(times)
    copy_s = memcpy_seconds(state, repeats)
    return {
        "payload_mb": num_bytes / 2**20, "receivers": num_receivers, "broadcast_s": seconds,
        "broadcast_gb_s": num_bytes / seconds / 1e9, "memcpy_s": copy_s, "memcpy_gb_s": num_bytes / copy_s / 1e9,
        "identical": len(set(checksums.values())) == 1 and len(checksums) == len(members),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", default="4,64,256")
    parser.add_argument("--receivers", default="1,2,3")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_weight_sync.json"))
    args = parser.parse_args()
    rows = []
    for size_mb in (int(s) for s in args.sizes_mb.split(",")):
        for n in (int(r) for r in args.receivers.split(",")):
            rows.append(run_case(size_mb << 20, n, args.repeats))
            r = rows[-1]
            print(f"  {r['payload_mb']:.0f} MiB -> {n} receiver(s): {r['broadcast_s'] * 1000:.1f} ms", flush=True)
    header = f"{'payload':>9} {'receivers':>9} {'broadcast ms':>13} {'GB/s':>7} {'memcpy ms':>10} {'memcpy GB/s':>12} " \
             f"{'bcast/memcpy':>13} {'bit-identical':>14}"
    print(header)
    for r in rows:
        print(f"{r['payload_mb']:>7.0f}Mi {r['receivers']:>9} {r['broadcast_s'] * 1e3:>13.1f} {r['broadcast_gb_s']:>7.2f} "
              f"{r['memcpy_s'] * 1e3:>10.1f} {r['memcpy_gb_s']:>12.2f} {r['broadcast_gb_s'] / r['memcpy_gb_s']:>13.3f} "
              f"{str(r['identical']):>14}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "backend": "gloo", "cpu_threads": torch.get_num_threads()}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
