"""Reward throughput: rollouts scored per second through each reward source, with a trivial
reward, at 1, 8 and 64 requests in flight.

    .venv/bin/python benchmarks/bench_reward.py [--seconds 2] [--in-flight 1,8,64] [--group-size 8]

Sources: `builtin` (the arithmetic rule reward, inline), `python` (a sync function per rollout,
in the thread pool), `python batched` (one call per group), `http batch` (OpenRLHF schema, one
POST per group), `http sample` (one POST per rollout), `zmq` (`respec reward-serve` with the
batched function, one RewardRequest per group). The servers are separate processes on this
host (an aiohttp server started by this script; `respec reward-serve` over ipc). The client is
the scorer the reward role uses (`make_scorer`), driven by as many concurrent groups as
requests are allowed in flight (`reward.max_concurrency` = N, and `num_workers` = N for the
thread pool). Each cell scores groups of `--group-size` rollouts for `--seconds` after a short
warm-up. The last column is the busy share a reward role would have at 64 rollouts/s (the
tiny demo's order) with that source: 64 / the slowest of its throughputs. Prints a table and
writes benchmarks/results/bench_reward.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from respec_async.config import RewardSection  # noqa: E402
from respec_async.endpoints import free_tcp_port  # noqa: E402
from respec_async.rewards import ScoreRequest, make_scorer  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "bench_reward.json"
DEMO_ROLLOUTS_PER_S = 64.0


def trivial_reward(data_source, solution_str, ground_truth, extra_info=None):
    return float(solution_str.strip() == ground_truth)


def trivial_reward_batched(data_sources, solution_strs, ground_truths, extra_infos):
    return [float(s.strip() == g) for s, g in zip(solution_strs, ground_truths)]


def serve_http(port: int) -> None:
    """An aiohttp reward server with the trivial reward: /batch (OpenRLHF) and /sample."""
    from aiohttp import web

    async def batch(request: web.Request) -> web.Response:
        body = await request.json()
        responses = [q[len(p):] for q, p in zip(body["query"], body["prompts"])]
        return web.json_response({"rewards": [float(r.strip() == a) for r, a in zip(responses, body["labels"])]})

    async def sample(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"reward": float(body["response"].strip() == body["label"])})

    app = web.Application()
    app.router.add_post("/batch", batch)
    app.router.add_post("/sample", sample)
    print("ready", flush=True)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def wait_ready(proc: subprocess.Popen[str], marker: str) -> None:
    while True:
        line = proc.stdout.readline()
        if line.startswith(marker):
            return
        if not line and proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}")


def requests_for(group: int, group_size: int) -> list[ScoreRequest]:
    # Arithmetic prompts so that the builtin rule reward has something to parse.
    return [ScoreRequest(rollout_id=f"{group}:0:{i}", prompt_text="12+34=",
                         completion_text="2+4=6 1+3=4 answer 46" if i % 2 == 0 else "answer 45",
                         answer="46", data_source="arithmetic") for i in range(group_size)]


async def measure(cfg: RewardSection, in_flight: int, group_size: int, seconds: float) -> dict:
    scorer = make_scorer(cfg)
    await scorer.score(requests_for(0, group_size))  # connections, thread pool, first imports
    warmup_s = min(0.5, seconds / 4)
    counts = {"rollouts": 0, "errors": 0}
    started = time.perf_counter()
    measure_from = started + warmup_s
    deadline = measure_from + seconds

    async def worker(w: int) -> None:
        group = w
        while time.perf_counter() < deadline:
            results = await scorer.score(requests_for(group, group_size))
            group += in_flight
            if time.perf_counter() >= measure_from:
                counts["rollouts"] += len(results)
                counts["errors"] += sum(bool(r.error) for r in results)

    try:
        await asyncio.gather(*(worker(w) for w in range(in_flight)))
    finally:
        await scorer.close()
    elapsed = time.perf_counter() - measure_from
    rate = counts["rollouts"] / elapsed
    return {"rollouts_per_s": rate, "rollouts": counts["rollouts"], "errors": counts["errors"], "seconds": elapsed,
            "demo_busy_share": DEMO_ROLLOUTS_PER_S / rate if rate else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="measured seconds per cell")
    parser.add_argument("--in-flight", default="1,8,64")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--serve-http", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_http:
        serve_http(args.serve_http)
        return 0
    levels = [int(x) for x in args.in_flight.split(",")]
    http_port = free_tcp_port("127.0.0.1")
    sock = Path(tempfile.mkdtemp(prefix="respec-bench-")) / "reward.sock"
    me = str(Path(__file__).resolve())
    http = subprocess.Popen([sys.executable, me, "--serve-http", str(http_port)], stdout=subprocess.PIPE, text=True)
    zmq_server = subprocess.Popen(
        [sys.executable, "-m", "respec_async.cli", "reward-serve", f"{me}:trivial_reward_batched", "--batched",
         "--bind", f"ipc://{sock}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    try:
        wait_ready(http, "ready")
        wait_ready(zmq_server, "reward-serve ready")
        sources = {
            "builtin": dict(source="builtin"),
            "python": dict(source=f"python:{me}:trivial_reward"),
            "python batched": dict(source=f"python:{me}:trivial_reward_batched", batched=True),
            "http batch": dict(source=f"http://127.0.0.1:{http_port}/batch", http_format="batch"),
            "http sample": dict(source=f"http://127.0.0.1:{http_port}/sample", http_format="sample"),
            "zmq": dict(source=f"zmq://ipc://{sock}"),
        }
        cells = []
        for name, fields in sources.items():
            for n in levels:
                cfg = RewardSection(**fields, max_concurrency=n, num_workers=n, timeout_s=10.0)
                cell = asyncio.run(measure(cfg, n, args.group_size, args.seconds))
                cells.append({"source": name, "in_flight": n, **cell})
                print(f"  {name} @ {n}: {cell['rollouts_per_s']:,.0f} rollouts/s", file=sys.stderr)
    finally:
        for proc in (http, zmq_server):
            proc.terminate()
            proc.wait(timeout=10)

    columns = ["source"] + [f"{n} in flight" for n in levels] + ["busy share at 64 rollouts/s"]
    rows = []
    for name in sources:
        row = [c for c in cells if c["source"] == name]
        slowest = min(c["rollouts_per_s"] for c in row)  # conservative: the worst level
        rows.append([name] + [f"{c['rollouts_per_s']:,.0f}" for c in row] + [f"{DEMO_ROLLOUTS_PER_S / slowest:.2%}"])
    widths = [max(len(r[i]) for r in [columns, *rows]) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(r[0].ljust(widths[0]) if i == 0 else r[i].rjust(widths[i]) for i in range(len(r)))
              + " |" for r in rows]
    table = "\n".join(lines)
    print(f"rollouts scored per second (groups of {args.group_size}, trivial reward, {args.seconds:g} s per cell)")
    print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "group_size": args.group_size, "seconds_per_cell": args.seconds,
        "demo_rollouts_per_s": DEMO_ROLLOUTS_PER_S, "cells": cells,
    }, indent=1))
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
