"""Transport throughput: typed small messages per second and tensor frames in GB/s through our
`Channel` (codec + zmq.asyncio socket), next to raw pyzmq sending the same bytes in the same run.

    .venv/bin/python benchmarks/bench_transport.py [--repeats 5] [--transports ipc,tcp]

Sender (this process) and receiver (a spawned process) are separate OS processes, each running
one uvloop event loop, connected by one PUSH -> PULL pair per transport with the runtime's
default HWM (64). "Raw pyzmq" uses the very same two sockets (so the same type, HWM and
options) and skips only our layer: the sender sends frames encoded once up front, the receiver
gets `recv_multipart()` (small messages: copy=True, tensors: copy=False, pyzmq's fastest
choices) and does not decode. tcp is loopback without CURVE (CURVE costs the same on both
sides). Each cell is the median of `--repeats` runs, ours and raw interleaved; the receiver
times from the first to the last message of a run. Prints a table and writes
benchmarks/results/bench_transport.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import zmq
import zmq.asyncio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from respec_async.endpoints import free_tcp_port  # noqa: E402
from transport.channels import Kind, open_channel  # noqa: E402
from transport.codec import Codec  # noqa: E402
from transport.schema import Pong, TensorMessage  # noqa: E402
from transport.security import Security  # noqa: E402

HWM = 64  # TransportSection.hwm's default
MB = 1 << 20
RESULTS = Path(__file__).resolve().parent / "results" / "bench_transport.json"


@dataclass(frozen=True)
class Case:
    name: str
    tensor_bytes: int  # 0: a small typed message (Pong)
    num_messages: int
    target_ratio: float  # ours / raw must be at least this

    @property
    def unit(self) -> str:
        return "msg/s" if self.tensor_bytes == 0 else "GB/s"

    def message(self, seq: int):
        if self.tensor_bytes == 0:
            return Pong(seq=seq, role="generator-0", state="running", mailbox_size=3, num_handled=seq)
        return TensorMessage(seq=seq, names=["t"], tensors=[self.tensor])

    @property
    def tensor(self) -> torch.Tensor:
        t = _TENSORS.get(self.tensor_bytes)
        if t is None:
            t = _TENSORS[self.tensor_bytes] = torch.rand(self.tensor_bytes // 4)
        return t


_TENSORS: dict[int, torch.Tensor] = {}

CASES = [
    Case("Pong (small typed)", 0, 20_000, 0.5),
    Case("tensor 1 MB", 1 * MB, 400, 0.8),
    Case("tensor 64 MB", 64 * MB, 12, 0.8),
]


def receiver_main(endpoint: str, conn) -> None:
    """The receiving process: for each command (mode, case index), receive n+1 messages and
    report seconds from the first to the last."""
    import uvloop

    async def serve() -> None:
        ctx = zmq.asyncio.Context()
        pull = open_channel(ctx, Kind.PULL, endpoint, bind=True, security=Security(insecure=True), hwm=HWM)
        loop = asyncio.get_running_loop()
        conn.send("bound")
        while True:
            command = await loop.run_in_executor(None, conn.recv)
            if command is None:
                break
            mode, index = command
            case = CASES[index]
            n = case.num_messages
            if mode == "ours":
                await pull.recv()
                started = time.perf_counter()
                for _ in range(n):
                    await pull.recv()
            else:
                copy = case.tensor_bytes == 0
                await pull.socket.recv_multipart(copy=copy)
                started = time.perf_counter()
                for _ in range(n):
                    await pull.socket.recv_multipart(copy=copy)
            conn.send(time.perf_counter() - started)
        pull.close()
        ctx.destroy(linger=0)

    uvloop.run(serve())


async def run_once(push, conn, mode: str, index: int) -> float:
    """Send one run's messages; returns the receiver's rate (msg/s or GB/s)."""
    case = CASES[index]
    conn.send((mode, index))
    n = case.num_messages
    if mode == "ours":
        for seq in range(n + 1):
            await push.send(case.message(seq))
    else:
        frames = Codec().encode(case.message(0))  # the same bytes, encoded once
        copy = case.tensor_bytes == 0
        for _ in range(n + 1):
            await push.socket.send_multipart(frames, copy=copy)
    seconds = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
    if case.tensor_bytes == 0:
        return n / seconds
    return n * case.tensor_bytes / seconds / 1e9


async def bench_transport(transport: str, repeats: int, cases: list[int]) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="respec-bench-") as tmp:
        endpoint = f"ipc://{tmp}/bench.sock" if transport == "ipc" else f"tcp://127.0.0.1:{free_tcp_port('127.0.0.1')}"
        parent, child = mp.get_context("spawn").Pipe()
        proc = mp.get_context("spawn").Process(target=receiver_main, args=(endpoint, child), daemon=True)
        proc.start()
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, parent.recv) == "bound"
        ctx = zmq.asyncio.Context()
        push = open_channel(ctx, Kind.PUSH, endpoint, bind=False, security=Security(insecure=True), hwm=HWM)
        rows = []
        try:
            for index in cases:
                case = CASES[index]
                await run_once(push, parent, "raw", index)  # warm-up: connection, page faults
                samples: dict[str, list[float]] = {"ours": [], "raw": []}
                for r in range(repeats):
                    for mode in (("ours", "raw") if r % 2 == 0 else ("raw", "ours")):
                        samples[mode].append(await run_once(push, parent, mode, index))
                ours, raw = statistics.median(samples["ours"]), statistics.median(samples["raw"])
                rows.append({
                    "case": case.name, "transport": transport, "unit": case.unit,
                    "ours": ours, "raw_pyzmq": raw, "ratio": ours / raw, "target": case.target_ratio,
                    "pass": ours / raw >= case.target_ratio, "num_messages": case.num_messages,
                    "samples": samples,
                })
                print(f"  {transport} {case.name}: ours {ours:,.2f} raw {raw:,.2f} {case.unit}", file=sys.stderr)
        finally:
            parent.send(None)
            proc.join(10)
            push.close()
            ctx.destroy(linger=0)
        return rows


def format_table(rows: list[dict]) -> str:
    header = ["case", "transport", "ours", "raw pyzmq", "ratio", "target", "pass"]
    lines = [header]
    for r in rows:
        fmt = (lambda v: f"{v:,.0f} msg/s") if r["unit"] == "msg/s" else (lambda v: f"{v:.2f} GB/s")
        lines.append([r["case"], r["transport"], fmt(r["ours"]), fmt(r["raw_pyzmq"]), f"{r['ratio']:.2f}",
                      f">= {r['target']:.2f}", "yes" if r["pass"] else "NO"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--transports", default="ipc,tcp")
    parser.add_argument("--cases", default=",".join(str(i) for i in range(len(CASES))),
                        help="indices into CASES: 0 Pong, 1 tensor 1 MB, 2 tensor 64 MB")
    args = parser.parse_args()
    import uvloop

    cases = [int(i) for i in args.cases.split(",")]
    started = time.perf_counter()
    rows: list[dict] = []
    for transport in args.transports.split(","):
        rows += uvloop.run(bench_transport(transport, args.repeats, cases))
    table = format_table(rows)
    print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "command": " ".join(["benchmarks/bench_transport.py", *sys.argv[1:]]),
        "repeats": args.repeats, "hwm": HWM, "seconds": round(time.perf_counter() - started, 1),
        "python": platform.python_version(), "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
        "torch": torch.__version__, "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS}")
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
