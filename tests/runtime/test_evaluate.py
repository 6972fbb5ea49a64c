"""`respec eval`'s progress: the evaluation reports every completion it finishes, and on a
terminal a bar per model counts them."""

from __future__ import annotations

import io

from rich.console import Console

from respec_async.config import config_from_dict
from respec_async.evaluate import EvalProgress, evaluate_model
from tests.roles.conftest import random_actor_dir  # noqa: F401  (fixture)


def test_evaluation_reports_each_finished_completion(random_actor_dir):  # noqa: F811
    config = config_from_dict({"model": {"path": str(random_actor_dir)}, "data": {"eval_size": 6},
                               "sampling": {"max_new_tokens": 8}, "generator": {"max_batch_size": 4}})
    reports: list[int] = []
    result = evaluate_model(config, random_actor_dir, greedy=True, progress=reports.append)
    assert result.num_prompts == 6 and sum(reports) == 12  # 6 sampled + 6 greedy
    assert all(n > 0 for n in reports)


def test_on_a_terminal_a_bar_per_model_counts_completions_and_off_one_nothing_shows():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with EvalProgress(True, console) as bars:
        task = bars.add("initial actor", 10)
        bars.advance(task, 4)
        rendered = Console(file=io.StringIO(), record=True, width=100)
        rendered.print(bars.bars.get_renderable())
        text = rendered.export_text()
        assert "eval initial actor" in text and "4/10" in text
    quiet = EvalProgress(True, Console(file=io.StringIO(), force_terminal=False))
    assert not quiet.enabled and quiet.add("x", 3) == 0
    quiet.advance(0, 3)  # a no-op off a terminal
