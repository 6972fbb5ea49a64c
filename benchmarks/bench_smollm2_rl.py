"""RL on a real pretrained model on CPU: `configs/smollm2-cpu.toml` (SmolLM2-135M-Instruct, GRPO
on one- and two-digit additions asked in its chat template) for a fixed number of steps, as a
full `respec launch` run (every role a process).

Prints, per step and over the run: reward and accuracy, response length, the trainer's time split
(waiting for rollouts / training / weight sync), the generator's busy share, and completion
tokens per second; first, the training throughput of the trainer's forward + backward in float32
and under bf16 autocast on this CPU (trainer.compute_dtype). Learning is reported, not a
gate (in docs/BENCHMARKS.md: reward 0.42 -> 0.91 in 20 steps).

    .venv/bin/python benchmarks/bench_smollm2_rl.py               # ~17 min on 2 cores; --steps, --set
    .venv/bin/python benchmarks/bench_smollm2_rl.py --steps 4     # a smoke run

Writes benchmarks/results/bench_smollm2_rl.json and .png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from rl_bench import events, launch_run, save_figure, step_records  # noqa: E402

from respec_async.metrics import moving_average  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "bench_smollm2_rl.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "smollm2-cpu.toml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--window", type=int, default=5, help="steps averaged for the start and end reward")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--skip-dtype-check", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args()


def dtype_check(model_path: str, repeats: int = 1) -> dict[str, float]:
    """Tokens per second of a forward + backward (AdamW step included) on 1 x 64 tokens, one
    thread, float32 against bf16 autocast (float32 master weights, as the trainer keeps them):
    bf16 pays only where the CPU multiplies bf16 natively (AVX512-BF16, AMX)."""
    import torch

    from respec_async.engine.checkpoint import load_pretrained

    torch.set_num_threads(1)
    model = load_pretrained(model_path, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    rates = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        best = float("inf")
        for _ in range(repeats + 1):  # the first is warm-up
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                logits = model(ids).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1)[:-1], ids.flatten()[1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            best = min(best, time.perf_counter() - start)
        rates[name] = ids.numel() / best
        print(f"  train step, {name:>8}: {rates[name]:6.0f} tokens/s", flush=True)
    return rates


def torch_capability() -> str:
    import torch

    return f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}"


def main() -> None:
    args = parse_args()
    from respec_async import pretrained
    from respec_async.config import load_config

    started = time.perf_counter()
    path = pretrained.fetch("smollm2-135m", progress=print)
    overrides = [f'model.path="{path}"', f"trainer.num_steps={args.steps}", *args.overrides]
    config = load_config(args.config, overrides)
    result: dict = {"benchmark": "bench_smollm2_rl", "command": " ".join(sys.argv), "config": str(args.config),
                    "overrides": overrides}
    if not args.skip_dtype_check:
        print(f"trainer forward + backward on 1 x 64 tokens, one thread ({torch_capability()}):", flush=True)
        result["train_tokens_per_s"] = dtype_check(str(path))
    print(f"RL run: {config.data.groups_per_step} prompts x {config.data.group_size} samples per step, "
          f"{args.steps} steps, up to {config.sampling.max_new_tokens} new tokens, T = {config.sampling.temperature}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-smollm2-rl-") as root:
        launched = time.time()
        run_dir = launch_run(args.config, "smollm2", Path(root), overrides, timeout_s=7200)
        records = step_records(run_dir)
        utilization = events(run_dir, "generator-0", "generator.utilization")
    if not records:
        raise SystemExit("the run wrote no step records")

    print(f"\n{'step':>4} | {'reward':>6} | {'acc':>5} | {'len':>5} | {'wait s':>6} | {'train s':>7} | "
          f"{'sync s':>6} | {'tok/s':>6}")
    for r in records:
        print(f"{r.step:>4} | {r.reward_mean:6.3f} | {r.accuracy:5.2f} | {r.response_len_mean:5.1f} | "
              f"{r.wait_s:6.1f} | {r.train_s:7.1f} | {r.sync_s:6.2f} | {r.tokens_per_s:6.1f}")
    window = min(args.window, len(records))
    reward = [r.reward_mean for r in records]
    wait, train, sync = (sum(getattr(r, k) for r in records) for k in ("wait_s", "train_s", "sync_s"))
    steady_s = records[-1].time - records[0].time
    busy_s = utilization[-1]["busy_s"] if utilization else None
    summary = {
        "steps": len(records),
        "startup_s": records[0].time - launched,
        "wall_s": records[-1].time - launched,
        "s_per_step": steady_s / (len(records) - 1) if len(records) > 1 else None,
        "reward_start": statistics.mean(reward[:window]),
        "reward_end": statistics.mean(reward[-window:]),
        "accuracy_start": statistics.mean(r.accuracy for r in records[:window]),
        "accuracy_end": statistics.mean(r.accuracy for r in records[-window:]),
        "response_len_mean": statistics.mean(r.response_len_mean for r in records),
        "trainer_wait_share": wait / (wait + train + sync),
        "trainer_train_share": train / (wait + train + sync),
        "trainer_sync_share": sync / (wait + train + sync),
        "train_s_per_step": train / len(records),
        "generator_busy_s_per_step": busy_s / len(records) if busy_s is not None else None,
        "completion_tokens_per_s": sum(r.num_tokens for r in records[1:]) / steady_s if steady_s > 0 else None,
        "generation_tokens_per_s": statistics.mean(r.tokens_per_s for r in records),
    }
    print(f"\nreward {summary['reward_start']:.3f} (first {window} steps) -> {summary['reward_end']:.3f} "
          f"(last {window}); accuracy {summary['accuracy_start']:.2f} -> {summary['accuracy_end']:.2f}")
    print(f"{summary['s_per_step']:.1f} s per step after a {summary['startup_s']:.0f} s start; trainer time: "
          f"waiting for rollouts {summary['trainer_wait_share']:.0%}, training {summary['trainer_train_share']:.0%}, "
          f"weight sync {summary['trainer_sync_share']:.0%}; generator busy "
          f"{summary['generator_busy_s_per_step'] or 0:.1f} s per step; completion tokens/s "
          f"{summary['completion_tokens_per_s']:.1f} end to end, {summary['generation_tokens_per_s']:.1f} while "
          f"generating")
    result.update(summary=summary, records=msgspec.to_builtins(records), total_wall_s=time.perf_counter() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(records, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')} ({time.perf_counter() - started:.0f} s)")


def plot(records, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r.step for r in records]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    same = all(r.reward_mean == r.accuracy for r in records)  # a 0/1 rule reward is the accuracy
    curves = (("reward_mean", "reward (= accuracy)"),) if same else (("reward_mean", "reward"), ("accuracy", "accuracy"))
    for key, label in curves:
        values = [getattr(r, key) for r in records]
        line, = top.plot(steps, values, alpha=0.3)
        top.plot(steps, moving_average(values, 5), color=line.get_color(), label=f"{label} (5-step average)")
    top.set_ylabel("reward / accuracy")
    top.grid(alpha=0.3)
    top.legend(fontsize=8)
    top.set_title("SmolLM2-135M-Instruct, GRPO on 2 CPU cores")
    bottom.stackplot(steps, [r.wait_s for r in records], [r.train_s for r in records], [r.sync_s for r in records],
                     labels=["trainer waits for rollouts", "training", "weight sync"], alpha=0.7)
    bottom.set_xlabel("RL step (policy version)")
    bottom.set_ylabel("seconds")
    save_figure(fig, bottom, "where a step's time goes", path)


if __name__ == "__main__":
    main()
