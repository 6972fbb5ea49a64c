"""Trainer role: owns the data stream, the actor's optimizer and the policy version.

Loop (one optimizer step per policy version):
  1. hand out every prompt group admission control allows (see respec_async.admission), to the
     generator with the fewest groups outstanding;
  2. wait for the scored groups of this step (they come back from the reward role);
  3. GRPO step on them in the compute thread (the event loop keeps receiving meanwhile);
  4. bump the version, broadcast the new weights to generators (and the drafter learner),
     write metrics, checkpoint every `checkpoint_every` steps.
With max_staleness k >= 1 the groups of step v+1 are already out while step v trains: that
is the overlap. The roles acknowledge each group as it reaches them (GroupMoved), so the
trainer knows where every attempt is: the groups a restarted generator or reward role held, and
those left between roles for trainer.group_transit_timeout_s, are re-issued; every issue, move
and end goes to the run's ledger (respec_async.ledger). A restarted trainer resumes from its
last checkpoint at the same version.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import torch

from respec_async.actor import Actor, handles
from respec_async.admission import Admission
from respec_async.ledger import Ledger
from respec_async.metrics import MetricsWriter, informative, step_metrics
from respec_async.tracking import open_trackers
from respec_async.training import ActorTrainer, load_newest_intact
from respec_async.weight_sync import WeightOwner
from transport.schema import (
    GeneratorHello,
    GroupMoved,
    PromptGroup,
    ReissueHeld,
    ReturnedGroup,
    RewardHello,
    ScoredGroup,
    WeightsJoin,
)


class TrainerActor(Actor):
    async def setup(self) -> None:
        cfg = self.ctx.config
        torch.set_num_threads(cfg.trainer.num_threads)
        self.generators = self.ctx.endpoints.roles("generator")
        receivers = self.generators + self.ctx.endpoints.roles("drafter_learner")
        self.core = await self.run_blocking(ActorTrainer, cfg, self.ctx.run_dir)
        # Attempts of this incarnation never collide with results of a previous one.
        self.admission = Admission(cfg.data.groups_per_step, cfg.trainer.max_staleness,
                                   first_attempt=self.ctx.restart_count << 20)
        unusable: list[tuple[Path, str]] = []
        checkpoint = await self.run_blocking(load_newest_intact, self.core, self.ctx.run_dir,
                                             lambda path, reason: unusable.append((path, reason)))
        for path, reason in unusable:
            self.log.warning("trainer.checkpoint_unusable", checkpoint=str(path), reason=reason)
            await self.notify("trainer.checkpoint_unusable", level="warning", checkpoint=path.name, reason=reason)
        if checkpoint is not None:
            self.log.info("trainer.resumed", checkpoint=str(checkpoint), version=self.core.version)
            await self.notify("trainer.resumed", version=self.core.version, checkpoint=checkpoint.name)
        position, consumed = self.core.data_position or (None, [])
        self.admission.reset_to_step(self.core.version, position, consumed)
        self.ledger = Ledger(self.ctx.run_dir, self.ctx.restart_count)
        self.at_teardown(self.ledger.close)
        self.ledger.write("start", version=self.core.version)
        self.weights = WeightOwner(self, "actor", receivers, cfg.trainer.weight_sync_timeout_s, cfg.model.device)
        self.batch_arrived = asyncio.Event()
        self.issue_wanted = asyncio.Event()
        self.metrics = MetricsWriter(self.ctx.run_dir / "metrics.jsonl")
        self.at_teardown(self.metrics.close)
        # The TensorBoard writer imports (seconds) and opens its files off the event loop.
        self.trackers = await self.run_blocking(open_trackers, cfg, self.ctx.run_dir)
        self.at_teardown(self.trackers.close)
        self.num_returned = 0
        self.background: set[asyncio.Task[object]] = set()

    # --- messages ---------------------------------------------------------------------

    @handles
    async def on_join(self, message: WeightsJoin) -> None:
        self.weights.on_join(message)
        if self.weights.num_broadcasts:
            # A member came back mid-run: give it the current weights now rather than at the
            # next step, which may be waiting on the groups only that member can finish.
            task = asyncio.create_task(self.weights.publish(self.core.snapshot))
            self.background.add(task)
            task.add_done_callback(self.background.discard)

    @handles
    async def on_generator_hello(self, message: GeneratorHello) -> None:
        if message.restart_count == 0:
            return  # its first start: what was sent to it is still on its way to it
        await self._reissue(self.admission.held_by(message.role), "holder_restarted", message.role)

    @handles
    async def on_reward_hello(self, message: RewardHello) -> None:
        await self._reissue(self.admission.held_by(message.role), "holder_restarted", message.role)

    @handles
    async def on_reissue_held(self, message: ReissueHeld) -> None:
        """The supervisor saw the run stall (stall_action = "reissue"): new attempts of what the
        stuck roles hold; a late result of an old attempt is ignored as superseded."""
        for role in message.roles:
            await self._reissue(self.admission.held_by(role), "stalled", role)

    @handles
    async def on_group_moved(self, message: GroupMoved) -> None:
        if self.admission.move(message.group_id, message.attempt, message.hop, message.holder, time.monotonic()):
            self.ledger.write("move", group_id=message.group_id, attempt=message.attempt, hop=message.hop,
                              holder=message.holder)

    async def _reissue(self, lost: list[int], reason: str, holder: str) -> None:
        """New attempts of groups `holder` lost (the first result of each wins)."""
        if not lost:
            return
        self.log.warning("trainer.reissue", num_groups=len(lost), reason=reason, holder=holder)
        await self.notify("trainer.reissue", level="warning", num_groups=len(lost), reason=reason, holder=holder)
        for group_id in lost:
            if group_id in self.admission.outstanding:  # not completed while earlier ones were sent
                await self._send_group(group_id, reissue=reason, lost_by=holder)

    async def _watch_transit(self) -> None:
        """Re-issue groups sent to a role that never acknowledged them (lost on the way, or to a
        role that died before it could say so and has not restarted)."""
        timeout_s = self.ctx.config.trainer.group_transit_timeout_s
        while True:
            await asyncio.sleep(min(5.0, timeout_s / 4))
            now = time.monotonic()
            by_holder: dict[str, list[int]] = {}
            for group_id in self.admission.in_transit(now, timeout_s):
                by_holder.setdefault(self.admission.outstanding[group_id].holder, []).append(group_id)
            for holder, lost in by_holder.items():
                await self._reissue(lost, "in_transit", holder)

    @handles
    async def on_scored(self, message: ScoredGroup) -> None:
        group_id = message.group.group_id
        if not self.admission.complete(group_id, message.group.attempt, message):
            self.log.info("trainer.ignored_result", group_id=group_id, attempt=message.group.attempt)
            return
        self.ledger.write("complete", group_id=group_id, attempt=message.group.attempt)
        if self._drops(message):
            step = self.admission.step_of(group_id)
            self.admission.drop(group_id)  # consumed: reported with its step; a new prompt takes its place
            self.ledger.write("drop", group_id=group_id, step=step, reason="all rewards equal")
            await self._issue_admissible()
        else:
            self.batch_arrived.set()

    def _drops(self, message: ScoredGroup) -> bool:
        """Dynamic sampling: an uninformative group leaves its step while the step may draw more."""
        cfg = self.ctx.config
        if not cfg.trainer.dynamic_sampling or informative(message.rewards):
            return False
        step = self.admission.step_of(message.group.group_id)
        return self.admission.num_drawn(step) < int(cfg.trainer.dynamic_sampling_max_factor * cfg.data.groups_per_step)

    @handles
    async def on_returned(self, message: ReturnedGroup) -> None:
        group_id = message.group.group_id
        if self.admission.outstanding.get(group_id) is None or \
                self.admission.outstanding[group_id].attempt != message.group.attempt:
            return
        self.num_returned += 1
        self.log.warning("trainer.group_returned", group_id=group_id, reason=message.reason)
        await self._reissue([group_id], "returned", self.admission.outstanding[group_id].holder)

    # --- the loop ---------------------------------------------------------------------

    def _pick_generator(self) -> str:
        load = {g: 0 for g in self.generators}
        for issued in self.admission.outstanding.values():
            if issued.generator in load:
                load[issued.generator] += 1
        return min(load, key=lambda g: (load[g], g))

    async def _send_group(self, group_id: int, reissue: str = "", lost_by: str = "") -> None:
        """Issue the next data position, or (reissue: the reason) a new attempt of `group_id`."""
        generator = self._pick_generator()
        version = self.core.version
        now = time.monotonic()
        if reissue:
            issued = self.admission.reissue(group_id, version, generator, now)
            self.ledger.write("reissue", group_id=group_id, attempt=issued.attempt, version=version,
                              holder=generator, reason=reissue, lost_by=lost_by,
                              step=self.admission.step_of(group_id))
        else:
            issued = self.admission.issue(version, generator, now)
            self.ledger.write("issue", group_id=issued.group_id, attempt=issued.attempt, version=version,
                              holder=generator, step=self.admission.step_of(issued.group_id))
        example = self.core.train_example(issued.group_id)
        group = PromptGroup(
            group_id=issued.group_id, attempt=issued.attempt, prompt_ids=example.prompt_ids,
            num_samples=self.ctx.config.data.group_size, policy_version=version,
            prompt_text=example.prompt_text, answer=example.answer, data_source=example.data_source,
        )
        await self.send(generator, group)

    async def _issue_admissible(self) -> None:
        while self.admission.can_issue(self.core.version) and \
                self.admission.fill_step < self.ctx.config.trainer.num_steps:
            await self._send_group(self.admission.next_group_id)

    async def main(self) -> None:
        cfg = self.ctx.config
        # Everyone starts from the trainer's weights, bit for bit (also after a restart).
        if self.ctx.restart_count:
            await self.weights.announce()
        await self.weights.publish(self.core.snapshot)
        await self.notify("trainer.started", version=self.core.version, num_steps=cfg.trainer.num_steps,
                          device=cfg.model.device)
        if cfg.trainer.group_transit_timeout_s:
            watcher = asyncio.create_task(self._watch_transit(), name="transit")
            watcher.add_done_callback(self._io_task_done)  # it failing is fatal, never silent
            self.at_teardown(watcher.cancel)
        while self.core.version < cfg.trainer.num_steps:
            step = self.core.version
            await self._issue_admissible()
            waited = time.perf_counter()
            while not self.admission.batch_ready(step):
                self.batch_arrived.clear()
                await self.batch_arrived.wait()
            wait_s = time.perf_counter() - waited
            batch: list[ScoredGroup] = self.admission.take_batch(step)
            dropped = self.admission.take_dropped(step)
            self.ledger.write("train", step=step, group_ids=sorted(g.group.group_id for g in batch))
            train_started = time.perf_counter()
            stats = await self.run_blocking(self.core.train_step, batch)
            train_s = time.perf_counter() - train_started
            sync = await self.weights.publish(self.core.snapshot)
            record = step_metrics(step=step, version=self.core.version, batch=batch, loss=stats, wait_s=wait_s,
                                  train_s=train_s, sync_s=sync.seconds if sync else 0.0,
                                  num_reissued=self.admission.num_reissued, num_returned=self.num_returned,
                                  num_duplicates=self.admission.num_duplicates + self.admission.num_stale_results,
                                  filtered_group_ids=dropped)
            self.metrics.write(record)
            await self.run_blocking(self.trackers.log, record, thread="tracking")  # a remote tracker may be slow
            await self.notify("train.step", **record.console_fields())
            every = cfg.trainer.checkpoint_every
            if (every and self.core.version % every == 0) or self.core.version == cfg.trainer.num_steps:
                path = await self.run_blocking(self.core.save_checkpoint, self.admission.resume_position())
                self.log.info("trainer.checkpoint", path=str(path), version=self.core.version)
        self.ledger.write("end", version=self.core.version,
                          num_out=len(self.admission.outstanding) + len(self.admission.completed))
        await self.notify("trainer.finished", version=self.core.version)


