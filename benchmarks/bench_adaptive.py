"""Gap 1 of ReSpec: SD speedup depends on the active batch size; the adaptive SD server follows it.

    .venv/bin/python benchmarks/bench_adaptive.py                  # the tiny zoo (trained if missing)
    .venv/bin/python benchmarks/bench_adaptive.py --profile runs/x/sd_profile.json --batch-sizes 1,8,64

One run, one process, one torch thread, on the zoo target + drafter:
1. Profile (respec_async.sd.measure.run_profile, as `respec profile` does) with the default grid
   on training prompts of the arithmetic task; print the fit and its error. --profile PATH
   reuses a profile instead.
2. Decode throughput vs active batch size B, for plain decoding, every static SD config of the
   grid and the adaptive scheduler: B slots fed from a queue of max(4B, 16) held-out prompts,
   each sampled until EOS (temperature 1, max --max-new-tokens); tokens/s counts the tokens
   emitted by the steps that ran with all B slots busy (the queue still non-empty), over the
   time of those steps, so B is the active batch size throughout what is measured. Modes run
   interleaved step by step (each mode its own engine, one step of each in turn) on the same
   prompts, so a change of load on the machine hits every mode alike.
3. A real RL generation phase: --stream-prompts held-out prompts x --group-size samples streamed
   through --max-batch-size slots until EOS (the long tail included), total time for plain,
   every static config and the adaptive scheduler, interleaved the same way, for --epochs
   epochs of the same prompts: each mode's engine keeps its history index (grids with
   history:s,t,n configs) from one epoch to the next, as a generator does.
Time is this process's CPU time by default (--clock cpu: on a machine shared with other jobs
the wall clock measures the neighbours); the JSON holds both clocks. Prints the tables and
PASS/MISS lines, writes benchmarks/results/bench_adaptive.json and bench_adaptive.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import make_prompts, resolve_paths  # noqa: E402

from respec_async.config import DEFAULT_SD_GRID  # noqa: E402
from respec_async.sd.grid import (  # noqa: E402
    PLAIN, config_key, engine_draft_budget, history_index_for, parse_grid, shadow_length)
from respec_async.sd.measure import profile_batch_sizes, run_profile  # noqa: E402
from respec_async.sd.profile import Profile  # noqa: E402
from respec_async.sd.scheduler import AdaptiveScheduler  # noqa: E402
from respec_async.sd.solver import SpeedupModel, format_profile  # noqa: E402
from respec_async.engine.checkpoint import load_pretrained  # noqa: E402
from respec_async.engine.drafter import Eagle3Drafter  # noqa: E402
from respec_async.engine.engine import Engine  # noqa: E402
from respec_async.engine.requests import Request  # noqa: E402
from respec_async.engine.sampling import SamplingParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_adaptive.json"
ADAPTIVE = "adaptive"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", help="target checkpoint dir (default: the zoo's)")
    parser.add_argument("--drafter", help="drafter dir (default: the zoo's)")
    parser.add_argument("--profile", help="a profile JSON to use instead of profiling first")
    parser.add_argument("--grid", default=" ".join(DEFAULT_SD_GRID), help="SD configs 's,t,n' separated by spaces")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    parser.add_argument("--profile-repeats", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds of every measurement (summed)")
    parser.add_argument("--stream-prompts", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2, help="RL generation phases of the same prompts")
    parser.add_argument("--max-batch-size", type=int, default=64, help="slots of the RL generation phase")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--min-speedup", type=float,
                        help="the adaptive scheduler's generator.sd_min_speedup (default: configs/respec.toml's)")
    parser.add_argument("--spread-siblings", action="store_true",
                        help="RL phase: every mode's engine spreads a wave over the groups (generator.history_spread_siblings)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.min_speedup is None:
        from respec_async.config import load_config
        respec_toml = Path(__file__).resolve().parents[1] / "configs" / "respec.toml"
        args.min_speedup = load_config(respec_toml).generator.sd_min_speedup
    return args


class Timer:
    """Both clocks around a piece of work."""

    def __init__(self) -> None:
        self.seconds = {"wall": 0.0, "cpu": 0.0}

    def start(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        self.seconds["wall"] += time.perf_counter() - self._wall
        self.seconds["cpu"] += time.process_time() - self._cpu


class ModeRun:
    """One mode (plain, a static config or the adaptive scheduler) generating `prompts` through
    batch_size slots, one engine step at a time; with full_only it stops before the first step
    that would not have every slot busy (the queue ran dry)."""

    def __init__(self, target, drafter, profile: Profile, mode: str, prompts: list[list[int]],
                 params: SamplingParams, batch_size: int, full_only: bool, seed: int, min_speedup: float = 1.0,
                 spread_siblings: bool = False) -> None:
        configs = profile.configs
        self.engine = Engine(target, drafter, max_batch_size=batch_size,
                             max_seq_len=max(len(p) for p in prompts) + params.max_new_tokens + 1, seed=seed,
                             max_draft_tokens=engine_draft_budget(configs), history=history_index_for(configs),
                             shadow_length=shadow_length(configs) if mode == ADAPTIVE else 0,
                             spread_siblings=spread_siblings)
        self.scheduler = (AdaptiveScheduler(SpeedupModel(profile), batch_size, min_speedup=min_speedup)
                          if mode == ADAPTIVE else None)
        self.static = None if mode in (PLAIN, ADAPTIVE) else next(c for c in configs if config_key(c) == mode)
        self.params = params
        self.batch_size, self.full_only = batch_size, full_only
        self.add(prompts)

    def add(self, prompts: list[list[int]]) -> None:
        """Queue prompts (another epoch: the engine and its history stay) and restart the counts."""
        start = len(self.engine.step_stats) + 10 ** 6 * getattr(self, "epoch", 0)
        self.epoch = getattr(self, "epoch", 0) + 1
        for i, prompt in enumerate(prompts):
            self.engine.add_request(Request(start + i, prompt, self.params))
        self.timer = Timer()
        self.num_tokens = self.num_steps = 0
        self.done = False

    def step(self) -> None:
        engine = self.engine
        active = engine.num_active
        if not engine.has_unfinished or (self.full_only and not (active == self.batch_size and engine.slots.waiting)):
            self.done = True
            return
        refilling = engine.refilling
        scheduler = self.scheduler
        sd = scheduler.choose(active, refilling) if scheduler is not None else self.static
        step_start = scheduler.clock() if scheduler is not None else 0.0
        self.timer.start()
        engine.step(sd)
        self.timer.stop()
        stats = engine.last_step
        if scheduler is not None:
            scheduler.observe(stats, scheduler.clock() - step_start)
        self.num_steps += 1
        self.num_tokens += stats.num_emitted

    def result(self) -> dict:
        out = {"tokens": self.num_tokens, "steps": self.num_steps, "seconds": self.timer.seconds}
        if self.scheduler is not None:
            out["scheduler"] = self.scheduler.report(reset=False)
            out["scheduler"]["total_steps"] = dict(self.scheduler.total_steps)
        return out


def run_modes(target, drafter, profile: Profile, modes: list[str], prompts: list[list[int]],
              params: SamplingParams, batch_size: int, full_only: bool, seed: int,
              min_speedup: float = 1.0, epochs: int = 1, spread_siblings: bool = False) -> list[dict[str, dict]]:
    """Every mode on the same prompts, interleaved step by step (a round robin over the modes'
    engines), so a change of load on a shared machine hits every mode alike; per epoch (the
    same prompts again, each engine keeping its history), each mode's result."""
    runs = {mode: ModeRun(target, drafter, profile, mode, prompts, params, batch_size, full_only, seed, min_speedup,
                          spread_siblings) for mode in modes}
    results = []
    for epoch in range(epochs):
        if epoch:
            for run in runs.values():
                run.add(prompts)
        while not all(run.done for run in runs.values()):
            for run in runs.values():
                if not run.done:
                    run.step()
        results.append({mode: run.result() for mode, run in runs.items()})
    return results


def accumulate(cell: dict, result: dict) -> None:
    cell["tokens"] += result["tokens"]
    cell["steps"] += result["steps"]
    for k in ("wall", "cpu"):
        cell["seconds"][k] += result["seconds"][k]
    if "scheduler" in result:
        cell["scheduler"] = result["scheduler"]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    target_dir, drafter_dir, tokenizer_path = resolve_paths(args)
    target = load_pretrained(target_dir).eval()
    drafter = Eagle3Drafter.load_pretrained(drafter_dir, target.embed_tokens).eval()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    heldout, eos_id = make_prompts(tokenizer_path, target.config.vocab_size, max(4 * max(batch_sizes), 16,
                                                                                  args.stream_prompts))
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                            stop_token_ids=(eos_id,) if eos_id is not None else ())
    if args.profile:
        profile = Profile.load(args.profile)
    else:
        from respec_async.engine.tokenizer import Tokenizer
        from respec_async.tasks import arithmetic
        from respec_async.zoo import encode_prompt
        tokenizer = Tokenizer.from_file(tokenizer_path)
        train = [encode_prompt(tokenizer, p.prompt) for p in arithmetic.problems(64, seed=0, split="train")]
        print(f"profiling {len(parse_grid(args.grid.split()))} configs at batch sizes "
              f"{profile_batch_sizes(max(batch_sizes))} ...", flush=True)
        profile = run_profile(target, drafter, parse_grid(args.grid.split()), profile_batch_sizes(max(batch_sizes)),
                              train, params, repeats=args.profile_repeats, clock=args.clock,
                              meta={"target": str(target_dir), "drafter": str(drafter_dir)})
    print(format_profile(profile), flush=True)
    modes = [PLAIN, *profile.sd_s, ADAPTIVE]
    clock = args.clock

    # 2. Throughput at a fixed active batch size.
    cells: dict[int, dict[str, dict]] = {b: {} for b in batch_sizes}
    for rep in range(args.repeats):
        for batch_size in batch_sizes:
            prompts = heldout[:max(4 * batch_size, 16)]
            results, = run_modes(target, drafter, profile, modes, prompts, params, batch_size, True, seed=rep,
                                 min_speedup=args.min_speedup)
            for mode, result in results.items():
                accumulate(cells[batch_size].setdefault(mode, {"tokens": 0, "steps": 0,
                                                               "seconds": {"wall": 0.0, "cpu": 0.0}}), result)
    rows = []
    print(f"\ndecode throughput at a fixed active batch size ({clock} clock): plain tok/s, then each mode's "
          f"speedup over plain")
    header = ["B", "plain t/s"] + [m for m in modes[1:]] + ["best", "adapt/best"]
    print(" | ".join(f"{h:>9}" for h in header))
    for batch_size in batch_sizes:
        rates = {m: c["tokens"] / c["seconds"][clock] for m, c in cells[batch_size].items()}
        speedups = {m: rates[m] / rates[PLAIN] for m in modes}
        best = max((m for m in modes if m != ADAPTIVE), key=speedups.get)
        ratio = speedups[ADAPTIVE] / speedups[best]
        shares = cells[batch_size][ADAPTIVE]["scheduler"]["share"]
        rows.append({"batch_size": batch_size, "tokens_per_s": rates, "speedup": speedups, "best_static": best,
                     "adaptive_over_best": ratio, "adaptive_share": shares, "cells": cells[batch_size]})
        print(" | ".join([f"{batch_size:>9d}", f"{rates[PLAIN]:>9.0f}"] + [f"{speedups[m]:>9.2f}" for m in modes[1:]]
                         + [f"{best:>9}", f"{ratio:>9.2f}"]), flush=True)

    # 3. A real RL generation phase: groups streamed through the slots, long tail included.
    stream_prompts = [p for p in heldout[:args.stream_prompts] for _ in range(args.group_size)]
    epochs: list[dict[str, dict]] = [{} for _ in range(args.epochs)]
    for rep in range(args.repeats):
        per_epoch = run_modes(target, drafter, profile, modes, stream_prompts, params, args.max_batch_size, False,
                              seed=100 + rep, min_speedup=args.min_speedup, epochs=args.epochs,
                              spread_siblings=args.spread_siblings)
        for stream, results in zip(epochs, per_epoch):
            for mode, result in results.items():
                accumulate(stream.setdefault(mode, {"tokens": 0, "steps": 0, "seconds": {"wall": 0.0, "cpu": 0.0}}),
                           result)
    for epoch, stream in enumerate(epochs, start=1):
        best = min((m for m in modes if m not in (PLAIN, ADAPTIVE)), key=lambda m: stream[m]["seconds"][clock])
        print(f"\nRL generation phase, epoch {epoch}: {args.stream_prompts} prompts x {args.group_size} samples "
              f"through {args.max_batch_size} slots until EOS ({clock} clock)")
        print(f"{'mode':>16} | {'seconds':>8} | {'tokens':>7} | {'tok/s':>7} | vs plain")
        for mode in modes:
            c = stream[mode]
            print(f"{mode:>16} | {c['seconds'][clock]:8.2f} | {c['tokens']:7d} | "
                  f"{c['tokens'] / c['seconds'][clock]:7.0f} | x{stream[PLAIN]['seconds'][clock] / c['seconds'][clock]:.2f}")
        report = stream[ADAPTIVE]["scheduler"]
        print(f"adaptive (min speedup {args.min_speedup:g}): step shares {report['share']}, sources "
              f"{report['sources']}, predicted speedup {report['predicted_speedup']}, observed "
              f"{report['observed_speedup']}; best static {best}")
    stream = epochs[-1]
    best_static = min((m for m in modes if m not in (PLAIN, ADAPTIVE)), key=lambda m: stream[m]["seconds"][clock])

    checks = target_checks(rows, stream, best_static, clock)
    for name, (passed, detail) in checks.items():
        print(f"{'PASS' if passed else 'MISS'}  {name}: {detail}")
    model = SpeedupModel(profile)
    result = {"target": str(target_dir), "drafter": str(drafter_dir), "clock": clock, "threads": 1,
              "min_speedup": args.min_speedup,
              "temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
              "machine": platform.platform(), "torch": torch.__version__,
              "seconds": round(time.perf_counter() - started, 1),
              "profile": profile.to_dict(), "fit_error": model.fit_error(), "rows": rows,
              "stream": {"num_prompts": args.stream_prompts, "group_size": args.group_size,
                         "max_batch_size": args.max_batch_size, "best_static": best_static, "modes": stream,
                         "epochs": epochs},
              "checks": {name: {"pass": passed, "detail": detail} for name, (passed, detail) in checks.items()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(rows, stream, modes, clock, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')} ({result['seconds']:.0f} s)")


def target_checks(rows: list[dict], stream: dict, best_static: str, clock: str) -> dict[str, tuple[bool, str]]:
    checks = {}
    largest = rows[-1]
    losing = [m for m, s in largest["speedup"].items() if m not in (PLAIN, ADAPTIVE) and s < 1.0]
    static = [m for m in largest["speedup"] if m not in (PLAIN, ADAPTIVE)]
    checks[f"every static SD config falls below 1.0x at batch {largest['batch_size']}"] = (
        len(losing) == len(static), f"{len(losing)} of {len(static)} below 1.0x: " + ", ".join(
            f"{m} x{largest['speedup'][m]:.2f}" for m in static))
    worst = min(rows, key=lambda r: r["adaptive_over_best"])
    checks["adaptive >= 0.95x of the best option at every batch size"] = (
        worst["adaptive_over_best"] >= 0.95, "worst " + f"{worst['adaptive_over_best']:.3f} at batch "
        f"{worst['batch_size']} (best {worst['best_static']}); per batch: " + ", ".join(
            f"B={r['batch_size']} {r['adaptive_over_best']:.2f}" for r in rows))
    t = {m: c["seconds"][clock] for m, c in stream.items()}
    checks["RL generation phase (last epoch): adaptive >= 1.5x plain"] = (
        t[PLAIN] >= 1.5 * t[ADAPTIVE], f"x{t[PLAIN] / t[ADAPTIVE]:.2f}")
    checks["RL generation phase (last epoch): adaptive faster than plain"] = (
        t[ADAPTIVE] < t[PLAIN], f"{t[ADAPTIVE]:.2f} s vs {t[PLAIN]:.2f} s (x{t[PLAIN] / t[ADAPTIVE]:.2f})")
    checks["RL generation phase (last epoch): adaptive faster than the best static config"] = (
        t[ADAPTIVE] < t[best_static], f"{t[ADAPTIVE]:.2f} s vs {best_static} {t[best_static]:.2f} s "
        f"(x{t[best_static] / t[ADAPTIVE]:.2f})")
    return checks


def plot(rows: list[dict], stream: dict, modes: list[str], clock: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    sizes = [r["batch_size"] for r in rows]
    for mode in modes:
        style = dict(linewidth=3, color="black", marker="o") if mode == ADAPTIVE else dict(linewidth=1, marker=".")
        left.plot(sizes, [r["speedup"][mode] for r in rows], label=mode if mode != PLAIN else "plain (1.0)", **style)
    left.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    left.set_xscale("log", base=2)
    left.set_xlabel("active batch size")
    left.set_ylabel(f"decode throughput / plain ({clock} clock)")
    left.set_title("SD speedup vs active batch size")
    left.legend(fontsize=8, ncol=2)
    seconds = [stream[m]["seconds"][clock] for m in modes]
    colors = ["black" if m == ADAPTIVE else "tab:blue" for m in modes]
    right.bar(range(len(modes)), seconds, color=colors)
    right.set_xticks(range(len(modes)), modes, rotation=45)
    right.set_ylabel(f"seconds ({clock} clock)")
    right.set_title("RL generation phase: total generation time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
