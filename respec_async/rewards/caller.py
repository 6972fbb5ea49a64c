"""The interface every reward source implements (ScoreRequest -> ScoreResult), and the rules
every call to a source follows (`Caller`: a concurrency slot, the per-try timeout, retries with
backoff and jitter, each on the next URL), and turning what a source returned into results."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import msgspec
import structlog

from respec_async.config import RewardSection

T = TypeVar("T")
log = structlog.get_logger("reward")


@dataclass(frozen=True)
class ScoreRequest:
    rollout_id: str  # "group_id:attempt:sample_index"
    prompt_text: str
    completion_text: str
    answer: str
    data_source: str


@dataclass
class ScoreResult:
    reward: float
    correct: bool
    extra: dict[str, Any] = field(default_factory=dict)
    error: str = ""  # set when scoring failed after every retry; the reward is then 0 and unearned
    source: str = ""  # the function or server that scored it (or failed to)


class Scorer(Protocol):
    stats: ScorerStats

    async def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]: ...

    async def close(self) -> None: ...


class RewardSourceError(Exception):
    """One failed call to a reward source; `kind` labels the metric (timeout, connection,
    http_500, bad_response, server_error, exception)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


class ScorerStats(msgspec.Struct):
    num_calls: int = 0  # calls to the source (a batch or one rollout), retries not counted
    num_attempts: int = 0  # tries, retries included
    num_retries: int = 0
    num_failed_calls: int = 0  # calls that failed after every retry
    num_failed_rollouts: int = 0  # rollouts returned with an error
    errors_by_kind: dict[str, int] = {}  # every failed try, by kind


def _backoff_s(cfg: RewardSection, retry: int) -> float:
    """Exponential backoff with jitter: uniform(0.5, 1) x min(base x 2^retry, cap)."""
    return min(cfg.retry_backoff_s * 2**retry, cfg.retry_backoff_max_s) * random.uniform(0.5, 1.0)


class Caller:
    """One call to a reward source under the shared rules: a concurrency slot, the per-try
    timeout, retries with backoff (each on the next target), and the counting and logging."""

    def __init__(self, cfg: RewardSection, targets: list[str], num_slots: int) -> None:
        self.cfg = cfg
        self.targets = targets
        self.slots = asyncio.Semaphore(num_slots)
        self.stats = ScorerStats()
        self._round_robin = itertools.count()

    async def call(self, attempt: Callable[[str], Awaitable[T]], rollout_ids: list[str]) -> tuple[T | None, str, str]:
        """Returns (value, target, "") on success, or (None, last target, error) once retries
        are exhausted."""
        first = next(self._round_robin)
        self.stats.num_calls += 1
        error = RewardSourceError("exception", "no attempt made")
        target = self.targets[first % len(self.targets)]
        for n in range(self.cfg.max_retries + 1):
            target = self.targets[(first + n) % len(self.targets)]
            if n:
                self.stats.num_retries += 1
                await asyncio.sleep(_backoff_s(self.cfg, n - 1))
            self.stats.num_attempts += 1
            try:
                async with self.slots:
                    return await asyncio.wait_for(attempt(target), self.cfg.timeout_s), target, ""
            except RewardSourceError as exc:
                error = exc
            except TimeoutError:
                error = RewardSourceError("timeout", f"no answer within {self.cfg.timeout_s}s")
            except Exception as exc:  # a user function's own exception, or a client library's
                error = RewardSourceError("exception", repr(exc)[:300])
            kinds = self.stats.errors_by_kind
            kinds[error.kind] = kinds.get(error.kind, 0) + 1
            log.warning("reward.try_failed", server=target, error=str(error)[:300], kind=error.kind, attempt=n,
                        rollout_ids=rollout_ids[:8], num_rollouts=len(rollout_ids))
        self.stats.num_failed_calls += 1
        self.stats.num_failed_rollouts += len(rollout_ids)
        return None, target, str(error)[:500]


def number(value: Any, what: str) -> float:
    # bool is an int; a string (even "1.0"), None, NaN or inf is a bad answer.
    if not isinstance(value, (int, float)):
        raise RewardSourceError("bad_response", f"{what} is {type(value).__name__} {str(value)[:80]!r}, not a number")
    reward = float(value)
    if not math.isfinite(reward):
        raise RewardSourceError("bad_response", f"{what} is {reward}")
    return reward


def to_result(value: Any, source: str, what: str = "reward", key: str = "score") -> ScoreResult:
    """A number, or a dict with `key` (verl's "score"; "reward" for per-sample HTTP; the other
    of the two if `key` is missing), into a result; a dict's other scalar keys become `extra`
    (logged), its `acc` (if any) says correct."""
    extra: dict[str, Any] = {}
    if isinstance(value, dict):
        if key not in value:
            key = "reward" if key == "score" else "score"
        if key not in value:
            raise RewardSourceError("bad_response", f"{what} is a dict without 'score' or 'reward': {sorted(value)[:8]}")
        extra = {k: v for k, v in value.items() if k != key and isinstance(v, (int, float, str, bool))}
        value = value[key]
    reward = number(value, what)
    correct = bool(extra["acc"]) if "acc" in extra else reward >= 1.0
    return ScoreResult(reward=reward, correct=correct, extra=extra, source=source)


def expect_list(value: Any, n: int, what: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise RewardSourceError("bad_response", f"{what} is {type(value).__name__}, not a list")
    if len(value) != n:
        raise RewardSourceError("bad_response", f"{what} has {len(value)} values for {n} rollouts")
    return list(value)


def failed(n: int, source: str, error: str) -> list[ScoreResult]:
    return [ScoreResult(reward=0.0, correct=False, error=error, source=source) for _ in range(n)]
