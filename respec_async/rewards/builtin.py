"""`reward.source = "builtin"`: the task's own rule reward (respec_async.tasks.rule_reward)."""

from __future__ import annotations

from respec_async.rewards.caller import ScoreRequest, ScoreResult, ScorerStats
from respec_async.tasks import rule_reward


class BuiltinScorer:
    """The task's own rule reward; cheap, so it runs inline on the event loop."""

    def __init__(self) -> None:
        self.stats = ScorerStats()

    async def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        results = []
        self.stats.num_calls += 1
        for r in requests:
            try:
                reward = rule_reward(r.data_source, r.completion_text, r.answer)
            except ValueError as exc:  # a data source without a rule: retrying cannot help
                self.stats.num_failed_rollouts += 1
                results.append(ScoreResult(reward=0.0, correct=False, error=str(exc), source="builtin"))
                continue
            results.append(ScoreResult(reward=reward, correct=reward >= 1.0, source="builtin"))
        return results

    async def close(self) -> None:
        pass
