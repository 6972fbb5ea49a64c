"""Reward role: scores rollout groups and passes them on to the trainer (and drafter learner).

Each group is scored in a task of its own, so many groups (and, for remote reward sources, many
requests) are in flight at once, bounded by `reward.max_concurrency`. The scoring source is
pluggable (respec_async.rewards): the tasks' rule rewards, a user Python function, or an HTTP
or native ZeroMQ reward server, all with the same timeout, retry and concurrency rules.

A rollout whose reward still fails after the retries is never silently scored 0. Per
`reward.on_error`:
- "drop": its whole group goes back to trainer-0 as a `ReturnedGroup`, and the trainer
  re-issues it (a new attempt; the first complete result of a group is the one trained on);
- "zero": it is scored 0, marked not correct, and counted in `ScoredGroup.num_reward_errors`.
Every failed rollout is logged (`reward.failed`, with the server, the error and the rollout id)
and counted. The counters, the source's retry counts and the role's busy share of wall time
are written to `<run_dir>/<role>.metrics.jsonl` every few seconds and at exit, and logged as
`reward.stats`.
"""

from __future__ import annotations

import asyncio
import time

import msgspec

from respec_async.actor import Actor, handles
from respec_async.endpoints import TRAINER
from respec_async.metrics import MetricsWriter
from respec_async.models import load_tokenizer
from respec_async.rewards import ScorerStats, ScoreRequest, make_scorer
from transport.schema import HOP_AT_REWARD, GroupMoved, ReturnedGroup, RewardHello, RolloutGroup, ScoredGroup

STATS_INTERVAL_S = 5.0
WARN_EVERY_S = 5.0  # failed rewards: at most one console warning this often


class RewardRecord(msgspec.Struct, kw_only=True):
    """The reward role's counters, cumulative since the role started."""

    time: float
    source: str
    on_error: str
    num_groups: int  # groups received
    num_groups_scored: int  # sent on as ScoredGroup (with or without zeroed rollouts)
    num_groups_dropped: int  # returned to the trainer because a reward failed ("drop")
    num_rollouts_scored: int
    num_rollouts_failed: int  # rollouts whose reward failed after all retries
    num_rollouts_zeroed: int  # ... of which scored 0 ("zero")
    num_rollouts_dropped: int  # rollouts in dropped groups
    num_group_errors: int  # groups returned because of an error of the role itself
    busy_s: float  # wall time with at least one group being scored
    wall_s: float
    busy_share: float
    scorer: ScorerStats


class RewardActor(Actor):
    async def setup(self) -> None:
        cfg = self.ctx.config
        self.tokenizer = await self.run_blocking(load_tokenizer, cfg)
        self.scorer = make_scorer(cfg)
        self.at_teardown(self.scorer.close)
        self.on_error = cfg.reward.on_error
        self.slots = asyncio.Semaphore(cfg.reward.max_concurrency)
        self.tasks: set[asyncio.Task[None]] = set()
        self.consumers = [TRAINER] + self.ctx.endpoints.roles("drafter_learner")
        self.started = time.perf_counter()
        self.num_active = 0
        self.busy_since = 0.0
        self.busy_s = 0.0
        self.num_groups = self.num_groups_scored = self.num_groups_dropped = self.num_group_errors = 0
        self.num_rollouts_scored = self.num_rollouts_failed = self.num_rollouts_zeroed = 0
        self.num_rollouts_dropped = 0
        self.metrics = MetricsWriter(self.ctx.run_dir / f"{self.name}.metrics.jsonl")
        self.at_teardown(self._stop_scoring)
        self.warned_at = -WARN_EVERY_S
        self.num_unwarned = 0
        if self.ctx.restart_count:
            # Before any group reaches this incarnation: what the trainer re-issues is what the dead
            # one held, not what is already on its way here.
            await self.send(TRAINER, RewardHello(role=self.name, restart_count=self.ctx.restart_count))

    async def main(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            self._write_stats()

    @handles
    async def on_rollout_group(self, message: RolloutGroup) -> None:
        await self.send(TRAINER, GroupMoved(group_id=message.group.group_id, attempt=message.group.attempt,
                                                hop=HOP_AT_REWARD, holder=self.name))
        # The slot is taken inside the task, so the mailbox drains and every group held here is
        # acknowledged at once (admission bounds how many can be out).
        task = asyncio.create_task(self._score(message))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _busy(self, delta: int) -> None:
        """Busy time is wall time with at least one group in scoring (overlaps count once)."""
        now = time.perf_counter()
        if delta > 0 and self.num_active == 0:
            self.busy_since = now
        self.num_active += delta
        if delta < 0 and self.num_active == 0:
            self.busy_s += now - self.busy_since

    async def _score(self, message: RolloutGroup) -> None:
        await self.slots.acquire()
        group = message.group
        self.num_groups += 1
        self._busy(+1)
        try:
            started = time.perf_counter()
            requests = [
                ScoreRequest(
                    rollout_id=f"{group.group_id}:{group.attempt}:{r.sample_index}",
                    prompt_text=group.prompt_text,
                    completion_text=self.tokenizer.decode(r.completion_ids),
                    answer=group.answer,
                    data_source=group.data_source,
                )
                for r in message.rollouts
            ]
            results = await self.scorer.score(requests)
            failed = [(q, r) for q, r in zip(requests, results) if r.error]
            for request, result in failed:
                self.log.warning("reward.failed", server=result.source, error=result.error,
                                 rollout_id=request.rollout_id, on_error=self.on_error)
            self.num_rollouts_failed += len(failed)
            if failed:
                await self._warn_failed(len(failed), failed[0][1])
            if failed and self.on_error == "drop":
                self.num_groups_dropped += 1
                self.num_rollouts_dropped += len(requests)
                reason = f"reward failed for {len(failed)}/{len(requests)} rollouts: {failed[0][1].error}"
                await self.send(TRAINER, ReturnedGroup(group=group, reason=reason[:500]))
                return
            for request, result in zip(requests, results):
                if result.extra:  # the source's other keys (a dict's non-score keys, extra_logs)
                    self.log.debug("reward.extra", server=result.source, rollout_id=request.rollout_id,
                                   extra=result.extra)
            scored = ScoredGroup(
                group=group, rollouts=message.rollouts,
                rewards=[0.0 if r.error else r.reward for r in results],
                correct=[False if r.error else r.correct for r in results],
                generator=message.generator, generation_s=message.generation_s,
                scoring_s=time.perf_counter() - started, num_reward_errors=len(failed),
            )
            self.num_rollouts_zeroed += len(failed)
            self.num_rollouts_scored += len(results) - len(failed)
            self.num_groups_scored += 1
            for consumer in self.consumers:
                await self.send(consumer, scored)
        except Exception as exc:
            # An error of this role (not of the reward source): never lose the group.
            self.num_group_errors += 1
            self.log.error("reward.group_failed", group_id=group.group_id, error=repr(exc))
            await self.send(TRAINER, ReturnedGroup(group=group, reason=repr(exc)[:500]))
        finally:
            self._busy(-1)
            self.slots.release()

    async def _warn_failed(self, num_rollouts: int, first) -> None:
        """One line above the live view per WARN_EVERY_S at most, counting the failures since."""
        self.num_unwarned += num_rollouts
        now = time.monotonic()
        if now - self.warned_at < WARN_EVERY_S:
            return
        self.warned_at = now
        await self.notify("reward.failed", level="warning", num_rollouts=self.num_unwarned, server=first.source,
                          error=first.error[:200], on_error=self.on_error)
        self.num_unwarned = 0

    def busy_seconds(self) -> float:
        """Wall time with at least one group being scored (the source may be a remote server)."""
        return self.busy_s + (time.perf_counter() - self.busy_since if self.num_active else 0.0)

    def record(self) -> RewardRecord:
        now = time.perf_counter()
        busy_s = self.busy_seconds()
        wall_s = now - self.started
        return RewardRecord(
            time=time.time(), source=self.ctx.config.reward.source, on_error=self.on_error,
            num_groups=self.num_groups, num_groups_scored=self.num_groups_scored,
            num_groups_dropped=self.num_groups_dropped, num_rollouts_scored=self.num_rollouts_scored,
            num_rollouts_failed=self.num_rollouts_failed, num_rollouts_zeroed=self.num_rollouts_zeroed,
            num_rollouts_dropped=self.num_rollouts_dropped, num_group_errors=self.num_group_errors,
            busy_s=busy_s, wall_s=wall_s, busy_share=busy_s / wall_s if wall_s > 0 else 0.0,
            scorer=self.scorer.stats,
        )

    def _write_stats(self) -> None:
        record = self.record()
        self.metrics.write(record)
        fields = msgspec.to_builtins(record)
        scorer = fields.pop("scorer")
        self.log.info("reward.stats", **fields, **{f"scorer_{k}": v for k, v in scorer.items()})

    async def _stop_scoring(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self._write_stats()
        self.metrics.close()
