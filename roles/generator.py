"""Generator role: the inference engine behind a mailbox.

Prompt groups arrive from the trainer; each sample becomes an engine request. The role's loop
steps the engine in the compute thread (continuous batching: finished sequences leave, queued
ones enter), and sends every finished group to a reward role with per-token behaviour
log-probs, the policy versions it was generated under and SD statistics. New actor (and
drafter) weights are received by their own tasks into staging tensors while the engine keeps
stepping, and swapped in between two steps. The role does not generate before it holds the
trainer's weights, so a restarted generator never samples from stale ones.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field

import torch

from respec_async import profiling
from respec_async.actor import Actor, handles
from respec_async.endpoints import DRAFTER_LEARNER, TRAINER
from respec_async.engine.engine import Engine
from respec_async.engine.requests import Completion, Request, SDConfig
from respec_async.engine.speculative import RelaxedAcceptance
from respec_async.models import load_drafter, load_target, sampling_params
from respec_async.sd.grid import engine_draft_budget, history_index_for, shadow_length
from respec_async.sd.scheduler import AdaptiveScheduler
from respec_async.weight_sync import WeightMember
from transport.weights import weights_checksum
from transport.schema import (
    HOP_AT_GENERATOR,
    HOP_TO_REWARD,
    GeneratorHello,
    GroupFormation,
    GroupMoved,
    PromptGroup,
    Rollout,
    RolloutGroup,
    WeightsRejoin,
    WeightsUpdate,
)


@dataclass
class GroupInFlight:
    group: PromptGroup
    started_at: float
    rollouts: dict[int, Rollout] = field(default_factory=dict)
    start_versions: dict[int, int] = field(default_factory=dict)


class GeneratorActor(Actor):
    async def setup(self) -> None:
        cfg = self.ctx.config
        torch.set_num_threads(cfg.generator.num_threads)
        g = cfg.generator
        # Adaptive SD: the scheduler is built in main() once the profile is there (read from
        # generator.sd_profile, or measured at start); the engine's draft buffers fit every config.
        self.sd_profile, sd_grid = profiling.generator_profile(cfg) if g.sd == "adaptive" else (None, [])
        self.static_sd = (SDConfig(g.sd_num_steps, g.sd_top_k, g.sd_num_draft_tokens, source=g.sd_source)
                          if g.sd == "static" else None)
        configs = sd_grid + ([self.static_sd] if self.static_sd is not None else [])
        self.target, self.tokenizer = await self.run_blocking(load_target, cfg)
        uses_drafter = any(sd.uses_drafter for sd in configs)
        self.drafter = await self.run_blocking(load_drafter, cfg, self.target) if uses_drafter else None
        relaxed = None
        if g.sd != "off" and (g.sd_relaxed_threshold_single < 1.0 or g.sd_relaxed_threshold_acc < 1.0):
            relaxed = RelaxedAcceptance(g.sd_relaxed_threshold_single, g.sd_relaxed_threshold_acc)
        # The rollout history (engine/history.py) lives as long as this process: it outlasts
        # weight updates (a past rollout stays a valid draft, only its acceptance changes) and
        # a restarted generator starts with an empty one.
        history = history_index_for(configs, max_bytes=g.history_max_bytes,
                                    max_rollouts_per_prompt=g.history_max_rollouts_per_prompt,
                                    match_depth=g.history_match_depth)
        self.scheduler: AdaptiveScheduler | None = None
        self.engine = Engine(self.target, self.drafter, max_batch_size=g.max_batch_size, max_seq_len=g.max_seq_len,
                             seed=cfg.run.seed * 1000 + self.ctx.index, relaxed=relaxed,
                             max_draft_tokens=engine_draft_budget(configs), history=history,
                             shadow_length=shadow_length(sd_grid), spread_siblings=g.history_spread_siblings)
        self.params = sampling_params(cfg, self.tokenizer)
        self.policy_version = -1  # nothing to generate with until the trainer's weights arrive
        self.actor_weights = WeightMember(self, "actor", TRAINER, cfg.trainer.weight_sync_timeout_s,
                                          cfg.model.device)
        # The drafter learner's "drafter" group: new drafters swap in at a step boundary too.
        self.drafter_version = 0  # the offline drafter counts as distilled from the initial actor
        self.drafter_weights = None
        if self.drafter is not None and cfg.roles.drafter_learner:
            self.drafter_weights = WeightMember(self, "drafter", DRAFTER_LEARNER,
                                                cfg.trainer.weight_sync_timeout_s, cfg.model.device)
        self.pending: collections.deque[PromptGroup] = collections.deque()
        self.in_flight: dict[tuple[int, int], GroupInFlight] = {}
        self.wake = asyncio.Event()
        self.num_groups_done = 0
        self.busy_s = 0.0  # stepping the engine
        self.idle_s = 0.0  # nothing to generate (waiting for prompts or for weights)
        self.at_teardown(self._log_totals)
        self.reward_roles = self.ctx.endpoints.roles("reward")
        await self.actor_weights.join()
        if self.drafter_weights is not None:
            await self.drafter_weights.join()
        await self.send(TRAINER, GeneratorHello(role=self.name, restart_count=self.ctx.restart_count))

    @handles
    async def on_prompt_group(self, message: PromptGroup) -> None:
        self.pending.append(message)
        self.wake.set()
        await self.send(TRAINER, GroupMoved(group_id=message.group_id, attempt=message.attempt,
                                                hop=HOP_AT_GENERATOR, holder=self.name))

    def _member(self, group: str) -> WeightMember | None:
        if group == "drafter":
            return self.drafter_weights
        return self.actor_weights

    @handles
    async def on_group_formation(self, message: GroupFormation) -> None:
        member = self._member(message.group)
        if member is not None:
            member.on_message(message)

    @handles
    async def on_weights_update(self, message: WeightsUpdate) -> None:
        member = self._member(message.group)
        if member is not None:
            member.on_message(message)

    @handles
    async def on_weights_rejoin(self, message: WeightsRejoin) -> None:
        member = self._member(message.group)
        if member is not None:
            await member.join()

    def _apply(self, member: WeightMember | None, load, module: torch.nn.Module,
               kind: str) -> tuple[int, float, dict] | None:
        """Load the newest version `member` staged into the engine: (version, seconds, the
        checksum fields), or None when nothing new arrived."""
        staged = member.take() if member is not None else None
        if staged is None:
            return None
        version, tensors, checksum = staged
        started = time.perf_counter()
        load(tensors)
        return version, round(time.perf_counter() - started, 4), self._verify(kind, module, version, checksum)

    def _verify(self, kind: str, module: torch.nn.Module, version: int, checksum: str) -> dict:
        """With generator.verify_weights, checksum what the engine now holds (not what arrived:
        this proves the swap itself) against the sender's; the fields for the applied event."""
        if not self.ctx.config.generator.verify_weights:
            return {}
        held = weights_checksum(module.state_dict())
        if held != checksum:
            self.log.error(f"{kind}.checksum_mismatch", version=version, expected=checksum[:12], held=held[:12])
        return {"checksum": held[:12], "matches": held == checksum}

    def _swap_in_staged(self) -> None:
        """At a step boundary: the newest drafter, then the newest actor weights that arrived."""
        applied = self._apply(self.drafter_weights, self.engine.load_drafter_state, self.drafter, "drafter")
        if applied is not None:
            self.drafter_version, seconds, fields = applied
            self.log.info("drafter.applied", version=self.drafter_version, policy_version=self.policy_version,
                          lag=self.policy_version - self.drafter_version, seconds=seconds, **fields)
        applied = self._apply(self.actor_weights, self.engine.load_target_state, self.target, "weights")
        if applied is not None:
            self.policy_version, seconds, fields = applied
            self.log.info("weights.applied", version=self.policy_version, seconds=seconds, **fields)

    def _admit(self) -> None:
        # A group admitted at version v may only be sampled by weights of version >= v (the
        # staleness bound counts from there); it waits here until those weights are swapped in.
        while self.pending and self.pending[0].policy_version <= self.policy_version:
            group = self.pending.popleft()
            key = (group.group_id, group.attempt)
            self.in_flight[key] = GroupInFlight(group, time.perf_counter())
            for i in range(group.num_samples):
                self.engine.add_request(Request(f"{group.group_id}:{group.attempt}:{i}", group.prompt_ids, self.params))
                self.in_flight[key].start_versions[i] = self.policy_version

    def _sd_choice(self, active: int) -> SDConfig | None:
        if self.scheduler is None:
            return self.static_sd
        # Requests left waiting after this step's admissions refill the slots its finished rows free.
        return self.scheduler.choose(active, refilling=self.engine.refilling)

    def _step(self) -> list[Completion]:
        """One engine step, in the compute thread; swaps staged weights first."""
        self._swap_in_staged()
        if self.scheduler is None:
            return self.engine.step(self._sd_choice(self.engine.num_active))
        started = self.scheduler.clock()
        completions = self.engine.step(self._sd_choice(self.engine.num_active))
        self.scheduler.observe(self.engine.last_step, self.scheduler.clock() - started)
        return completions

    async def _start_adaptive(self) -> None:
        """Read or measure the profile (in the compute thread; weights arrive meanwhile) and
        build the scheduler; logs the fit error and the plan."""
        cfg = self.ctx.config
        if self.sd_profile is None:
            self.sd_profile = await self.run_blocking(profiling.load_or_profile, cfg, self.target, self.drafter,
                                                      self.tokenizer, self.ctx.run_dir, self.log.info)
        self.scheduler = profiling.scheduler_for(cfg, self.sd_profile)
        for warning in profiling.profile_warnings(cfg, self.sd_profile):
            self.log.warning("sd.profile_mismatch", detail=warning)
        error = self.scheduler.model.fit_error()
        plans = self.scheduler.report(reset=False)
        self.log.info("sd.plan", plan=plans["plan"], plan_refilling=plans["plan_refilling"],
                      fit_step_time_error=round(error["step_time"]["mean"], 4),
                      fit_speedup_error=round(error["speedup"]["mean"], 4),
                      worst_choice_ratio=error["worst_choice_ratio"], acceptance=self.sd_profile.acceptance)

    def _record(self, completion: Completion) -> GroupInFlight | None:
        group_id, attempt, index = (int(x) for x in completion.request_id.split(":"))
        flight = self.in_flight.get((group_id, attempt))
        if flight is None:
            return None
        flight.rollouts[index] = Rollout(
            sample_index=index, completion_ids=list(completion.output_ids),
            behaviour_logprobs=torch.tensor(completion.logprobs, dtype=torch.float32),
            min_policy_version=flight.start_versions[index], max_policy_version=self.policy_version,
            finish_reason=completion.finish_reason, num_drafted=completion.num_drafted,
            num_accepted=completion.num_accepted, num_verify_steps=completion.num_verify_steps,
            num_decode_steps=completion.num_decode_steps,
            drafter_version=self.drafter_version if self.drafter is not None else -1,
            num_history_drafted=completion.num_history_drafted, num_history_accepted=completion.num_history_accepted,
            num_history_verify_steps=completion.num_history_verify_steps,
        )
        return flight if len(flight.rollouts) == flight.group.num_samples else None

    async def main(self) -> None:
        if self.ctx.config.generator.sd == "adaptive":
            await self._start_adaptive()
        await self.actor_weights.arrived.wait()
        await self.run_blocking(self._swap_in_staged)
        await self.notify("generator.ready", version=self.policy_version, device=self.ctx.config.model.device)
        last_report = time.perf_counter()
        while True:
            self._admit()
            if time.perf_counter() - last_report > 5.0:
                last_report = time.perf_counter()
                self.log.info("generator.utilization", busy_s=round(self.busy_s, 3), idle_s=round(self.idle_s, 3),
                              num_groups_done=self.num_groups_done, version=self.policy_version)
                if self.scheduler is not None:
                    self.log.info("generator.sd", **self.scheduler.report())
            if not self.engine.has_unfinished:
                idle_from = time.perf_counter()
                self.wake.clear()
                waiter = asyncio.create_task(self.wake.wait())
                weights = asyncio.create_task(self.actor_weights.arrived.wait())
                await asyncio.wait({waiter, weights}, return_when=asyncio.FIRST_COMPLETED, timeout=5.0)
                waiter.cancel()
                weights.cancel()
                self.idle_s += time.perf_counter() - idle_from
                if self.actor_weights.arrived.is_set():
                    await self.run_blocking(self._swap_in_staged)
                continue
            busy_from = time.perf_counter()
            completions = await self.run_blocking(self._step)
            self.busy_s += time.perf_counter() - busy_from
            for completion in completions:
                flight = self._record(completion)
                if flight is not None:
                    await self._finish(flight)

    def _log_totals(self) -> None:
        self.log.info("generator.utilization", busy_s=round(self.busy_s, 3), idle_s=round(self.idle_s, 3),
                      num_groups_done=self.num_groups_done, version=self.policy_version)
        if self.scheduler is not None:
            self.log.info("generator.sd", total_steps=dict(self.scheduler.total_steps), **self.scheduler.report())

    async def _finish(self, flight: GroupInFlight) -> None:
        group = flight.group
        del self.in_flight[(group.group_id, group.attempt)]
        rollouts = [flight.rollouts[i] for i in range(group.num_samples)]
        reward_role = self.reward_roles[self.num_groups_done % len(self.reward_roles)]
        self.num_groups_done += 1
        await self.send(reward_role, RolloutGroup(group=group, rollouts=rollouts, generator=self.name,
                                                  generation_s=time.perf_counter() - flight.started_at))
        await self.send(TRAINER, GroupMoved(group_id=group.group_id, attempt=group.attempt, hop=HOP_TO_REWARD,
                                                holder=reward_role))
