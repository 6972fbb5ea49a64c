"""The end-of-run summary printed by `respec launch`, and `respec eval`'s table.

The summary states what a user wants to know first: did reward go up (mean of the first ten
steps vs the last ten), did held-out accuracy go up (initial actor vs final checkpoint), how
fast, how stale, every prompt group's fate (the ledger's audit), and where the plots and logs are.
"""

from __future__ import annotations

from pathlib import Path

from respec_async.evaluate import EvalResult, evaluate_run
from respec_async.ledger import audit_run
from respec_async.metrics import read_metrics


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def print_eval(run_dir: Path, num_prompts: int | None = None, greedy: bool = True) -> tuple[EvalResult, EvalResult | None]:
    before, after = evaluate_run(run_dir, num_prompts, greedy=greedy)
    how = "sampled at the run's temperature / greedy" if greedy else "sampled at the run's temperature"

    def cells(result: EvalResult) -> str:
        text = f"{100 * result.sampled_accuracy:5.1f}%"
        return text + (f" / {100 * result.greedy_accuracy:5.1f}%" if greedy else "")

    print(f"held-out accuracy on {before.num_prompts} prompts ({how}):")
    print(f"  initial actor    {cells(before)}")
    if after is not None:
        print(f"  last checkpoint  {cells(after)}")
        change = f"{100 * (after.sampled_accuracy - before.sampled_accuracy):+5.1f} points"
        if greedy:
            change += f" / {100 * (after.greedy_accuracy - before.greedy_accuracy):+5.1f} points"
        print(f"  change           {change}")
    return before, after


def print_summary(run_dir: Path, final_eval: bool = True) -> None:
    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        print(f"run {run_dir}: no training steps recorded")
        return
    first = _mean([r.reward_mean for r in records[:10]])
    last = _mean([r.reward_mean for r in records[-10:]])
    wall_s = records[-1].time - records[0].time
    print()
    print(f"run {run_dir.name}: {len(records)} steps in {wall_s:.0f}s "
          f"({sum(r.num_tokens for r in records) / max(wall_s, 1e-9):.0f} completion tokens/s overall)")
    print(f"  mean reward      first 10 steps {first:.3f} -> last 10 steps {last:.3f} ({last - first:+.3f})")
    print(f"  staleness        max {max(r.staleness_max for r in records)} versions behind")
    ledger = audit_run(run_dir)
    if ledger is not None:
        print(f"  groups           {ledger.summary()}")
    accept = [r.acceptance_length for r in records if r.acceptance_length]
    if accept:
        print(f"  SD acceptance    {_mean(accept):.2f} tokens per verify step")
    if final_eval:
        # Sampled accuracy only (the quantity RL optimises); `respec eval RUN_DIR` adds greedy.
        print_eval(run_dir, greedy=False)
    print(f"  report: respec report {run_dir}    metrics: {run_dir / 'metrics.jsonl'}    logs: {run_dir / 'logs'}")
