"""Chaos: a run under random SIGKILLs and a fuzzer on every socket, against an undisturbed run.

Both runs use the same config and a slow async reward function (the rule reward after a sleep),
so the reward role always holds groups when it is killed. In the chaos run a live role is
SIGKILLed every 15-20 s (every role once in a random order, then again: generator, reward,
trainer, drafter learner), and a fuzzer pushes
malformed frames (random bytes, truncated msgpack, msgpack of no known type) into every role's
inbox and the supervisor's control socket. Reported: kills and restarts, the ledger's count of
groups issued / trained / dropped / re-issued / lost (lost must be 0; the ledger must balance),
the reward gain of each run (mean of the last 10 steps minus the first 10) and wall times.

    .venv/bin/python benchmarks/bench_chaos.py --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402
import zmq  # noqa: E402

from benchmarks.rl_bench import config_zoo  # noqa: E402
from respec_async.ledger import audit_run  # noqa: E402
from respec_async.metrics import read_metrics  # noqa: E402

SLOW_REWARD = """import asyncio

from respec_async.tasks import rule_reward


async def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    await asyncio.sleep({delay})
    return rule_reward(data_source, solution_str, ground_truth)
"""


def supervisor_events(run_dir: Path) -> list[dict]:
    path = run_dir / "logs" / "supervisor.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def latest_pids(run_dir: Path) -> dict[str, int]:
    return {e["role"]: e["pid"] for e in supervisor_events(run_dir) if e.get("event") == "role.started"}


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


class Fuzzer(threading.Thread):
    """Pushes malformed frames into every inbox and the supervisor's ROUTER at `rate` per second."""

    def __init__(self, run_dir: Path, rate: float, seed: int) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.rate, self.rng = run_dir, rate, random.Random(seed)
        self.stopped = threading.Event()
        self.sent: dict[str, int] = {}

    def frame(self) -> bytes:
        kind = self.rng.randrange(3)
        if kind == 0:
            return self.rng.randbytes(self.rng.randrange(1, 200))
        if kind == 1:
            return msgspec.msgpack.encode(["PromptGroup", 1, 2, [3, 4]])[: self.rng.randrange(1, 12)]
        return msgspec.msgpack.encode(["NoSuchMessage", self.rng.random(), "x" * self.rng.randrange(50)])

    def run(self) -> None:
        path = self.run_dir / "endpoints.json"
        while not path.exists() and not self.stopped.is_set():
            time.sleep(0.1)
        endpoints = json.loads(path.read_text())
        context = zmq.Context()
        sockets = {}
        for name, endpoint in endpoints["inboxes"].items():
            sockets[name] = context.socket(zmq.PUSH)
            sockets[name].connect(endpoint)
        sockets["supervisor"] = context.socket(zmq.DEALER)
        sockets["supervisor"].connect(endpoints["supervisor"])
        for s in sockets.values():
            s.setsockopt(zmq.SNDHWM, 100)
        names = sorted(sockets)
        while not self.stopped.wait(1.0 / self.rate):
            name = self.rng.choice(names)
            try:
                sockets[name].send(self.frame(), zmq.NOBLOCK)
                self.sent[name] = self.sent.get(name, 0) + 1
            except zmq.Again:  # that role is down and its queue is full: try another
                pass
        context.destroy(linger=0)


def run_once(config: Path, name: str, root: Path, overrides: list[str], chaos: bool, args) -> dict:
    overrides = [f'run.root="{root}"', f'run.name="{name}"', "run.final_eval=false",
                 "supervisor.live_status=false", *overrides]
    cmd = [sys.executable, "-m", "respec_async.cli", "launch", str(config)]
    for o in overrides:
        cmd += ["--set", o]
    rng = random.Random(args.seed)
    started = time.perf_counter()
    log = open(root / f"{name}.out", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    kills: list[dict] = []
    order: list[str] = []
    fuzzer = None
    while not list(root.glob(f"{name}-*")) and proc.poll() is None:
        time.sleep(0.1)
    run_dir = max(root.glob(f"{name}-*"))
    if chaos:
        fuzzer = Fuzzer(run_dir, args.fuzz_rate, args.seed)
        fuzzer.start()
        next_kill = time.perf_counter() + rng.uniform(*args.kill_every)
        while proc.poll() is None:
            time.sleep(0.2)
            if time.perf_counter() < next_kill:
                continue
            live = {role: pid for role, pid in latest_pids(run_dir).items() if alive(pid)}
            if not order:  # every role once in a random order, then again: each is hit
                order = rng.sample(sorted(latest_pids(run_dir)), k=len(latest_pids(run_dir)))
            role = order.pop()
            if role in live:
                steps = len(read_metrics(run_dir / "metrics.jsonl")) if (run_dir / "metrics.jsonl").exists() else 0
                try:
                    os.kill(live[role], signal.SIGKILL)
                    kills.append({"at_s": round(time.perf_counter() - started, 1), "role": role, "step": steps})
                    print(f"  kill {role} at {kills[-1]['at_s']}s (step {steps})", flush=True)
                except ProcessLookupError:
                    pass
            next_kill = time.perf_counter() + rng.uniform(*args.kill_every)
        fuzzer.stopped.set()
        fuzzer.join(5)
    code = proc.wait()
    wall_s = time.perf_counter() - started
    log.close()
    records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    rewards = [r.reward_mean for r in records]
    ledger = audit_run(run_dir)
    events = supervisor_events(run_dir)
    dropped_counted = sum(e.get("num_dropped", 0) for role_log in (run_dir / "logs").glob("*.jsonl")
                          for e in map(json.loads, filter(str.strip, role_log.read_text().splitlines()))
                          if e.get("event") == "role.stopped")
    result = {
        "name": name, "run_dir": str(run_dir), "exit_code": code, "wall_s": round(wall_s, 1), "steps": len(records),
        "kills": kills, "num_kills": len(kills),
        "restarts": sum(1 for e in events if e.get("event") == "role.restarting"),
        "fuzz_sent": sum(fuzzer.sent.values()) if fuzzer else 0,
        "malformed_dropped_counted": dropped_counted,
        "reward_first10": sum(rewards[:10]) / max(len(rewards[:10]), 1),
        "reward_last10": sum(rewards[-10:]) / max(len(rewards[-10:]), 1),
        "ledger": None if ledger is None else {
            "issued": ledger.num_issued, "trained": ledger.num_trained, "dropped": ledger.num_dropped,
            "in_flight": ledger.num_in_flight, "lost": ledger.num_lost, "reissued": ledger.num_reissues,
            "reissue_reasons": ledger.reissue_reasons, "trainer_starts": ledger.num_trainer_starts,
            "balanced": ledger.balanced, "summary": ledger.summary(),
        },
    }
    result["reward_gain"] = result["reward_last10"] - result["reward_first10"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "respec.toml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--reward-delay-s", type=float, default=0.05, help="the slow reward function's sleep per call")
    parser.add_argument("--kill-every", type=float, nargs=2, default=(15.0, 20.0), metavar=("MIN_S", "MAX_S"))
    parser.add_argument("--fuzz-rate", type=float, default=20.0, help="malformed frames per second, all sockets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_chaos.json")
    args = parser.parse_args()
    config_zoo(args.config, args.overrides)
    root = Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    reward_file = root / "slow_reward.py"
    reward_file.write_text(SLOW_REWARD.format(delay=args.reward_delay_s))
    overrides = [f"trainer.num_steps={args.steps}", f'reward.source="python:{reward_file}:compute_score"',
                 "trainer.checkpoint_every=5", "supervisor.max_restarts=20", f"run.seed={args.seed}",
                 # Killed roles come back in ~1 s; a 30 s formation timeout bounds a sync that waits
                 # on a member that died mid-broadcast.
                 "trainer.weight_sync_timeout_s=30", *args.overrides]
    results = []
    for name, chaos in (("calm", False), ("chaos", True)):
        print(f"running {name} ...", flush=True)
        results.append(run_once(args.config, name, root, overrides, chaos, args))
    calm, chaos = results
    print()
    print(f"{'run':6} | exit | steps | wall s | kills | restarts | fuzz frames | issued | trained | dropped | "
          f"re-issued | lost | balanced | reward gain")
    for r in results:
        ledger = r["ledger"] or {}
        print(f"{r['name']:6} | {r['exit_code']:4} | {r['steps']:5} | {r['wall_s']:6.0f} | {r['num_kills']:5} | "
              f"{r['restarts']:8} | {r['fuzz_sent']:11} | {ledger.get('issued', '-'):6} | {ledger.get('trained', '-'):7} | "
              f"{ledger.get('dropped', '-'):7} | {ledger.get('reissued', '-'):9} | {ledger.get('lost', '-'):4} | "
              f"{str(ledger.get('balanced', '-')):8} | {r['reward_gain']:+.3f}")
    kills = ", ".join(f"{k['role']}@{k['at_s']}s" for k in chaos["kills"])
    print(f"\nkills: {kills}")
    print(f"malformed frames counted as dropped by roles that stopped cleanly: {chaos['malformed_dropped_counted']}")
    print(f"chaos ledger: {(chaos['ledger'] or {}).get('summary')}")
    print(f"wall time chaos / calm: {chaos['wall_s'] / calm['wall_s']:.2f}x; "
          f"reward gain chaos - calm: {chaos['reward_gain'] - calm['reward_gain']:+.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
