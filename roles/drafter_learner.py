"""Drafter-learner role: online, reward-weighted distillation of the drafter from the evolving
actor (ReSpec's drafter learner), pushed to the generators every I actor versions.

- Scored rollout groups arrive from the reward role(s) into a bounded replay buffer.
- The learner is a member of the trainer's "actor" weight group: new actor weights are received
  by their own task while it trains and swapped into its copy of the actor between two
  drafter steps.
- Drafter steps (`respec_async.drafter_learning`) run in the compute thread, paced by the data.
- It owns the "drafter" weight group (members: the generators). Once the actor version it holds
  is >= the version of the last published drafter + `drafter.update_interval`, and it has trained
  on that version, it broadcasts the drafter; generators swap it in at a step boundary.
- Checkpoints: when a published drafter's version crosses a multiple of `drafter.checkpoint_every`,
  and at a clean shutdown, the drafter, its optimizer and counters go to
  `<run_dir>/drafter_checkpoints/step-N` (N = drafter steps; the newest 2 are kept). A learner
  that starts with a checkpoint there (restarted by the supervisor, or `respec launch --resume`)
  continues from the latest one (`drafter_learner.resumed`) and, once it holds the actor, publishes
  the restored drafter to every generator: they may hold the offline one (a resumed run, a
  restarted generator) or a later one of the learner that died. A checkpoint of another drafter
  fails the start with an error naming the checkpoint and the mismatch.

Metrics: `drafter.step` / `drafter.published` log events, and `<run_dir>/drafter_learner-0.metrics.jsonl`
with one record per drafter optimizer step (loss, weights, estimated acceptance length, actor
and drafter versions, lag) and one per publish (kind = "publish").
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import msgspec
import torch

from respec_async.actor import Actor, handles
from respec_async.config import generator_uses_drafter
from respec_async.drafter_learning import (DrafterLearner, drafter_checkpoints_dir, drafter_step_share,
                                           latest_drafter_checkpoint)
from respec_async.endpoints import TRAINER
from respec_async.metrics import MetricsWriter
from respec_async.models import load_drafter, load_target
from respec_async.weight_sync import WeightMember, WeightOwner
from transport.schema import GroupFormation, ScoredGroup, WeightsJoin, WeightsRejoin, WeightsUpdate


class DrafterLearnerRecord(msgspec.Struct, kw_only=True):
    """One line of the learner's metrics file."""

    kind: str  # "step" (a drafter optimizer step) or "publish" (a drafter broadcast)
    time: float
    actor_version: int  # the trainer's policy version the learner holds
    drafter_version: int  # the actor version the drafter was last trained against
    drafter_lag: int  # actor_version - drafter_version (for "publish": versions since the previous one)
    step: int = 0  # drafter optimizer steps so far
    loss: float = 0.0  # weighted unrolled KD loss of the step
    loss_per_step: list[float] = []
    accept_prob_per_step: list[float] = []
    estimated_acceptance_length: float = 0.0  # from the step's batch, before its update
    weight_mean: float = 0.0
    weight_min: float = 0.0
    weight_max: float = 0.0
    reward_mean: float = 0.0
    num_samples: int = 0
    num_tokens: int = 0
    seconds: float = 0.0
    buffer_size: int = 0
    num_received: int = 0  # rollouts received so far
    num_published: int = 0
    published_version: int = -1


class DrafterLearnerActor(Actor):
    async def setup(self) -> None:
        cfg = self.ctx.config
        torch.set_num_threads(cfg.drafter.num_threads)
        target, tokenizer = await self.run_blocking(load_target, cfg)
        drafter = await self.run_blocking(load_drafter, cfg, target)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.core = DrafterLearner(cfg, target, drafter, pad_id)
        unusable: list[tuple[Path, str]] = []
        self.resumed_from = latest_drafter_checkpoint(self.ctx.run_dir, lambda path, why: unusable.append((path, why)))
        for path, reason in unusable:
            self.log.warning("drafter_learner.checkpoint_unusable", checkpoint=str(path), reason=reason)
            await self.notify("drafter_learner.checkpoint_unusable", level="warning", checkpoint=path.name,
                              reason=reason)
        if self.resumed_from is not None:
            await self.run_blocking(self.core.load_checkpoint, self.resumed_from)
            self.log.info("drafter_learner.resumed", checkpoint=str(self.resumed_from),
                          version=self.core.drafter_version, step=self.core.num_steps)
            await self.notify("drafter_learner.resumed", version=self.core.drafter_version, step=self.core.num_steps,
                              checkpoint=self.resumed_from.name)
        self.checkpointed_step = self.core.num_steps
        self.generators = self.ctx.endpoints.roles("generator")
        members = self.generators if generator_uses_drafter(cfg) else []
        timeout = cfg.trainer.weight_sync_timeout_s
        self.actor_weights = WeightMember(self, "actor", TRAINER, timeout, cfg.model.device)
        self.drafter_weights = WeightOwner(self, "drafter", members, timeout, cfg.model.device)
        self.data_arrived = asyncio.Event()
        self.metrics = MetricsWriter(self.ctx.run_dir / f"{self.name}.metrics.jsonl")
        self.at_teardown(self.metrics.close)
        self.at_teardown(self._checkpoint_on_clean_stop)
        self.published_version = 0  # generators start with the same drafter file: version 0
        self.published_at_actor = 0
        self.trained_since_publish = 0
        self.background: set[asyncio.Task[object]] = set()
        if self.ctx.restart_count:
            await self.drafter_weights.announce()
        await self.actor_weights.join()

    # --- messages ---------------------------------------------------------------------

    @handles
    async def on_scored(self, message: ScoredGroup) -> None:
        self.core.add_group(message.group.prompt_ids, [r.completion_ids for r in message.rollouts],
                            message.rewards, message.group.group_id,
                            [r.min_policy_version for r in message.rollouts],
                            [drafter_step_share(r) for r in message.rollouts])
        self.data_arrived.set()

    @handles
    async def on_group_formation(self, message: GroupFormation) -> None:
        self.actor_weights.on_message(message)

    @handles
    async def on_weights_update(self, message: WeightsUpdate) -> None:
        self.actor_weights.on_message(message)

    @handles
    async def on_weights_rejoin(self, message: WeightsRejoin) -> None:
        await self.actor_weights.join()

    @handles
    async def on_join(self, message: WeightsJoin) -> None:
        self.drafter_weights.on_join(message)
        if self.drafter_weights.num_broadcasts:
            # A generator came back: it reloaded the offline drafter; give it the current one.
            task = asyncio.create_task(self.drafter_weights.publish(self.core.snapshot))
            self.background.add(task)
            task.add_done_callback(self.background.discard)

    # --- the loop ---------------------------------------------------------------------

    def _swap_actor(self) -> None:
        staged = self.actor_weights.take()
        if staged is None:
            return
        version, tensors, _ = staged
        self.core.load_actor(version, tensors)
        # A trainer resumed from an older checkpoint: pace the next publish from where it is.
        self.published_at_actor = min(self.published_at_actor, version)
        self.log.info("drafter.actor_applied", version=version, drafter_version=self.core.drafter_version)

    def _record(self, kind: str, **fields) -> DrafterLearnerRecord:
        values = dict(
            kind=kind, time=time.time(), actor_version=self.core.actor_version,
            drafter_version=self.core.drafter_version, drafter_lag=self.core.actor_version - self.core.drafter_version,
            step=self.core.num_steps, buffer_size=len(self.core.buffer), num_received=self.core.buffer.num_received,
            num_published=self.drafter_weights.num_broadcasts, published_version=self.published_version)
        record = DrafterLearnerRecord(**{**values, **fields})
        self.metrics.write(record)
        return record

    async def _maybe_publish(self) -> None:
        interval = self.ctx.config.drafter.update_interval
        if not self.trained_since_publish or self.core.drafter_version < self.published_at_actor + interval:
            return
        await self._publish()

    async def _publish(self) -> None:
        stats = await self.drafter_weights.publish(self.core.snapshot)
        previous, self.published_version = self.published_version, self.core.drafter_version
        self.published_at_actor = self.core.drafter_version
        self.trained_since_publish = 0
        self._record("publish", drafter_lag=self.published_version - previous,
                     seconds=stats.seconds if stats else 0.0)
        every = self.ctx.config.drafter.checkpoint_every
        if every and self.published_version // every > previous // every:
            await self._checkpoint()
        await self.notify("drafter.published", version=self.published_version, actor_version=self.core.actor_version,
                          steps=self.core.num_steps)

    async def _checkpoint(self) -> None:
        """Write the learner's state unless nothing was trained since the last checkpoint (or the
        one it resumed from). Runs in the compute thread, so never in the middle of a step."""
        if not self.ctx.config.drafter.checkpoint_every or self.core.num_steps == self.checkpointed_step:
            return
        path = await self.run_blocking(self.core.save_checkpoint, drafter_checkpoints_dir(self.ctx.run_dir))
        self.checkpointed_step = self.core.num_steps
        self.log.info("drafter.checkpoint", path=str(path), version=self.core.drafter_version,
                      step=self.core.num_steps)

    async def main(self) -> None:
        increment = self.ctx.config.drafter.nice
        if increment:
            # Lower priority from here on: train on the CPU time the loop leaves. Not during
            # setup, whose model loading and group joins the trainer's first step waits for.
            os.nice(increment)  # the event-loop thread
            await self.run_blocking(os.nice, increment)  # the compute thread (created during setup)
        await self.actor_weights.arrived.wait()
        await self.run_blocking(self._swap_actor)
        if self.resumed_from is not None:
            await self._publish()  # the restored drafter, to every generator (see the module docstring)
        nice = await self.run_blocking(os.nice, 0)  # the priority the compute thread trains at
        self.log.info("drafter_learner.ready", actor_version=self.core.actor_version, nice=nice)
        await self.notify("drafter_learner.ready", actor_version=self.core.actor_version,
                          members=len(self.drafter_weights.expected), weighting=self.ctx.config.drafter.weighting,
                          nice=nice)
        while True:
            if self.actor_weights.arrived.is_set():
                await self.run_blocking(self._swap_actor)
            await self._maybe_publish()
            if self.core.can_train():
                stats = await self.run_blocking(self.core.train_step)
                self.trained_since_publish += 1
                fields = {k: v for k, v in vars(stats).items() if k not in ("step", "actor_version")}
                record = self._record("step", **fields)
                self.log.info("drafter.step", step=stats.step, actor_version=stats.actor_version,
                              lag=record.drafter_lag, loss=round(stats.loss, 4),
                              accept_len=round(stats.estimated_acceptance_length, 3),
                              weight_mean=round(stats.weight_mean, 3), buffer=len(self.core.buffer),
                              seconds=round(stats.seconds, 3))
                continue
            self.data_arrived.clear()
            waiters = {asyncio.create_task(self.data_arrived.wait()),
                       asyncio.create_task(self.actor_weights.arrived.wait())}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED,
                               timeout=self.ctx.config.drafter.metrics_every_s)
            for waiter in waiters:
                waiter.cancel()

    async def _checkpoint_on_clean_stop(self) -> None:
        # A clean stop (the run finished, or a shutdown) keeps what was trained since the last
        # checkpoint; after a failure the learner's state is not trusted.
        if self.exit_code == 0:
            await self._checkpoint()
