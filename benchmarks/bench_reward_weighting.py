"""ReSpec Gap 3, drafter-induced policy degradation: reward over RL steps with relaxed (lossy)
SD acceptance for plain-KD vs reward-weighted-KD drafter learners, against no SD, same seed.

    .venv/bin/python benchmarks/bench_reward_weighting.py [--steps 60] [--groups-per-step 8]
        [--group-size 4] [--threshold-single 0.3] [--threshold-acc 0.5] [--quick]

Three full `respec launch` runs of configs/respec.toml on the zoo (static SD (4, 1, 4)):
  no_sd:        generator.sd = "off", no drafter learner (the reference curve)
  plain_kd:     SD with relaxed acceptance, drafter learner with drafter.weighting = "none"
  weighted_kd:  SD with relaxed acceptance, drafter learner with drafter.weighting = "reward"
Relaxed acceptance (generator.sd_relaxed_threshold_single / _acc, SGLang's thresholds) accepts
a draft whose target probability is >= threshold_single, and compares the acceptance coin with
p / (q * threshold_acc): more drafts pass and the rollouts drift from the target towards the
drafter, while the behaviour log-probs (and so the trainer's off-policy correction) stay the
target's. Reported: mean reward over blocks of `--window` steps and over the last half of the
run, and each SD run's gap to no SD over the last half, paired by step: the same seed gives the
three runs the same prompts at every step, so the per-step differences d_i = r_SD(i) - r_noSD(i)
cancel most of the prompt-difficulty noise; gap = mean(d), SE = sd(d) / sqrt(#steps) (this SE
also absorbs the policies drifting apart). The unpaired binomial SE is printed beside it.
Verdicts: "plain KD degrades reward" when its gap < -2 SE; "weighting keeps reward at the no-SD
curve" when weighted KD's gap >= -2 SE.
Writes benchmarks/results/bench_reward_weighting.json and .png; --from-json re-reports a
recorded run without running anything.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rl_bench import (  # noqa: E402
    config_zoo, launch_run, learner_records, plot_curves, rl_arguments, step_records, window_means)


def main() -> None:
    parser = rl_arguments(__doc__, steps=60, out_name="bench_reward_weighting.json")
    parser.add_argument("--threshold-single", type=float, default=0.3)
    parser.add_argument("--threshold-acc", type=float, default=0.5)
    parser.add_argument("--from-json", type=Path, help="re-report this recorded result (no runs)")
    args = parser.parse_args()
    if args.from_json:
        recorded = json.loads(args.from_json.read_text())
        for key in ("steps", "threshold_single", "threshold_acc", "window"):
            setattr(args, key, recorded["settings"][key])
        report(args, recorded["results"], recorded)
        return

    from respec_async import zoo

    if args.quick:
        paths = zoo.ensure_zoo(Path(tempfile.gettempdir()) / "respec-quickzoo", spec=zoo.QUICK_SPEC)
    else:
        paths = config_zoo(args.config, args.overrides)
    common = [
        f'model.path="{paths.target_dir}"', f'model.drafter_path="{paths.drafter_dir}"',
        "generator.sd_num_steps=4", "generator.sd_top_k=1", "generator.sd_num_draft_tokens=4",
        f"trainer.num_steps={args.steps}", f"trainer.lr={args.lr}", f"run.seed={args.seed}",
        f"data.groups_per_step={args.groups_per_step}", f"data.group_size={args.group_size}",
        f"sampling.max_new_tokens={args.max_new_tokens}", "drafter.update_interval=1", *args.overrides,
    ]
    relaxed = ['generator.sd="static"', f"generator.sd_relaxed_threshold_single={args.threshold_single}",
               f"generator.sd_relaxed_threshold_acc={args.threshold_acc}", "roles.drafter_learner=1"]
    variants = {
        "no_sd": ['generator.sd="off"', "roles.drafter_learner=0"],
        "plain_kd": [*relaxed, 'drafter.weighting="none"'],
        "weighted_kd": [*relaxed, 'drafter.weighting="reward"'],
    }
    root = Path(tempfile.mkdtemp(prefix="bench-reward-weighting-"))
    started = time.perf_counter()
    results = {}
    half = args.steps // 2
    for name, extra in variants.items():
        print(f"running {name} ...", flush=True)
        run_dir = launch_run(args.config, name, root, common + extra)
        records = step_records(run_dir)
        reward = [r.reward_mean for r in records]
        learner = [x for x in learner_records(run_dir) if x["kind"] == "step"]
        late = records[half:]
        n_late = sum(r.num_samples for r in late)
        results[name] = {
            "run_dir": str(run_dir), "reward": reward, "accuracy": [r.accuracy for r in records],
            "acceptance_length": [r.acceptance_length for r in records],
            "response_len": [r.response_len_mean for r in records],
            "window_means": window_means(reward, args.window),
            "reward_first_half": statistics.mean(reward[:half]), "reward_last_half": statistics.mean(reward[half:]),
            "n_last_half": n_late, "wall_s": records[-1].time - records[0].time,
            "learner_steps": len(learner),
            "learner_weight_mean": statistics.mean(x["weight_mean"] for x in learner) if learner else None,
            "learner_kd_loss_first_last": [learner[0]["loss"], learner[-1]["loss"]] if learner else [],
        }
    report(args, results, {
        "benchmark": "bench_reward_weighting", "command": " ".join(sys.argv), "quick_zoo": args.quick,
        "settings": {"steps": args.steps, "groups_per_step": args.groups_per_step, "group_size": args.group_size,
                     "max_new_tokens": args.max_new_tokens, "lr": args.lr, "threshold_single": args.threshold_single,
                     "threshold_acc": args.threshold_acc, "window": args.window, "seed": args.seed, "sd": [4, 1, 4],
                     "overrides": common},
        "total_wall_s": time.perf_counter() - started,
    })


def report(args, results: dict, recorded: dict) -> None:
    variants = ("no_sd", "plain_kd", "weighted_kd")
    half = args.steps // 2

    def gap(name: str) -> tuple[float, float, float]:
        """(paired mean gap over the last half, its SE, the unpaired binomial SE)."""
        a, b = results[name], results["no_sd"]
        diffs = [x - y for x, y in zip(a["reward"][half:], b["reward"][half:])]
        paired_se = statistics.stdev(diffs) / math.sqrt(len(diffs))
        p1, p2 = a["reward_last_half"], b["reward_last_half"]
        binomial_se = math.sqrt(max(p1 * (1 - p1), 1e-4) / a["n_last_half"]
                                + max(p2 * (1 - p2), 1e-4) / b["n_last_half"])
        return statistics.mean(diffs), paired_se, binomial_se

    w = args.window
    print(f"\nmean reward over blocks of {w} RL steps (relaxed acceptance: threshold_single "
          f"{args.threshold_single}, threshold_acc {args.threshold_acc})")
    print(f"{'steps':>10} {'no SD':>8} {'plain KD':>9} {'weighted':>9}")
    for i, row in enumerate(zip(*(results[n]["window_means"] for n in variants))):
        print(f"{f'{i * w}-{min((i + 1) * w, args.steps) - 1}':>10} " + " ".join(f"{v:8.3f} " for v in row))
    print(f"{'last half':>10} " + " ".join(f"{results[n]['reward_last_half']:8.3f} " for n in variants))
    for n in ("plain_kd", "weighted_kd"):
        acc = results[n]["acceptance_length"]
        print(f"{n}: acceptance length {statistics.mean(acc[:w]):.2f} -> {statistics.mean(acc[-w:]):.2f}, "
              f"mean learner weight {results[n]['learner_weight_mean']}")
    plain_gap, plain_se, plain_bse = gap("plain_kd")
    weighted_gap, weighted_se, weighted_bse = gap("weighted_kd")
    degrades = plain_gap < -2 * plain_se
    keeps = weighted_gap >= -2 * weighted_se
    lines = [
        f"{'YES' if degrades else 'NO'}: plain KD {'degrades' if degrades else 'does not degrade'} reward: last-half "
        f"reward {results['plain_kd']['reward_last_half']:.3f} vs no SD {results['no_sd']['reward_last_half']:.3f}, "
        f"paired gap {plain_gap:+.3f} = {plain_gap / plain_se:+.1f} SE (SE {plain_se:.4f}; unpaired binomial SE "
        f"{plain_bse:.4f})",
        f"{'PASS' if keeps else 'MISS'}: reward-weighted KD {'keeps' if keeps else 'does not keep'} reward at the no-SD "
        f"curve: {results['weighted_kd']['reward_last_half']:.3f} vs {results['no_sd']['reward_last_half']:.3f}, "
        f"paired gap {weighted_gap:+.3f} = {weighted_gap / weighted_se:+.1f} SE (SE {weighted_se:.4f}; unpaired "
        f"binomial SE {weighted_bse:.4f}; target: gap >= -2 SE)",
    ]
    for line in lines:
        print(line)
    png = args.out.with_suffix(".png")
    plot_curves(png, f"Reward with relaxed SD acceptance ({args.threshold_single}, {args.threshold_acc}), zoo",
                "mean reward of the step's rollouts",
                {"no SD": results["no_sd"]["reward"], "SD + plain KD learner": results["plain_kd"]["reward"],
                 "SD + reward-weighted KD learner": results["weighted_kd"]["reward"]}, smooth=w)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**recorded, "results": results, "verdict": lines, "png": str(png)}, indent=1))
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
