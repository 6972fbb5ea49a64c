"""ReSpec Gap 2, drafter staleness: acceptance length over RL steps for a frozen drafter vs the
online drafter learner, same seed, same workload.

    .venv/bin/python benchmarks/bench_drafter_evolution.py [--steps 100] [--groups-per-step 8]
        [--group-size 4] [--quick]

Two full `respec launch` runs of configs/respec.toml with static SD (s, t, n) = (4, 1, 4) at
exact acceptance, on the zoo target and drafter (respec_async.zoo.ensure_zoo; --quick: the
micro zoo, for a smoke test):
  frozen:  roles.drafter_learner = 0 (the offline zoo drafter for the whole run)
  learner: roles.drafter_learner = 1, drafter.update_interval = 1, reward-weighted KD
The acceptance length of a step is the trainer's StepRecord.acceptance_length: tokens emitted
per verify step over every rollout of that step's batch (accepted drafts + 1 / verify steps).
Start = mean of the first `--window` steps, end = mean of the last `--window` steps.
Targets: learner end >= 0.90 x its start; frozen end below its start by more than 2 standard
errors of the difference of the two block means (it decays, beyond step-to-step noise).
Writes benchmarks/results/bench_drafter_evolution.json and .png.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rl_bench import (  # noqa: E402
    config_zoo, launch_run, learner_records, plot_curves, rl_arguments, step_records, window_means)


def main() -> None:
    parser = rl_arguments(__doc__, steps=100, out_name="bench_drafter_evolution.json")
    parser.add_argument("--update-interval", type=int, default=1)
    args = parser.parse_args()

    from respec_async import zoo

    if args.quick:
        paths = zoo.ensure_zoo(Path(tempfile.gettempdir()) / "respec-quickzoo", spec=zoo.QUICK_SPEC)
    else:
        paths = config_zoo(args.config, args.overrides)
    common = [
        f'model.path="{paths.target_dir}"', f'model.drafter_path="{paths.drafter_dir}"',
        'generator.sd="static"', "generator.sd_num_steps=4", "generator.sd_top_k=1", "generator.sd_num_draft_tokens=4",
        f"trainer.num_steps={args.steps}", f"trainer.lr={args.lr}", f"run.seed={args.seed}",
        f"data.groups_per_step={args.groups_per_step}", f"data.group_size={args.group_size}",
        f"sampling.max_new_tokens={args.max_new_tokens}", f"drafter.update_interval={args.update_interval}",
        'drafter.weighting="reward"', *args.overrides,
    ]
    variants = {"frozen": ["roles.drafter_learner=0"], "learner": ["roles.drafter_learner=1"]}
    root = Path(tempfile.mkdtemp(prefix="bench-drafter-evolution-"))
    started = time.perf_counter()
    results = {}
    for name, extra in variants.items():
        print(f"running {name} ...", flush=True)
        run_dir = launch_run(args.config, name, root, common + extra)
        records = step_records(run_dir)
        curve = [r.acceptance_length for r in records]
        learner = learner_records(run_dir)
        results[name] = {
            "run_dir": str(run_dir),
            "acceptance_length": curve,
            "reward": [r.reward_mean for r in records],
            "drafter_lag": [r.drafter_lag for r in records],
            "start": statistics.mean(curve[:args.window]),
            "end": statistics.mean(curve[-args.window:]),
            "window_means": window_means(curve, args.window),
            "reward_start": statistics.mean(r.reward_mean for r in records[:args.window]),
            "reward_end": statistics.mean(r.reward_mean for r in records[-args.window:]),
            "wall_s": records[-1].time - records[0].time,
            "learner_steps": sum(1 for x in learner if x["kind"] == "step"),
            "learner_publishes": sum(1 for x in learner if x["kind"] == "publish"),
            "learner_kd_loss_first_last": ([x["loss"] for x in learner if x["kind"] == "step"][:1]
                                           + [x["loss"] for x in learner if x["kind"] == "step"][-1:]),
        }
        results[name]["ratio"] = results[name]["end"] / results[name]["start"]

    frozen, learner = results["frozen"], results["learner"]
    w = args.window
    print(f"\nacceptance length (tokens per verify step), mean over blocks of {w} RL steps")
    print(f"{'steps':>10} {'frozen':>8} {'learner':>8}")
    for i, (a, b) in enumerate(zip(frozen["window_means"], learner["window_means"])):
        print(f"{f'{i * w}-{min((i + 1) * w, args.steps) - 1}':>10} {a:8.3f} {b:8.3f}")
    print(f"{'end/start':>10} {frozen['ratio']:8.3f} {learner['ratio']:8.3f}")
    print(f"{'reward':>10} {frozen['reward_start']:.3f}->{frozen['reward_end']:.3f} "
          f"{learner['reward_start']:.3f}->{learner['reward_end']:.3f}")
    learner_ok = learner["ratio"] >= 0.90
    # "Decays" = the end block is below the start block by more than 2 standard errors of the
    # difference of the two block means (step-to-step noise), not merely lower.
    curve = frozen["acceptance_length"]
    noise = (statistics.variance(curve[:w]) / w + statistics.variance(curve[-w:]) / w) ** 0.5
    frozen["decay_threshold"] = 2 * noise
    frozen_decays = frozen["start"] - frozen["end"] > 2 * noise
    lines = [
        f"{'PASS' if learner_ok else 'MISS'}: learner keeps {learner['ratio']:.1%} of its starting acceptance length "
        f"({learner['start']:.3f} -> {learner['end']:.3f}; target >= 90%)",
        f"{'PASS' if frozen_decays else 'MISS'}: frozen drafter {'decays' if frozen_decays else 'does not decay'}: "
        f"{frozen['start']:.3f} -> {frozen['end']:.3f} ({frozen['ratio'] - 1:+.1%}; decay = a drop of more than "
        f"2 standard errors, {2 * noise:.3f})",
        f"learner vs frozen at the end: {learner['end'] / frozen['end']:.3f}x",
    ]
    for line in lines:
        print(line)
    png = args.out.with_suffix(".png")
    plot_curves(png, f"Drafter evolution over {args.steps} RL steps (zoo, static SD (4,1,4), exact)",
                "acceptance length (tokens / verify step)",
                {"frozen drafter": frozen["acceptance_length"], "online learner (reward-weighted KD)":
                 learner["acceptance_length"]}, smooth=w)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "bench_drafter_evolution", "command": " ".join(sys.argv), "quick_zoo": args.quick,
        "settings": {"steps": args.steps, "groups_per_step": args.groups_per_step, "group_size": args.group_size,
                     "max_new_tokens": args.max_new_tokens, "lr": args.lr, "update_interval": args.update_interval,
                     "window": w, "seed": args.seed, "sd": [4, 1, 4], "overrides": common},
        "results": results, "verdict": lines, "png": str(png),
        "total_wall_s": time.perf_counter() - started,
    }, indent=1))
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
