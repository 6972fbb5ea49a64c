"""Prompts for the trainer and the evaluator, and the rule reward that scores their answers.

A `PromptSource` maps a position in the data stream to an `Example` deterministically, so the
trainer's data position is a single integer (group_id) and a resumed run sees the same prompts.
The zoo's arithmetic task (its long-tail variant, and the same sums asked in words for
pretrained chat models) and JSONL prompt/answer files (GSM8K-style, scored by final-answer
exact match) are supported.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from respec_async.config import Config
from respec_async.engine.tokenizer import Tokenizer
from respec_async.tasks import arithmetic
from respec_async.tasks.dataset import JsonlDataset


@dataclass(frozen=True)
class Example:
    prompt_ids: list[int]
    prompt_text: str
    answer: str
    data_source: str  # which rule scores it: "arithmetic" | "addition" | "math"


class PromptSource:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.tokenizer = Tokenizer.from_dir(Path(config.model.path))
        self.dataset = JsonlDataset(config.data.path, seed=config.run.seed) if config.data.task == "jsonl" else None
        self._order_epoch, self._order = -1, []

    def _example(self, prompt: str, answer: str, data_source: str) -> Example:
        if self.config.data.chat_template:
            # The template writes its own start tokens (HF's apply_chat_template adds none).
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            return Example(self.tokenizer.encode(prompt), prompt, answer, data_source)
        ids = self.tokenizer.encode(prompt)
        if self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id, *ids]
        return Example(ids, prompt, answer, data_source)

    def _arithmetic_example(self, p: arithmetic.Problem) -> Example:
        if self.config.data.task == "chat-addition":
            return self._example(arithmetic.chat_question(p), p.answer, "addition")
        return self._example(p.prompt, p.answer, "arithmetic")

    def train_example(self, position: int) -> Example:
        if self.dataset is not None:
            record = self.dataset.record_at(position)
            return self._example(record.prompt, record.answer, "math")
        p = arithmetic.problem(self._train_index(position), seed=self.config.run.seed, split="train",
                               **self._digits())
        return self._arithmetic_example(p)

    def _digits(self) -> dict:
        return arithmetic.TASKS[self.config.data.task]

    def _train_index(self, position: int) -> int:
        """The arithmetic problem at this stream position: itself, or with data.train_size = N
        the epoch's permutation of problems 0..N-1."""
        size = self.config.data.train_size
        if not size:
            return position
        epoch, offset = divmod(position, size)
        if self._order_epoch != epoch:
            self._order = list(range(size))
            random.Random(f"train-order:{self.config.run.seed}:{epoch}").shuffle(self._order)
            self._order_epoch = epoch
        return self._order[offset]

    def eval_example(self, index: int) -> Example:
        if self.dataset is not None:
            raise ValueError("data.task = \"jsonl\": held-out evaluation needs the arithmetic task")
        p = arithmetic.problem(index, seed=self.config.run.seed, split="heldout", **self._digits())
        return self._arithmetic_example(p)
