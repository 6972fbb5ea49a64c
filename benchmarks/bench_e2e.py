"""End to end: wall time to reach a fixed reward, and wall time for a fixed number of RL steps,
for no SD, naive SD and full ReSpec, on the same workload and seed, in one run.

    .venv/bin/python benchmarks/bench_e2e.py [--steps 60] [--target-reward 0.5] [--window 10]
        [--arms no-sd naive-sd respec] [--profile offline|in-run] [--quick]
    .venv/bin/python benchmarks/bench_e2e.py --from-json benchmarks/results/bench_e2e.json
        [--target-reward 0.45]        (re-report a recorded run, e.g. at another threshold)
    .venv/bin/python benchmarks/bench_e2e.py --from-json seed0.json seed1.json seed2.json
                                      (runs with different --seed: curves averaged step by step)

Full `respec launch` runs of configs/respec.toml, one after the other, that differ only in
these switches (same seed, so the same prompts at every step; same workload: the config's own
data.groups_per_step x data.group_size, sampling.max_new_tokens and trainer.lr unless given):
  sync-no-sd: no-sd at trainer.max_staleness = 0: synchronous on-policy RL, generation and
             training in turn (the "standard RL training" ReSpec compares with)
  no-sd:     generator.sd = "off", roles.drafter_learner = 0 (plain decoding, the config's k)
  naive-sd:  generator.sd = "static" with the config's (sd_num_steps, sd_top_k,
             sd_num_draft_tokens), roles.drafter_learner = 0 (the offline zoo drafter, frozen)
  history:   generator.sd = "static" drafting chains of 8 from the rollout history
             (generator.sd_source = "history": no drafter model, no learner)
  respec:    generator.sd = "adaptive", roles.drafter_learner = 1, drafter.weighting = "reward"
             (the config as is: its grid holds EAGLE and history configs). Its SD profile (step costs per config and batch size on this
             hardware, acceptance lengths) is, with --profile offline (the default, and the
             paper's way: once per hardware and model pair), measured by `respec profile` before
             the runs, timed and reported beside the arm's times but not in them; with
             --profile in-run the generator measures it at start, inside the timed run.
The training set is --train-size arithmetic problems (data.train_size; default 240, so a
step of 16 groups runs 15 steps an epoch, as a GSM8K-sized set does at batch 512: prompts
come back every epoch, which the history drafter exploits); 0 = an endless stream.
The zoo target and drafter (respec_async.zoo.ensure_zoo, made sure of before the first run, so
no arm pays for training it; --quick: the micro zoo with 4 x 4 x 64-token steps unless given,
a smoke test whose numbers mean nothing).
Every time is wall-clock seconds from launching `respec launch` to the trainer writing a step's
record (StepRecord.time), so it includes process start, model loading and the adaptive arm's SD
profiling. Reported per arm:
  wall:    launch -> the last step's record (the N-step time); also startup (launch -> step 0),
           the steady seconds per step (step 0 -> last step), completion tokens per second over
           that span, the trainer's share of time waiting for rollouts, the SD step share and
           acceptance length (per draft source), the generator's busy seconds per RL step (its
           generator.utilization events: time stepping the engine), and the SD profiling
           seconds (the generator's sd.profiled event)
  reward:  the per-step reward_mean smoothed by a trailing `--window`-step moving average;
           "time to reward X" = the time of the first step at which that average (over a full
           window; over all steps so far in runs shorter than a window) is >= X:
             X = --target-reward (a fixed value; the tiny zoo goes ~0.33 -> ~0.60 in 60 steps),
             X = the no-sd arm's first-window mean + 90% of its gain to its last-window mean
                 (computed after the runs, so it is reachable whatever the absolute numbers;
                 the first selected arm's if no-sd is not run)
  final reward: the mean reward of the last `--window` steps.
  bound:   what bounds each arm: its generation share (generator busy seconds / seconds per
           step; sync-no-sd's is the generation share of a synchronous step), its generation
           speedup S (no-sd's busy seconds per step / the arm's) and the Amdahl bound on the
           e2e speedup a generation speedup S can give where generation takes no-sd's share p
           of a step, 1 / (1 - p (1 - 1/S)), next to the measured e2e speedup (wall, no-sd /
           arm).
Speedups are the no-sd arm's time over the arm's time. Verdicts (time to the fixed reward;
the other two speedups beside it): PASS when respec reaches it >= 1.5x sooner than no-sd, and
sooner than naive-sd; N/A when neither arm of a pair reaches it in the run. The arms run in
sequence, so anything else loading the machine meanwhile lands on one arm only: compare arms
from a quiet machine, or rerun.
Writes benchmarks/results/bench_e2e.json, bench_e2e.png (smoothed reward vs wall-clock seconds)
and bench_e2e_steps.png (reward vs RL step).
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
    config_zoo, events, launch_run, learner_records, plot_curves, respec_cli, rl_arguments,
    save_figure, step_records,
)

from respec_async.metrics import moving_average  # noqa: E402

ARMS = {
    "sync-no-sd": ['generator.sd="off"', "roles.drafter_learner=0", "trainer.max_staleness=0"],
    "no-sd": ['generator.sd="off"', "roles.drafter_learner=0"],
    "naive-sd": ['generator.sd="static"', "roles.drafter_learner=0"],
    "history": ['generator.sd="static"', 'generator.sd_source="history"', "generator.sd_num_steps=8",
                "generator.sd_num_draft_tokens=8", "roles.drafter_learner=0"],
    "respec": ['generator.sd="adaptive"', "roles.drafter_learner=1", 'drafter.weighting="reward"'],
}
SPEEDUP_TARGET = 1.5  # respec vs no-sd, time to the fixed reward
RELATIVE_FRACTION = 0.9  # the second threshold: this far from no-sd's first-window to its last-window mean


def main() -> None:
    parser = rl_arguments(__doc__, steps=60, out_name="bench_e2e.json")
    # None = the config's own value (the three arms then run configs/respec.toml's workload).
    parser.set_defaults(groups_per_step=None, group_size=None, max_new_tokens=None, lr=None)
    parser.add_argument("--target-reward", type=float, default=0.5,
                        help="the fixed reward threshold of 'time to reward' (default 0.5)")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--profile", choices=("offline", "in-run"), default="offline",
                        help="respec's SD profile: measured by `respec profile` before the runs (default) or by "
                             "the generator inside the timed run")
    parser.add_argument("--from-json", type=Path, nargs="+",
                        help="re-report this recorded result (no runs); several (runs with different --seed): "
                             "each arm's reward and times averaged step by step over them")
    parser.add_argument("--train-size", type=int, default=240,
                        help="data.train_size: problems in the training set (0 = an endless stream)")
    args = parser.parse_args()
    if args.from_json:
        recorded = combine_runs([json.loads(path.read_text()) for path in args.from_json])
        args.steps, args.arms = recorded["settings"]["steps"], list(recorded["results"])
        if "--window" not in sys.argv:
            args.window = recorded["settings"]["window"]
        report(args, recorded["results"], {**recorded, "reported_by": " ".join(sys.argv)})
        return

    from respec_async import zoo
    from respec_async.config import load_config

    if args.quick:
        paths = zoo.ensure_zoo(Path(tempfile.gettempdir()) / "respec-quickzoo", spec=zoo.QUICK_SPEC)
        for key, value in (("groups_per_step", 4), ("group_size", 4), ("max_new_tokens", 64)):
            if getattr(args, key) is None:
                setattr(args, key, value)
    else:
        given = load_config(args.config, args.overrides).model.path
        paths = None if given else config_zoo(args.config, args.overrides)
    common = [f"trainer.num_steps={args.steps}", f"run.seed={args.seed}", f"data.train_size={args.train_size}"]
    if paths is not None:
        common += [f'model.path="{paths.target_dir}"', f'model.drafter_path="{paths.drafter_dir}"']
    for key, value in (("data.groups_per_step", args.groups_per_step), ("data.group_size", args.group_size),
                       ("sampling.max_new_tokens", args.max_new_tokens), ("trainer.lr", args.lr)):
        if value is not None:
            common.append(f"{key}={value}")
    common += args.overrides
    resolved = {name: load_config(args.config, common + ARMS[name]) for name in args.arms}
    config = resolved[args.arms[0]]
    g = config.generator
    root = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    started = time.perf_counter()
    arms = {name: list(ARMS[name]) for name in args.arms}
    offline_profile_s = None
    if "respec" in arms and args.profile == "offline":
        profile_path = root / "sd_profile.json"
        offline_profile_s = run_profile(args.config, common + arms["respec"], profile_path)
        arms["respec"].append(f'generator.sd_profile="{profile_path}"')
    results = {}
    for name in args.arms:
        print(f"running {name} ...", flush=True)
        launched = time.time()
        run_dir = launch_run(args.config, name, root, common + arms[name])
        exited = time.time()
        results[name] = arm_result(run_dir, launched, exited, args.window)
        results[name]["overrides"] = arms[name]
        results[name]["sd"] = resolved[name].generator.sd
    if offline_profile_s is not None:
        results["respec"]["sd_profile_s"] = offline_profile_s  # instead of the generator's (none)
    report(args, results, {
        "benchmark": "bench_e2e", "command": " ".join(sys.argv), "quick_zoo": args.quick,
        "settings": {"config": str(args.config), "steps": args.steps, "train_size": config.data.train_size,
                     "groups_per_step": config.data.groups_per_step,
                     "group_size": config.data.group_size, "max_new_tokens": config.sampling.max_new_tokens,
                     "lr": config.trainer.lr, "window": args.window, "seed": args.seed,
                     "static_sd": [g.sd_num_steps, g.sd_top_k, g.sd_num_draft_tokens],
                     "relaxed_thresholds": [g.sd_relaxed_threshold_single, g.sd_relaxed_threshold_acc],
                     "overrides": common, "profile": args.profile},
        "total_wall_s": time.perf_counter() - started,
    })


def combine_runs(runs: list[dict]) -> dict:
    """Several recorded runs of this benchmark (the same workload, different seeds) as one: per
    arm every step's reward, accuracy and time averaged over the runs, every other number
    averaged (the first run's for the rest). Reward curves of single runs part by chance from
    the first steps (different samples), so a time to a fixed reward from one seed measures
    that chance as much as the arm's speed; the seed-mean curve measures the speed."""
    if len(runs) == 1:
        return runs[0]
    settings = [{k: v for k, v in r["settings"].items() if k not in ("seed", "overrides")} for r in runs]
    if any(s != settings[0] for s in settings):
        raise SystemExit("--from-json: the runs differ in more than their seed: "
                         + "; ".join(json.dumps(s, sort_keys=True) for s in settings))
    arms = [a for a in runs[0]["results"] if all(a in r["results"] for r in runs)]
    results = {}
    for arm in arms:
        each = [r["results"][arm] for r in runs]
        combined = dict(each[0])
        for key, value in each[0].items():
            values = [e.get(key) for e in each]
            if isinstance(value, list) and key in ("reward", "accuracy", "time_s", "acceptance_length"):
                combined[key] = [statistics.mean(col) for col in zip(*values)]
            elif isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and all(isinstance(v, (int, float)) for v in values):
                combined[key] = statistics.mean(values)
        combined["per_seed"] = {str(r["settings"]["seed"]): {
            "wall_s": e["wall_s"], "time_to_target_s": e.get("time_to_target_s"),
            "reward_end": e["reward_end"]} for r, e in zip(runs, each)}
        results[arm] = combined
    seeds = [r["settings"]["seed"] for r in runs]
    print(f"combined {len(runs)} runs (seeds {seeds}): rewards and times averaged step by step")
    return {**runs[0], "settings": {**runs[0]["settings"], "seed": seeds}, "results": results,
            "combined_from": [r.get("command", "") for r in runs]}


def run_profile(config: Path, overrides: list[str], out: Path) -> float:
    """`respec profile` with the generator's own in-run settings (5 repeats, 16 acceptance
    prompts); returns its wall seconds, process start included."""
    print("profiling SD offline (respec profile) ...", flush=True)
    seconds = respec_cli("profile", config, overrides, ["--out", str(out), "--repeats", "5", "--acceptance-prompts",
                                                        "16"], timeout_s=1800, what="respec profile")
    print(f"  profile: {seconds:.0f}s  {out}", flush=True)
    return seconds


def arm_result(run_dir: Path, launched: float, exited: float, window: int) -> dict:
    """One arm's curves and times; `launched` / `exited`: unix time around `respec launch`."""
    records = step_records(run_dir)
    reward = [r.reward_mean for r in records]
    steady_s = records[-1].time - records[0].time
    acceptance = [r.acceptance_length for r in records if r.acceptance_length > 0]
    busy = sum(r.wait_s + r.train_s + r.sync_s for r in records)
    profiled = events(run_dir, "generator-0", "sd.profiled")
    learner = [x for x in learner_records(run_dir) if x["kind"] == "step"]
    utilization = events(run_dir, "generator-0", "generator.utilization")
    sources = {}
    for source in sorted({s for r in records for s in r.sd_sources}):
        rows = [r.sd_sources[source] for r in records if source in r.sd_sources]
        steps = sum(x["step_share"] for x in rows)
        sources[source] = {"step_share_mean": steps / len(records),
                           "acceptance_length_mean": statistics.mean(x["acceptance_length"] for x in rows)}
    return {
        "run_dir": str(run_dir),
        "reward": reward,
        "accuracy": [r.accuracy for r in records],
        "time_s": [r.time - launched for r in records],  # seconds from launch to each step's record
        "acceptance_length": [r.acceptance_length for r in records],
        "sd_step_share": [r.sd_step_share for r in records],
        "num_tokens": [r.num_tokens for r in records],
        "wall_s": records[-1].time - launched,
        "process_s": exited - launched,
        "startup_s": records[0].time - launched,
        "steady_s_per_step": steady_s / (len(records) - 1) if len(records) > 1 else None,
        "tokens_per_s": sum(r.num_tokens for r in records[1:]) / steady_s if steady_s > 0 else None,
        "trainer_wait_share": sum(r.wait_s for r in records) / busy if busy > 0 else None,
        "sd_step_share_mean": statistics.mean(r.sd_step_share for r in records),
        "acceptance_length_mean": statistics.mean(acceptance) if acceptance else None,
        "drafter_lag_mean": (statistics.mean(r.drafter_lag for r in records if r.drafter_lag >= 0)
                             if any(r.drafter_lag >= 0 for r in records) else None),
        "sd_profile_s": profiled[0].get("seconds") if profiled else None,
        "sd_sources": sources,
        "generator_busy_s_per_step": utilization[-1]["busy_s"] / len(records) if utilization else None,
        "learner_steps": len(learner),
        "reward_start": statistics.mean(reward[:window]),
        "reward_end": statistics.mean(reward[-window:]),
    }


def time_to_reward(result: dict, threshold: float, window: int) -> tuple[float | None, int | None]:
    """(seconds from launch, step) at which the trailing `window`-step mean reward first is
    >= threshold, counting only full windows (all steps so far in runs shorter than a window)."""
    smoothed = moving_average(result["reward"], window)
    first = min(window, len(smoothed)) - 1
    for i in range(first, len(smoothed)):
        if smoothed[i] >= threshold - 1e-12:
            return result["time_s"][i], i
    return None, None


def report(args, results: dict, recorded: dict) -> None:
    w, n = args.window, args.steps
    shown = min(w, len(results[next(iter(results))]["reward"]))  # the first / last block actually averaged
    arms = [a for a in ARMS if a in results]
    base = "no-sd" if "no-sd" in results else arms[0]
    start, end = results[base]["reward_start"], results[base]["reward_end"]
    relative = start + RELATIVE_FRACTION * (end - start)
    thresholds = {"target": args.target_reward, "relative": relative}
    for name in arms:
        r = results[name]
        for key, thr in thresholds.items():
            r[f"time_to_{key}_s"], r[f"step_to_{key}"] = time_to_reward(r, thr, w)

    def speedup(name: str, key: str) -> float | None:
        ref, mine = results[base].get(key), results[name].get(key)
        return ref / mine if ref and mine else None

    def fmt(x: float | None, spec: str = ".1f", missing: str = "-") -> str:
        return missing if x is None else format(x, spec)

    rel_label = f"{RELATIVE_FRACTION:.0%} of {base}'s gain"
    print(f"\nend to end, {n} RL steps of {recorded['settings']['groups_per_step']} x "
          f"{recorded['settings']['group_size']} rollouts (<= {recorded['settings']['max_new_tokens']} tokens), "
          f"seed {recorded['settings']['seed']}; times in s from launch; speedup = {base} / arm; "
          f"reward smoothed over {w} steps")
    print(f"{base}: reward {start:.3f} (first {shown} steps) -> {end:.3f} (last {shown}); {rel_label}: reward >= "
          f"{relative:.3f}" + ("  (no gain: this threshold means nothing)" if end <= start else ""))
    head = (f"{'arm':<9} | {f'wall s ({n} steps)':>17} | {'speedup':>7} | {f't to r>={args.target_reward:.2f}':>11} "
            f"| {'speedup':>7} | {f't to r>={relative:.3f}':>12} | {'speedup':>7} | {'final reward':>12}")
    print(head)
    print("-" * len(head))
    for name in arms:
        r = results[name]
        reached = {k: (fmt(r[f'time_to_{k}_s']) + f" @{r[f'step_to_{k}']}" if r[f"time_to_{k}_s"] is not None
                       else "not reached") for k in thresholds}
        print(f"{name:<9} | {r['wall_s']:17.1f} | {fmt(speedup(name, 'wall_s'), '.2f'):>6}x "
              f"| {reached['target']:>11} | {fmt(speedup(name, 'time_to_target_s'), '.2f'):>6}x "
              f"| {reached['relative']:>12} | {fmt(speedup(name, 'time_to_relative_s'), '.2f'):>6}x "
              f"| {r['reward_end']:12.3f}")
    print("(t to r>=X: seconds @ step; speedup '-': an arm did not reach it)")
    print(f"\n{'arm':<9} | {'startup s':>9} | {'s/step':>6} | {'gen busy s/step':>15} | {'tok/s':>6} "
          f"| {'trainer waits':>13} | {'SD steps':>8} | {'accept len':>10} | {'by source (steps, accept)':>26} "
          f"| {'SD profile s':>12} | {'learner steps':>13}")
    for name in arms:
        r = results[name]
        by_source = ", ".join(f"{k} {v['step_share_mean']:.0%} {v['acceptance_length_mean']:.2f}"
                              for k, v in r.get("sd_sources", {}).items()) or "-"
        print(f"{name:<9} | {r['startup_s']:9.1f} | {fmt(r['steady_s_per_step'], '.2f'):>6} "
              f"| {fmt(r.get('generator_busy_s_per_step'), '.3f'):>15} "
              f"| {fmt(r['tokens_per_s'], '.0f'):>6} | {fmt(r['trainer_wait_share'], '.0%'):>13} "
              f"| {r['sd_step_share_mean']:8.0%} | {fmt(r['acceptance_length_mean'], '.2f'):>10} "
              f"| {by_source:>26} | {fmt(r['sd_profile_s']):>12} | {r['learner_steps']:>13}")
    if "no-sd" in results and results["no-sd"].get("generator_busy_s_per_step"):
        base_busy = results["no-sd"]["generator_busy_s_per_step"]
        print("generator busy seconds per step, no-sd / arm: " + ", ".join(
            f"{name} {base_busy / results[name]['generator_busy_s_per_step']:.2f}x" for name in arms
            if results[name].get("generator_busy_s_per_step")))
    print("(startup: launch -> step 0's record; s/step and tok/s: step 0 -> the last step; trainer waits: "
          "its share of wait + train + sync spent waiting for rollouts)")
    amdahl_rows = amdahl(results, arms)
    if amdahl_rows:
        print(f"\n{'arm':<10} | {'gen share':>9} | {'gen speedup S':>13} | {'Amdahl bound':>12} | {'e2e speedup':>11}")
        for row in amdahl_rows:
            speedup = "-" if row["speedup"] is None else f"{row['speedup']:.2f}x"
            bound = "-" if row["bound"] is None else f"{row['bound']:.2f}x"
            print(f"{row['arm']:<10} | {row['share']:9.0%} | {speedup:>13} | {bound:>12} | {row['e2e']:10.2f}x")
        print("(gen share: generator busy s / s per step (for sync-no-sd: the generation share of a synchronous "
              "step); S: no-sd's busy s per step / the arm's; bound: 1 / (1 - p (1 - 1/S)) with p = no-sd's share; "
              "e2e: no-sd's wall / the arm's)")
        for row in amdahl_rows:
            results[row["arm"]]["amdahl"] = row
    offline = results["respec"]["sd_profile_s"] if recorded["settings"].get("profile") == "offline" \
        and "respec" in results else None
    if offline is not None:
        mine = results["respec"]
        line = (f"respec's SD profile was measured offline (respec profile, {offline:.1f} s) before the runs and is "
                f"in none of the times above; with it added respec's {n}-step wall is {mine['wall_s'] + offline:.1f} s")
        if "no-sd" in results:
            line += f" ({results['no-sd']['wall_s'] / (mine['wall_s'] + offline):.2f}x no-sd's)"
        print(line)

    lines = []
    x = args.target_reward
    for ref, factor, claim in (("no-sd", SPEEDUP_TARGET, f">= {SPEEDUP_TARGET:g}x faster than"),
                               ("naive-sd", 1.0, "faster than"), ("sync-no-sd", 1.0, "faster than")):
        if "respec" not in results or ref not in results:
            continue
        mine, theirs = results["respec"], results[ref]
        t_mine, t_ref = mine["time_to_target_s"], theirs["time_to_target_s"]
        if t_mine is not None and t_ref is not None:
            s = t_ref / t_mine
            ok = s >= factor if factor > 1 else s > 1
            status, main_part = ("PASS" if ok else "MISS"), (f"time to reward {x:g}: {t_mine:.1f} s vs {t_ref:.1f} s "
                                                             f"= {s:.2f}x")
        elif t_mine is None and t_ref is None:
            status, main_part = "N/A ", f"neither reached reward {x:g} in {n} steps"
        elif t_mine is None:
            status, main_part = "MISS", f"respec never reached reward {x:g} in {n} steps; {ref} did at {t_ref:.1f} s"
        else:
            bound = theirs["wall_s"] / t_mine  # ref's time to it is beyond its whole run
            ok = bound >= factor if factor > 1 else bound > 1
            status = "PASS" if ok else "N/A "
            main_part = (f"respec reached reward {x:g} at {t_mine:.1f} s, {ref} not in its {theirs['wall_s']:.1f} s "
                         f"run: speedup > {bound:.2f}x")
        wall = theirs["wall_s"] / mine["wall_s"]
        rel_mine, rel_ref = mine["time_to_relative_s"], theirs["time_to_relative_s"]
        rel = (f"{rel_ref / rel_mine:.2f}x ({rel_mine:.1f} s vs {rel_ref:.1f} s)" if rel_mine and rel_ref
               else f"n/a (respec {fmt(rel_mine, missing='not reached')}, {ref} {fmt(rel_ref, missing='not reached')})")
        lines.append(f"{status}  respec {claim} {ref} ({main_part}; {n}-step wall {mine['wall_s']:.1f} s vs "
                     f"{theirs['wall_s']:.1f} s = {wall:.2f}x; time to reward {relative:.3f} ({rel_label}): {rel})")
    print()
    for line in lines:
        print(line)

    png = args.out.with_suffix(".png")
    steps_png = args.out.with_name(args.out.stem + "_steps.png")
    plot_time(png, results, arms, w, thresholds, rel_label,
              f"Reward vs wall-clock time, {n} RL steps (seed {recorded['settings']['seed']})"
              + (" [micro zoo smoke test]" if recorded.get("quick_zoo") else ""))
    plot_curves(steps_png, f"Reward vs RL step, {n} steps (same seed and prompts per step)",
                "mean reward of the step's rollouts", {name: results[name]["reward"] for name in arms}, smooth=w,
                hline=(args.target_reward, f"target reward {args.target_reward:g}"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        **recorded, "target_reward": args.target_reward, "relative_threshold": relative,
        "relative_threshold_from": base, "results": results, "verdict": lines, "png": [str(png), str(steps_png)],
    }, indent=1))
    print(f"wrote {args.out}, {png} and {steps_png}")


def amdahl(results: dict, arms: list[str]) -> list[dict]:
    """Per arm: generation share of a step, generation speedup S over no-sd, the Amdahl bound
    1 / (1 - p (1 - 1/S)) and the measured e2e speedup over no-sd (empty without no-sd)."""
    base = results.get("no-sd")
    if not base or not base.get("generator_busy_s_per_step") or not base.get("steady_s_per_step"):
        return []

    def share(r: dict) -> float:
        return min(1.0, r["generator_busy_s_per_step"] / r["steady_s_per_step"])

    rows = []
    for name in arms:
        r = results[name]
        if not r.get("generator_busy_s_per_step") or not r.get("steady_s_per_step"):
            continue
        if name == "sync-no-sd":  # the reference itself: no generation speedup to bound
            rows.append({"arm": name, "share": share(r), "speedup": None, "bound": None,
                         "e2e": base["wall_s"] / r["wall_s"]})
            continue
        s = base["generator_busy_s_per_step"] / r["generator_busy_s_per_step"]
        rows.append({"arm": name, "share": share(r), "speedup": s, "bound": 1 / (1 - share(base) * (1 - 1 / s)),
                     "e2e": base["wall_s"] / r["wall_s"]})
    return rows


def plot_time(path: Path, results: dict, arms: list[str], window: int, thresholds: dict[str, float],
              rel_label: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in arms:
        r = results[name]
        line, = ax.plot(r["time_s"], r["reward"], alpha=0.25)
        ax.plot(r["time_s"], moving_average(r["reward"], window), color=line.get_color(),
                label=f"{name} ({window}-step moving average; {len(r['reward'])} steps in {r['wall_s']:.0f} s)")
        if r.get("time_to_target_s") is not None:
            ax.plot([r["time_to_target_s"]], [thresholds["target"]], "o", color=line.get_color())
    ax.axhline(thresholds["target"], color="gray", linestyle="--", label=f"target reward {thresholds['target']:g}")
    ax.axhline(thresholds["relative"], color="gray", linestyle=":",
               label=f"reward {thresholds['relative']:.3f} ({rel_label})")
    ax.set_xlim(left=0)
    ax.set_xlabel("wall-clock seconds since launch")
    ax.set_ylabel("mean reward of the step's rollouts")
    save_figure(fig, ax, title, path)


if __name__ == "__main__":
    main()
