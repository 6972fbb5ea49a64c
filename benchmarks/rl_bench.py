"""Shared by the RL-curve benchmarks (bench_drafter_evolution.py, bench_reward_weighting.py):
launch one real run (`respec launch`, every role a process) with overrides, read its per-step
metrics and the drafter learner's records, smooth curves, and plot them."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from respec_async.metrics import moving_average, read_metrics  # noqa: E402


def rl_arguments(description: str, steps: int, out_name: str) -> argparse.ArgumentParser:
    """The options both RL-curve benchmarks share: the run's size, seed and output file."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "respec.toml")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--groups-per-step", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--lr", type=float, default=1e-4, help="the actor's learning rate (trainer.lr)")
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="the micro zoo (smoke test; numbers mean nothing)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / out_name)
    return parser


def config_zoo(config: Path, overrides: list[str]):
    """The zoo (target and drafter) of the config's task, trained first if not cached."""
    from respec_async import zoo
    from respec_async.config import load_config

    task = load_config(config, overrides).data.task
    return zoo.ensure_zoo(spec=zoo.spec_for_task(task), log=print)


def respec_cli(command: str, config: Path, overrides: list[str], extra: list[str] = (), timeout_s: float = 3600,
               what: str = "") -> float:
    """Run `respec COMMAND CONFIG [extra] --set ...` to completion (an error names `what` and ends
    with its output); returns its wall seconds, process start included."""
    args = [sys.executable, "-m", "respec_async.cli", command, str(config), *extra]
    for o in overrides:
        args += ["--set", o]
    started = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{what or command} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return time.perf_counter() - started


def launch_run(config: Path, name: str, root: Path, overrides: list[str], timeout_s: float = 3600) -> Path:
    """Run `respec launch CONFIG --set ...` to completion; returns the run directory."""
    overrides = [f'run.root="{root}"', f'run.name="{name}"', "run.final_eval=false", "supervisor.live_status=false",
                 "trainer.checkpoint_every=0", *overrides]
    seconds = respec_cli("launch", config, overrides, timeout_s=timeout_s, what=f"run {name}")
    run_dir = max(root.glob(f"{name}-*"))
    print(f"  {name}: {seconds:.0f}s  {run_dir}", flush=True)
    return run_dir


def step_records(run_dir: Path) -> list:
    return read_metrics(run_dir / "metrics.jsonl")


def learner_records(run_dir: Path) -> list[dict]:
    path = run_dir / "drafter_learner-0.metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def events(run_dir: Path, role: str, name: str) -> list[dict]:
    path = run_dir / "logs" / f"{role}.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") == name:
            out.append(event)
    return out


def window_means(values: list[float], window: int) -> list[float]:
    """Mean of each consecutive block of `window` values (the last block may be shorter)."""
    return [sum(values[i:i + window]) / len(values[i:i + window]) for i in range(0, len(values), window)]


def plot_curves(path: Path, title: str, ylabel: str, curves: dict[str, list[float]], smooth: int = 10,
                hline: tuple[float, str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, values in curves.items():
        line, = ax.plot(range(len(values)), values, alpha=0.25)
        ax.plot(range(len(values)), moving_average(values, smooth), color=line.get_color(),
                label=f"{label} ({smooth}-step moving average)")
    if hline is not None:
        ax.axhline(hline[0], color="gray", linestyle="--", label=hline[1])
    ax.set_xlabel("RL step (policy version)")
    ax.set_ylabel(ylabel)
    save_figure(fig, ax, title, path)


def save_figure(fig, ax, title: str, path: Path) -> None:
    """Title, grid and legend on `ax`, then write `fig` to `path` (PNG) and close it."""
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
