"""The drafter learner's compute: a bounded replay buffer of scored rollouts, and one
reward-weighted distillation step of the drafter against the learner's copy of the actor.

`DrafterLearner` is plain synchronous PyTorch; the drafter-learner role calls it from its
compute thread. Each step draws `drafter.batch_size` rollouts uniformly from the buffer,
recomputes the target's fused features and logits on prompt + completion with the actor
weights the learner holds *now* (samples generated under older versions are re-labelled by the
current actor, which is the distribution the drafter must match), weights every sample by
w(r) — its reward min-max normalised within the batch and clipped to [w_min, 1]
(`algorithms.distill.reward_weights`; w = 1 everywhere is plain KD) — and takes one AdamW step
on the unrolled KD loss. Optimizer steps are paced by the data (`replay_ratio`): samples drawn
stay below replay_ratio x rollouts received, so the learner never spins on a stale buffer; with
`pace_floor` < 1 a rollout counts by the share of its decode steps that drafted with the drafter
(`drafter_step_share`: speculative steps less those that drafted from the rollout history; at
least pace_floor), so a drafter the generators hardly use is hardly trained.

Versions: the learner's actor version is the trainer's policy version it last swapped in; the
drafter's version is the actor version of its latest training step (the initial drafter,
distilled offline from the initial actor, is version 0). Drafter lag = actor version - drafter
version.

Checkpoints (`save_checkpoint` / `load_checkpoint`, under <run dir>/drafter_checkpoints/step-N,
N = drafter optimizer steps): the drafter as a drafter directory (config.json + safetensors, the
float32 master weights), the optimizer state and the counters, staged and renamed into place
(`respec_async.checkpoints`). The replay buffer and the actor are not in them: a restarted learner
refills the buffer from new rollouts and holds the trainer's current actor.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from respec_async.algorithms.distill import DistillStats, reward_weights, unrolled_distill_loss
from respec_async.checkpoints import newest_intact_step_dir, prune_step_dirs, replace_dir, write_manifest
from respec_async.config import Config
from respec_async.engine.drafter import WEIGHTS_NAME, DrafterConfig

COUNTERS_NAME = "drafter_learner.json"  # the counters; marks a directory as a drafter checkpoint
NUM_CHECKPOINTS_KEPT = 2


def drafter_checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "drafter_checkpoints"


def drafter_step_share(rollout) -> float:
    """The share of a rollout's decode steps that drafted with the EAGLE drafter: a history
    step drafts from earlier rollouts and says nothing of the drafter's use."""
    eagle_steps = rollout.num_verify_steps - rollout.num_history_verify_steps
    return max(eagle_steps, 0) / max(rollout.num_decode_steps, 1)


def latest_drafter_checkpoint(run_dir: Path, warn=None) -> Path | None:
    """The newest drafter checkpoint whose manifest verifies (warn: see newest_intact_step_dir)."""
    return newest_intact_step_dir(drafter_checkpoints_dir(run_dir), COUNTERS_NAME, warn)


class DrafterCheckpointError(RuntimeError):
    """A drafter checkpoint that cannot be resumed from this run: names the path and why."""


@dataclass
class BufferedSample:
    token_ids: list[int]  # prompt + completion
    prompt_len: int
    reward: float
    group_id: int
    policy_version: int  # the version the rollout started under


@dataclass
class ReplayBuffer:
    """The newest `capacity` rollouts; uniform sampling with a seeded generator."""

    capacity: int
    seed: int = 0
    samples: collections.deque[BufferedSample] = field(default_factory=collections.deque)
    num_received: int = 0
    num_evicted: int = 0

    def __post_init__(self) -> None:
        self.samples = collections.deque(maxlen=self.capacity)
        self.rng = random.Random(self.seed)

    def __len__(self) -> int:
        return len(self.samples)

    def add(self, sample: BufferedSample) -> None:
        if len(self.samples) == self.capacity:
            self.num_evicted += 1
        self.samples.append(sample)
        self.num_received += 1

    def draw(self, n: int) -> list[BufferedSample]:
        if not self.samples:
            return []
        if n >= len(self.samples):
            return list(self.samples)
        return self.rng.sample(list(self.samples), n)


@dataclass
class LearnerStepStats:
    step: int
    actor_version: int
    loss: float
    loss_per_step: list[float]
    accept_prob_per_step: list[float]
    estimated_acceptance_length: float
    weight_mean: float
    weight_min: float
    weight_max: float
    reward_mean: float
    num_samples: int
    num_tokens: int
    seconds: float


def encode_batch(samples: list[BufferedSample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, T] right-padded, and loss_mask [B, T]: 1 at the positions that predict a
    completion token (the prompt's last token up to the one before the last completion token)."""
    width = max(len(s.token_ids) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(len(samples), width)
    for i, s in enumerate(samples):
        input_ids[i, :len(s.token_ids)] = torch.tensor(s.token_ids)
        loss_mask[i, s.prompt_len - 1: len(s.token_ids) - 1] = 1.0
    return input_ids, loss_mask


class DrafterLearner:
    def __init__(self, config: Config, target: torch.nn.Module, drafter: torch.nn.Module, pad_id: int) -> None:
        d = config.drafter
        self.config = config
        self.target = target.eval()
        self.target.requires_grad_(False)
        self.compute_dtype = next(target.parameters()).dtype
        # float32 master weights; the generators get model.dtype (see snapshot).
        self.drafter = drafter.float().train()
        self.optimizer = torch.optim.AdamW([p for p in self.drafter.parameters() if p.requires_grad], lr=d.lr,
                                           weight_decay=d.weight_decay, betas=(0.9, 0.98))
        self.buffer = ReplayBuffer(d.buffer_size, seed=config.run.seed + 17)
        self.pad_id = pad_id
        self.temperature = config.sampling.temperature if config.sampling.temperature > 0 else 1.0
        self.actor_version = -1
        self.drafter_version = 0  # the offline drafter was distilled from the initial actor
        self.num_steps = 0
        self.num_drawn = 0
        self.sample_budget = 0.0  # samples the learner may draw so far (replay_ratio, pace_floor)

    # --- data ---------------------------------------------------------------------------

    def add_group(self, prompt_ids: list[int], completions: list[list[int]], rewards: list[float], group_id: int,
                  policy_versions: list[int], sd_shares: list[float] | None = None) -> None:
        """sd_shares: each rollout's share of decode steps that drafted with the drafter
        (drafter_step_share; None: all of them)."""
        d = self.config.drafter
        for i, (completion, reward, version) in enumerate(zip(completions, rewards, policy_versions)):
            if not completion:
                continue  # nothing to distill
            self.buffer.add(BufferedSample(list(prompt_ids) + list(completion), len(prompt_ids), float(reward),
                                           group_id, version))
            share = 1.0 if sd_shares is None else sd_shares[i]
            self.sample_budget += d.replay_ratio * max(d.pace_floor, share)

    def can_train(self) -> bool:
        return len(self.buffer) > 0 and self.num_drawn < self.sample_budget

    # --- weights ------------------------------------------------------------------------

    def load_actor(self, version: int, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.target.load_state_dict(state, strict=True)
        self.actor_version = version
        # The actor went back (a resumed trainer restarts from its own, older checkpoint): the
        # versions after it will be retrained, so the drafter counts as trained against this one.
        self.drafter_version = min(self.drafter_version, version)

    def snapshot(self) -> tuple[int, dict[str, torch.Tensor]]:
        """(drafter version, weights in model.dtype) for a broadcast to the generators."""
        state = self.drafter.state_dict()
        if self.compute_dtype != torch.float32:
            state = {k: v.to(self.compute_dtype) if v.is_floating_point() else v for k, v in state.items()}
        return self.drafter_version, state

    # --- checkpoints --------------------------------------------------------------------

    def save_checkpoint(self, directory: Path) -> Path:
        """directory/step-<num_steps>: the drafter, its optimizer state and the counters; only the
        newest NUM_CHECKPOINTS_KEPT stay."""
        def fill(staging: Path) -> None:
            self.drafter.save_pretrained(staging / "drafter")
            torch.save(self.optimizer.state_dict(), staging / "optimizer.pt")
            # actor_version is for the record: a restarted learner takes the trainer's current actor.
            counters = {"num_steps": self.num_steps, "drafter_version": self.drafter_version,
                        "actor_version": self.actor_version}
            (staging / COUNTERS_NAME).write_text(json.dumps(counters))
            write_manifest(staging)

        path = replace_dir(directory / f"step-{self.num_steps}", fill)
        prune_step_dirs(directory, COUNTERS_NAME, keep=NUM_CHECKPOINTS_KEPT)
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Continue from a `save_checkpoint` directory: drafter weights, optimizer state, num_steps
        and drafter_version. A checkpoint of another drafter (its config or draft vocabulary differ
        from the run's) raises DrafterCheckpointError rather than being trained on."""
        device = next(self.drafter.parameters()).device
        try:
            counters = json.loads((path / COUNTERS_NAME).read_text())
            num_steps, drafter_version = int(counters["num_steps"]), int(counters["drafter_version"])
            saved_config = DrafterConfig.from_dir(path / "drafter")
            # The float32 master weights as saved.
            state = load_file(str(path / "drafter" / WEIGHTS_NAME), device=str(device))
        except Exception as exc:  # whatever the files hold, the error names the checkpoint
            raise DrafterCheckpointError(f"drafter checkpoint {path} cannot be read: {exc}") from exc
        ours, theirs = dataclasses.asdict(self.drafter.config), dataclasses.asdict(saved_config)
        mismatches = [f"{key} = {theirs[key]!r} (the run's drafter: {value!r})"
                      for key, value in ours.items() if theirs[key] != value]
        if not mismatches and not torch.equal(state["d2t"].cpu(), self.drafter.d2t.cpu()):
            mismatches.append("the draft vocabulary (d2t) differs")
        if mismatches:
            raise DrafterCheckpointError(
                f"drafter checkpoint {path} does not match this run's drafter (model.drafter_path = "
                f"{self.config.model.drafter_path!r}): {'; '.join(mismatches)}")
        try:
            self.drafter.load_state_dict(state)
            self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
        except Exception as exc:  # whatever the files hold, the error names the checkpoint
            raise DrafterCheckpointError(f"drafter checkpoint {path} cannot be loaded: {exc}") from exc
        self.num_steps, self.drafter_version = num_steps, drafter_version

    # --- training -----------------------------------------------------------------------

    def sample_weights(self, rewards: list[float]) -> torch.Tensor:
        d = self.config.drafter
        return reward_weights(rewards, w_min=d.w_min, mode="minmax" if d.weighting == "reward" else "none")

    def train_step(self) -> LearnerStepStats:
        d = self.config.drafter
        started = time.perf_counter()
        batch = self.buffer.draw(d.batch_size)
        self.num_drawn += len(batch)
        input_ids, loss_mask = encode_batch(batch, self.pad_id)
        device = next(self.drafter.parameters()).device
        input_ids, loss_mask = input_ids.to(device), loss_mask.to(device)
        weights = self.sample_weights([s.reward for s in batch]).to(device)
        with torch.no_grad():
            out = self.target(input_ids, hidden_layers=tuple(self.drafter.config.feature_layers))
        features = [h.float() for h in out.hidden]
        self.optimizer.zero_grad(set_to_none=True)
        loss, stats = unrolled_distill_loss(self.drafter, features, input_ids, out.logits.float(), loss_mask,
                                            sample_weights=weights, num_steps=d.unroll_steps,
                                            step_decay=d.step_decay, temperature=self.temperature)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.drafter.parameters(), d.grad_clip)
        self.optimizer.step()
        self.num_steps += 1
        self.drafter_version = self.actor_version
        return self._stats(stats, weights, batch, time.perf_counter() - started)

    def _stats(self, stats: DistillStats, weights: torch.Tensor, batch: list[BufferedSample],
               seconds: float) -> LearnerStepStats:
        return LearnerStepStats(
            step=self.num_steps, actor_version=self.actor_version, loss=stats.loss,
            loss_per_step=[round(x, 5) for x in stats.loss_per_step],
            accept_prob_per_step=[round(x, 4) for x in stats.accept_prob_per_step],
            estimated_acceptance_length=stats.expected_acceptance_length,
            weight_mean=float(weights.mean()), weight_min=float(weights.min()), weight_max=float(weights.max()),
            reward_mean=sum(s.reward for s in batch) / len(batch), num_samples=len(batch),
            num_tokens=stats.num_tokens, seconds=seconds,
        )
