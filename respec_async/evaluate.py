"""Held-out accuracy of an actor: `respec eval RUN_DIR` (initial model vs last checkpoint) or
`respec eval --model DIR CONFIG`.

Samples one completion per held-out prompt with the run's sampling settings (pass@1 at the
training temperature) and, separately, greedily, using the same engine the generators use,
and scores them with the task's rule reward. Prompts come from the task's held-out split,
which never overlaps the training stream.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import queue
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from respec_async.config import Config
from respec_async.engine.checkpoint import load_pretrained
from respec_async.engine.engine import Engine
from respec_async.engine.requests import Request
from respec_async.engine.tokenizer import Tokenizer
from respec_async.models import sampling_params
from respec_async.prompts import PromptSource
from respec_async.tasks import rule_reward


EVAL_SLOTS = 128


@dataclass
class EvalResult:
    model: str
    num_prompts: int
    sampled_accuracy: float  # at the run's temperature / top-p / top-k
    greedy_accuracy: float  # nan when not measured


def evaluate_model(config: Config, model_dir: Path | str, num_prompts: int | None = None, seed: int = 1234,
                   greedy: bool = True, num_threads: int = 1,
                   progress: Callable[[int], None] | None = None) -> EvalResult:
    """Held-out accuracy of the actor in model_dir: one sample per prompt at the run's sampling
    settings, and (with greedy) one greedy decode per prompt. `progress(n)` is told each time n
    more completions are done."""
    torch.set_num_threads(num_threads)
    model = load_pretrained(model_dir, dtype=torch.float32, device=config.model.device).eval()
    tokenizer = Tokenizer.from_dir(Path(config.model.path))
    prompts = PromptSource(config)
    n = num_prompts or config.data.eval_size
    examples = [prompts.eval_example(i) for i in range(n)]
    s = config.sampling
    # More slots than a generator uses: a tiny model on CPU decodes faster in wider batches.
    num_slots = min(n, max(config.generator.max_batch_size, EVAL_SLOTS))
    accuracies = []
    for temperature in (s.temperature, 0.0) if greedy else (s.temperature,):
        params = sampling_params(config, tokenizer, temperature)
        engine = Engine(model, None, max_batch_size=num_slots, max_seq_len=config.generator.max_seq_len, seed=seed)
        for i, ex in enumerate(examples):
            engine.add_request(Request(str(i), ex.prompt_ids, params))
        completions = {}
        with torch.inference_mode():
            while engine.has_unfinished:
                finished = engine.step()
                completions.update((c.request_id, c) for c in finished)
                if finished and progress is not None:
                    progress(len(finished))
        correct = 0
        for i, ex in enumerate(examples):
            text = tokenizer.decode(completions[str(i)].output_ids)
            correct += rule_reward(ex.data_source, text, ex.answer) >= 1.0
        accuracies.append(correct / n)
    return EvalResult(str(model_dir), n, accuracies[0], accuracies[1] if greedy else float("nan"))


def evaluate_run(run_dir: Path, num_prompts: int | None = None, greedy: bool = True,
                 show_progress: bool = True) -> tuple[EvalResult, EvalResult | None]:
    """(initial actor, last checkpoint) of a run; the second is None before any checkpoint.
    The two models are evaluated in two processes at once (one torch thread each); on a
    terminal a bar per model shows the completions done."""
    import msgspec

    from respec_async.training import latest_checkpoint

    config = msgspec.json.decode((run_dir / "config.json").read_bytes(), type=Config)
    checkpoint = latest_checkpoint(run_dir)
    total = min(num_prompts or config.data.eval_size, config.data.eval_size) * (2 if greedy else 1)
    with EvalProgress(show_progress) as bars:
        if checkpoint is None:
            task = bars.add("initial actor", total)
            return evaluate_model(config, config.model.path, num_prompts, greedy=greedy,
                                  progress=functools.partial(bars.advance, task) if bars.enabled else None), None
        context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
        with contextlib.ExitStack() as stack:
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=2, mp_context=context))
            # The workers' progress comes back through a queue, only where a bar shows it.
            done = stack.enter_context(context.Manager()).Queue() if bars.enabled else None
            tasks = [bars.add("initial actor", total), bars.add(f"checkpoint {checkpoint.name}", total)]
            futures = [pool.submit(evaluate_model, config, model, num_prompts, greedy=greedy,
                                   progress=functools.partial(_put, done, task) if done is not None else None)
                       for task, model in zip(tasks, (config.model.path, checkpoint / "actor"))]
            while done is not None and not all(f.done() for f in futures):
                try:
                    bars.advance(*done.get(timeout=0.2))
                except queue.Empty:
                    pass
            results = futures[0].result(), futures[1].result()
            while done is not None and not done.empty():  # the last reports before the bars close
                bars.advance(*done.get())
            return results


def _put(q, task: int, n: int) -> None:
    q.put((task, n))


class EvalProgress:
    """One bar per evaluated model on stderr (completions done of all asked), on a terminal."""

    def __init__(self, enabled: bool, console=None) -> None:
        self.bars = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            console = console or Console(stderr=True)
            if console.is_terminal:
                self.bars = Progress(TextColumn("eval {task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), console=console, transient=True)

    @property
    def enabled(self) -> bool:
        return self.bars is not None

    def __enter__(self) -> EvalProgress:
        if self.bars is not None:
            self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bars is not None:
            self.bars.stop()

    def add(self, description: str, total: int) -> int:
        return self.bars.add_task(description, total=total) if self.bars is not None else 0

    def advance(self, task: int, n: int) -> None:
        if self.bars is not None:
            self.bars.advance(task, n)
