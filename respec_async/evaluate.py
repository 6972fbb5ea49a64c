"""Held-out accuracy of an actor: `respec eval RUN_DIR` (initial model vs last checkpoint) or
`respec eval --model DIR CONFIG`.

Samples one completion per held-out prompt with the run's sampling settings (pass@1 at the
training temperature) and, separately, greedily, using the same engine the generators use,
and scores them with the task's rule reward. Prompts come from the task's held-out split,
which never overlaps the training stream.
"""

from __future__ import annotations

import multiprocessing
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
                   greedy: bool = True, num_threads: int = 1) -> EvalResult:
    """Held-out accuracy of the actor in model_dir: one sample per prompt at the run's sampling
    settings, and (with greedy) one greedy decode per prompt."""
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
        requests = [Request(str(i), ex.prompt_ids, params) for i, ex in enumerate(examples)]
        with torch.inference_mode():
            completions = {c.request_id: c for c in engine.generate(requests, None)}
        correct = 0
        for i, ex in enumerate(examples):
            text = tokenizer.decode(completions[str(i)].output_ids)
            correct += rule_reward(ex.data_source, text, ex.answer) >= 1.0
        accuracies.append(correct / n)
    return EvalResult(str(model_dir), n, accuracies[0], accuracies[1] if greedy else float("nan"))


def evaluate_run(run_dir: Path, num_prompts: int | None = None,
                 greedy: bool = True) -> tuple[EvalResult, EvalResult | None]:
    """(initial actor, last checkpoint) of a run; the second is None before any checkpoint.
    The two models are evaluated in two processes at once (one torch thread each)."""
    import msgspec

    from respec_async.training import latest_checkpoint

    config = msgspec.json.decode((run_dir / "config.json").read_bytes(), type=Config)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        return evaluate_model(config, config.model.path, num_prompts, greedy=greedy), None
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
    with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        before = pool.submit(evaluate_model, config, config.model.path, num_prompts, greedy=greedy)
        after = pool.submit(evaluate_model, config, checkpoint / "actor", num_prompts, greedy=greedy)
        return before.result(), after.result()
