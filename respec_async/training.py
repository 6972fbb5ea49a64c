"""The trainer's compute: the actor model, its optimizer, one GRPO step per batch, checkpoints.

`ActorTrainer` is plain synchronous PyTorch; the trainer role calls it from its compute thread.
A checkpoint holds the actor (safetensors, Hugging Face layout), the optimizer state, the
policy version and the data position, written to a temporary directory and renamed into place
(`respec_async.checkpoints`), so a crash mid-write never leaves a half checkpoint that a resume
would pick up.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from respec_async.algorithms.grpo import LossStats, completion_logprobs, group_advantages, grpo_loss
from respec_async.checkpoints import (MANIFEST, CheckpointError, clear_dead_staging, newest_intact_step_dir,
                                      replace_dir, step_dirs, verify_manifest, write_manifest)
from respec_async.config import Config
from respec_async.engine.checkpoint import load_pretrained, save_pretrained
from respec_async.prompts import Example, PromptSource
from transport.schema import ScoredGroup


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose manifest verifies (the one a resume would load)."""
    return newest_intact_step_dir(checkpoints_dir(run_dir), "trainer.json")


def checkpoints_newest_first(run_dir: Path) -> list[Path]:
    return [path for _, path in reversed(step_dirs(checkpoints_dir(run_dir), "trainer.json"))]


def load_newest_intact(trainer: "ActorTrainer", run_dir: Path, warn) -> Path | None:
    """Load the newest checkpoint that loads; each one that does not is reported with
    warn(path, reason) and the next older one is tried. None: no checkpoint (a fresh start);
    CheckpointError when checkpoints exist but none is intact (the run cannot resume)."""
    tried = []
    for path in checkpoints_newest_first(run_dir):
        try:
            trainer.load_checkpoint(path)
            return path
        except CheckpointError as exc:
            reason = str(exc)
        except (ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
            # A checkpoint whose manifest verified is intact: what fails loading it (a device
            # out of memory, a model that does not fit the config) would fail on the older too.
            if (path / MANIFEST).exists():
                raise
            reason = f"{type(exc).__name__}: {exc}"  # written before manifests: corrupt, probably
        warn(path, reason)
        tried.append(f"{path.name}: {reason}")
    if tried:
        raise CheckpointError("no intact checkpoint to resume from: " + "; ".join(tried))
    return None


@dataclass
class TrainStats(LossStats):
    grad_norm: float = 0.0


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls on `device` run natively (trainer.compute_dtype = "auto"): a CPU with
    AVX512-BF16 or AMX tiles, a CUDA GPU that supports bf16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


class ActorTrainer:
    def __init__(self, config: Config, run_dir: Path) -> None:
        self.config = config
        self.run_dir = run_dir
        dtype = torch.bfloat16 if config.model.dtype == "bfloat16" else torch.float32
        # float32 master weights; the forward and backward run under autocast in compute_dtype,
        # and the generators get model.dtype.
        self.model = load_pretrained(config.model.path, dtype=torch.float32, device=config.model.device)
        self.weights_dtype = dtype
        compute = config.trainer.compute_dtype
        if compute == "auto":
            compute = "bfloat16" if native_bf16(self.model.embed_tokens.weight.device) else "float32"
        self.compute_dtype = dtype if compute == "model" else getattr(torch, compute)
        self.model.train()
        self.reference = None
        if config.trainer.kl_coef > 0:
            self.reference = load_pretrained(config.model.path, dtype=dtype, device=config.model.device).eval()
        t = config.trainer
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay,
                                           betas=(0.9, 0.99))
        self.prompts = PromptSource(config)
        self.version = 0
        self.data_position: tuple[int, list[int]] | None = None  # from a loaded checkpoint

    def train_example(self, group_id: int) -> Example:
        return self.prompts.train_example(group_id)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def snapshot(self) -> tuple[int, dict[str, torch.Tensor]]:
        """(policy version, weights) as one consistent pair, for a broadcast, in the generators'
        dtype (model.dtype): with bfloat16 the trainer sends the bytes the generators hold (their
        checksum matches) and half as many; the float32 master weights stay here."""
        state = self.model.state_dict()
        if self.weights_dtype != torch.float32:
            state = {name: t.to(self.weights_dtype) if t.is_floating_point() else t for name, t in state.items()}
        return self.version, state

    def train_step(self, batch: list[ScoredGroup]) -> TrainStats:
        t = self.config.trainer
        temperature = self.config.sampling.temperature
        rewards = torch.tensor([g.rewards for g in batch], dtype=torch.float32)
        advantages = group_advantages(rewards, normalize_std=t.normalize_std).reshape(-1)
        samples = [(g.group.prompt_ids, r) for g in batch for r in g.rollouts]
        total_tokens = max(sum(len(r.completion_ids) for _, r in samples), 1)
        device = next(self.model.parameters()).device
        self.optimizer.zero_grad(set_to_none=True)
        totals = dict(loss=0.0, policy_loss=0.0, kl=0.0, clip_fraction=0.0, is_weight_mean=0.0,
                      is_truncated_fraction=0.0)
        for start in range(0, len(samples), t.micro_batch_size):
            chunk = samples[start:start + t.micro_batch_size]
            prompts = [p for p, _ in chunk]
            completions = [r.completion_ids for _, r in chunk]
            with torch.autocast(device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32):
                logprobs, mask = completion_logprobs(self.model, prompts, completions, temperature)
            behaviour = torch.zeros_like(logprobs)
            for i, (_, r) in enumerate(chunk):
                behaviour[i, : len(r.completion_ids)] = r.behaviour_logprobs.to(device)
            ref = None
            if self.reference is not None:
                with torch.no_grad():
                    ref, _ = completion_logprobs(self.reference, prompts, completions, temperature)
            # One optimizer step per batch: the proximal policy is the current one (ratio 1 with
            # gradient); the staleness of the sampler is corrected by the truncated IS weight.
            loss, stats = grpo_loss(
                logprobs, logprobs.detach(), behaviour, advantages[start:start + len(chunk)].to(device), mask,
                clip_low=t.clip_low, clip_high=t.clip_high, is_cap=t.is_cap, ref_logprobs=ref, kl_coef=t.kl_coef,
            )
            share = stats.num_tokens / total_tokens  # token-level mean over the whole batch
            (loss * share).backward()
            for key in totals:
                totals[key] += getattr(stats, key) * share
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        self.version += 1
        return TrainStats(num_tokens=total_tokens, grad_norm=float(grad_norm), **totals)

    def save_checkpoint(self, data_position: tuple[int, list[int]] | None = None) -> Path:
        """data_position: Admission.resume_position(), where the data stream restarts."""
        state = {"version": self.version}
        if data_position is not None:
            state["data_position"], state["consumed_positions"] = data_position[0], list(data_position[1])

        def fill(staging: Path) -> None:
            save_pretrained(self.model, staging / "actor")
            torch.save(self.optimizer.state_dict(), staging / "optimizer.pt")
            (staging / "trainer.json").write_text(json.dumps(state))
            write_manifest(staging)

        path = replace_dir(checkpoints_dir(self.run_dir) / f"step-{self.version}", fill)
        clear_dead_staging(path.parent)  # a trainer killed mid-checkpoint left its stage there
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Load a checkpoint; CheckpointError (naming the file) when it is not intact."""
        verify_manifest(path)
        loaded = load_pretrained(path / "actor", dtype=torch.float32, device=self.config.model.device)
        self.model.load_state_dict(loaded.state_dict())
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        state = json.loads((path / "trainer.json").read_text())
        self.version = state["version"]
        # (position, consumed positions above it); None: the step's first group, step * groups
        self.data_position = ((state["data_position"], state.get("consumed_positions", []))
                              if "data_position" in state else None)
