"""A JSONL dataset of prompt/answer records, read in a deterministic, resumable order.

Each line is a JSON object with a string `prompt` and an `answer` (a string or a number; numbers
are kept as their text). Blank lines are skipped; any other bad line fails the load with an
error naming the file and the line number.

Order: epoch e visits every record once, in a permutation drawn from (seed, e). The dataset
keeps one counter, `position` (records handed out so far, across epochs), so the record at any
position is a pure function of (seed, position): saving `state_dict()` with a checkpoint and
loading it back resumes exactly where the run stopped.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DatasetError(ValueError):
    """A dataset file that cannot be used; the message names the file and the line."""


@dataclass(frozen=True)
class Record:
    prompt: str
    answer: str
    line_number: int  # 1-based line in the file, for error messages and provenance


def _parse_line(path: Path, line_number: int, line: str) -> Record:
    where = f"{path}:{line_number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object with 'prompt' and 'answer', got {type(row).__name__}")
    for key in ("prompt", "answer"):
        if key not in row:
            raise DatasetError(f"{where}: missing field {key!r}")
    prompt, answer = row["prompt"], row["answer"]
    if not isinstance(prompt, str) or not prompt:
        raise DatasetError(f"{where}: 'prompt' must be a non-empty string")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise DatasetError(f"{where}: 'answer' must be a string or a number, got {type(answer).__name__}")
    return Record(prompt=prompt, answer=str(answer), line_number=line_number)


def load_jsonl(path: str | Path) -> list[Record]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    records = []
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if line.strip():
                records.append(_parse_line(path, line_number, line))
    if not records:
        raise DatasetError(f"{path}: no records")
    return records


class JsonlDataset:
    def __init__(self, path: str | Path, seed: int = 0, shuffle: bool = True) -> None:
        self.path = Path(path)
        self.records = load_jsonl(self.path)
        self.seed = seed
        self.shuffle = shuffle
        self.position = 0
        self._order_epoch = -1
        self._order: list[int] = []

    def __len__(self) -> int:
        return len(self.records)

    def epoch_order(self, epoch: int) -> list[int]:
        """Indices of the records in the order epoch `epoch` visits them."""
        if epoch != self._order_epoch:
            order = list(range(len(self.records)))
            if self.shuffle:
                random.Random(f"jsonl:{self.seed}:{epoch}").shuffle(order)
            self._order, self._order_epoch = order, epoch
        return self._order

    def record_at(self, position: int) -> Record:
        epoch, offset = divmod(position, len(self.records))
        return self.records[self.epoch_order(epoch)[offset]]

    def next(self) -> Record:
        record = self.record_at(self.position)
        self.position += 1
        return record

    def take(self, num_records: int) -> list[Record]:
        return [self.next() for _ in range(num_records)]

    @property
    def epoch(self) -> int:
        return self.position // len(self.records)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "seed": self.seed, "num_records": len(self.records)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A different seed or file would silently change which records come next: refuse it.
        if state.get("seed") != self.seed or state.get("num_records") != len(self.records):
            raise DatasetError(
                f"{self.path}: saved position is for seed={state.get('seed')} with "
                f"{state.get('num_records')} records, this dataset has seed={self.seed} with {len(self.records)}")
        position = state["position"]
        if not isinstance(position, int) or position < 0:
            raise DatasetError(f"{self.path}: saved position must be a non-negative integer, got {position!r}")
        self.position = position
