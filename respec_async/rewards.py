"""Reward sources behind one interface: `await scorer.score(requests) -> results`.

`make_scorer(config)` picks the source from `reward.source`. Today: `builtin`, the rule reward
of each sample's task (the zoo arithmetic task, or math final-answer exact match). User
functions and reward servers (python:, http://, zmq://) implement the same `Scorer` protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from respec_async.config import Config
from respec_async.prompts import rule_reward


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


class Scorer(Protocol):
    async def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]: ...


class BuiltinScorer:
    """The task's own rule reward; cheap, so it runs inline on the event loop."""

    async def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        results = []
        for r in requests:
            reward = rule_reward(r.data_source, r.completion_text, r.answer)
            results.append(ScoreResult(reward=reward, correct=reward >= 1.0))
        return results


def make_scorer(config: Config) -> Scorer:
    source = config.reward.source
    if source == "builtin":
        return BuiltinScorer()
    raise ValueError(f"reward.source: unsupported source {source!r} (supported: builtin)")
