"""Reward role: scores rollout groups and passes them on to the trainer (and drafter learner).

Each group is scored in a task of its own, so many groups (and, for remote reward sources, many
requests) are in flight at once, bounded by `reward.max_concurrency`. The scoring source is
pluggable (respec_async.rewards): the built-in rule rewards of the tasks today; user functions
and reward servers plug in behind the same interface.
"""

from __future__ import annotations

import asyncio
import time

from respec_async.actor import Actor, handles
from respec_async.models import load_tokenizer
from respec_async.rewards import ScoreRequest, make_scorer
from transport.schema import ReturnedGroup, RolloutGroup, ScoredGroup


class RewardActor(Actor):
    async def setup(self) -> None:
        cfg = self.ctx.config
        self.tokenizer = await self.run_blocking(load_tokenizer, cfg)
        self.scorer = make_scorer(cfg)
        self.slots = asyncio.Semaphore(cfg.reward.max_concurrency)
        self.tasks: set[asyncio.Task[None]] = set()
        self.busy_s = 0.0
        self.consumers = ["trainer-0"] + [n for n in self.ctx.endpoints.inboxes if n.startswith("drafter_learner-")]

    @handles
    async def on_rollout_group(self, message: RolloutGroup) -> None:
        await self.slots.acquire()
        task = asyncio.create_task(self._score(message))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _score(self, message: RolloutGroup) -> None:
        try:
            started = time.perf_counter()
            group = message.group
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
            scored = ScoredGroup(
                group=group, rollouts=message.rollouts, rewards=[r.reward for r in results],
                correct=[r.correct for r in results], generator=message.generator,
                generation_s=message.generation_s, scoring_s=time.perf_counter() - started,
            )
            self.busy_s += scored.scoring_s
            for consumer in self.consumers:
                await self.send(consumer, scored)
        except Exception as exc:
            # Never lose a group: hand it back to the trainer, which re-issues it.
            self.log.error("reward.group_failed", group_id=message.group.group_id, error=repr(exc))
            await self.send("trainer-0", ReturnedGroup(group=message.group, reason=repr(exc)[:500]))
        finally:
            self.slots.release()
