"""Overlap of rollout and training: the same RL workload with max_staleness k = 0, 1, 2.

    .venv/bin/python benchmarks/bench_async.py [--steps 12] [--config configs/tiny.toml]

Each k is a full `respec launch` (supervisor, generator, reward, trainer as processes), same
seed, same prompts, same batch. Reported per k: median wall time per step (steady state: the
first two steps are excluded), the share of wall time the trainer sat waiting for rollouts,
and the share the generator sat idle (no prompts admitted, i.e. blocked by admission control).
Target: k = 1 step time <= 0.75x of k = 0. Writes benchmarks/results/bench_async.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from respec_async.metrics import read_metrics  # noqa: E402


def last_event(path: Path, name: str) -> dict | None:
    found = None
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") == name:
            found = event
    return found


def run_k(config: Path, k: int, steps: int, extra: list[str], root: Path) -> dict:
    overrides = [f"trainer.max_staleness={k}", f"trainer.num_steps={steps}", f"run.root=\"{root}\"",
                 f"run.name=\"async-k{k}\"", "trainer.checkpoint_every=0", "run.final_eval=false", "supervisor.live_status=false", *extra]
    args = [sys.executable, "-m", "respec_async.cli", "launch", str(config)]
    for o in overrides:
        args += ["--set", o]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"k={k} run failed:\n{proc.stderr[-3000:]}")
    run_dir = max(root.glob(f"async-k{k}-*"))
    records = read_metrics(run_dir / "metrics.jsonl")
    times = [r.time for r in records]
    step_s = [b - a for a, b in zip(times, times[1:])][2:]
    wall = times[-1] - times[2]
    trainer_wait = sum(r.wait_s for r in records[3:])
    util = last_event(run_dir / "logs" / "generator-0.jsonl", "generator.utilization") or {}
    busy, idle = util.get("busy_s", 0.0), util.get("idle_s", 0.0)
    return {
        "k": k, "steps": len(records), "step_s_median": statistics.median(step_s), "step_s_mean": statistics.mean(step_s),
        "trainer_idle_share": trainer_wait / wall, "generator_idle_share": idle / max(busy + idle, 1e-9),
        "train_s_mean": statistics.mean(r.train_s for r in records[2:]),
        "staleness_max": max(r.staleness_max for r in records), "reward_last": records[-1].reward_mean,
        "run_dir": str(run_dir),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.toml")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--ks", default="0,1,2")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_async.json")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-async-"))
    rows = []
    for k in (int(x) for x in args.ks.split(",")):
        print(f"running k={k} ...", flush=True)
        rows.append(run_k(args.config, k, args.steps, args.overrides, root))
    base = rows[0]["step_s_median"]
    print(f"{'k':>2} {'step s (median)':>16} {'vs k=0':>7} {'trainer idle':>13} {'generator idle':>15} "
          f"{'train s':>8} {'max stale':>10}")
    for r in rows:
        r["vs_k0"] = r["step_s_median"] / base
        print(f"{r['k']:>2} {r['step_s_median']:>16.2f} {r['vs_k0']:>7.2f} {100 * r['trainer_idle_share']:>12.0f}% "
              f"{100 * r['generator_idle_share']:>14.0f}% {r['train_s_mean']:>8.2f} {r['staleness_max']:>10}")
    k1 = next((r for r in rows if r["k"] == 1), None)
    if k1 is not None:
        print(f"target k=1 <= 0.75x k=0: {'PASS' if k1['vs_k0'] <= 0.75 else 'MISS'} ({k1['vs_k0']:.2f}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "steps": args.steps, "overrides": args.overrides}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
