"""Where a run's models come from: resolve the configured paths (the tiny zoo when none are
given) once, in the supervisor, then load them in each role.

Resolving in the supervisor means the zoo is trained at most once per machine (it is cached),
before any role starts, and every role then loads the same explicit directories.
"""

from __future__ import annotations

from pathlib import Path

import torch

from respec_async.config import Config, generator_uses_drafter
from respec_async.engine.checkpoint import load_pretrained
from respec_async.engine.sampling import SamplingParams
from respec_async.engine.tokenizer import Tokenizer
from respec_async.endpoints import RoleId


def resolve_models(config: Config) -> Config:
    """Fill model.path (and model.drafter_path when SD is on) with the zoo's directories (the
    data.task's zoo) when the config leaves them empty, training the zoo first if it is not
    cached (the drafter only when the run uses one)."""
    needs_drafter = generator_uses_drafter(config) or config.roles.drafter_learner > 0
    if config.model.path and (config.model.drafter_path or not needs_drafter):
        return config
    from respec_async.zoo import ensure_zoo, spec_for_task

    zoo = ensure_zoo(spec=spec_for_task(config.data.task), with_drafter=needs_drafter)
    if not config.model.path:
        config.model.path = str(zoo.target_dir)
    if needs_drafter and not config.model.drafter_path:
        config.model.drafter_path = str(zoo.drafter_dir)
    return config


MODEL_ROLES = ("generator", "trainer", "drafter_learner")  # the roles that hold models on model.device


def role_device(device: str, role: str, num_gpus: int | None = None) -> str:
    """The device of one role's models. Plain "cuda" with two or more visible GPUs spreads the
    roles: the trainer (and the drafter learner) on cuda:0, generator i on cuda:1 + i mod (n - 1),
    so every member of the actor weight group has a GPU of its own and the broadcast runs over
    NCCL. "cpu", an explicit "cuda:N", or a single GPU: every role on that device (weights then
    go over gloo; NCCL cannot put two ranks on one GPU)."""
    if device != "cuda":
        return device
    if num_gpus is None:
        num_gpus = torch.cuda.device_count()
    if num_gpus < 2:
        return device
    kind, index = RoleId.parse(role)
    if kind == "generator":
        return f"cuda:{1 + index % (num_gpus - 1)}"
    return "cuda:0"


def place_role(config: Config, role: str) -> Config:
    """Set model.device to this role's device (see role_device) and make it the process's
    current CUDA device, so nothing lands on cuda:0 by default. A no-op on CPU."""
    if not config.model.device.startswith("cuda") or RoleId.parse(role).kind not in MODEL_ROLES:
        return config
    config.model.device = role_device(config.model.device, role)
    if ":" in config.model.device:
        torch.cuda.set_device(torch.device(config.model.device))
    return config


def _dtype(config: Config) -> torch.dtype:
    return torch.bfloat16 if config.model.dtype == "bfloat16" else torch.float32


def load_tokenizer(config: Config) -> Tokenizer:
    return Tokenizer.from_dir(Path(config.model.path))


def load_target(config: Config) -> tuple[torch.nn.Module, Tokenizer]:
    model = load_pretrained(config.model.path, dtype=_dtype(config), device=config.model.device).eval()
    model.requires_grad_(False)
    return model, load_tokenizer(config)


def load_drafter(config: Config, target: torch.nn.Module) -> torch.nn.Module:
    from respec_async.engine.drafter import Eagle3Drafter

    drafter = Eagle3Drafter.load_pretrained(config.model.drafter_path, target.embed_tokens)
    return drafter.to(device=config.model.device, dtype=_dtype(config)).eval()


def sampling_params(config: Config, tokenizer: Tokenizer, temperature: float | None = None) -> SamplingParams:
    """The run's sampling settings (config.sampling), stopping at the tokenizer's EOS;
    temperature overrides the configured one (evaluation's greedy pass)."""
    s = config.sampling
    stop = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
    return SamplingParams(temperature=s.temperature if temperature is None else temperature, top_p=s.top_p,
                          top_k=s.top_k, max_new_tokens=s.max_new_tokens, stop_token_ids=stop)
