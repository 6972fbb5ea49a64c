"""A run's SD profile and scheduler, from its config: the profile measured for the configured
models on the run's task (or read from generator.sd_profile), checked against the run, and
the adaptive scheduler built on it. Used by the generator role and `respec profile`; the
profiler, solver and scheduler themselves are in respec_async/sd/ and know nothing of configs.
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path
from typing import Callable

import torch

from respec_async.engine.requests import SDConfig
from respec_async.models import sampling_params
from respec_async.prompts import PromptSource
from respec_async.sd.grid import parse_grid
from respec_async.sd.measure import Progress, profile_batch_sizes, run_profile
from respec_async.sd.profile import Profile
from respec_async.sd.scheduler import AdaptiveScheduler
from respec_async.sd.solver import SpeedupModel


def task_prompts(config, num_prompts: int) -> list[list[int]]:
    """The first num_prompts training prompts of the run's data (token ids)."""
    source = PromptSource(config)
    return [source.train_example(i).prompt_ids for i in range(num_prompts)]


def profile_for_config(config, target, drafter, tokenizer, *, repeats: int = 10, num_acceptance_prompts: int = 64,
                       clock: str | None = None, progress: Progress | None = None) -> Profile:
    """Profile the configured models on the run's task, sampling settings, batch sizes and grid
    (generator.sd_grid)."""
    g = config.generator
    configs = parse_grid(g.sd_grid)
    device = str(config.model.device)
    clock = clock or ("wall" if device.startswith("cuda") else "cpu")
    prompts = task_prompts(config, max(num_acceptance_prompts, g.max_batch_size))
    meta = {"target": config.model.path, "drafter": config.model.drafter_path, "device": device,
            "dtype": config.model.dtype, "max_batch_size": g.max_batch_size, "task": config.data.task,
            "num_threads": torch.get_num_threads()}
    return run_profile(target, drafter, configs, profile_batch_sizes(g.max_batch_size), prompts,
                       sampling_params(config, tokenizer), repeats=repeats,
                       num_acceptance_prompts=num_acceptance_prompts, clock=clock, seed=config.run.seed,
                       progress=progress, meta=meta, group_size=config.data.group_size)


def load_or_profile(config, target, drafter, tokenizer, run_dir: Path, log: Callable[..., None]) -> Profile:
    """The generator's profile: generator.sd_profile when set, else <run_dir>/sd_profile.json,
    measured now (a small grid run: 5 repeats, 16 acceptance prompts) unless an earlier
    generator of this run wrote it (a restart, another generator, --resume). A file lock keeps
    concurrent generators from profiling twice."""
    profile, _ = generator_profile(config)
    if profile is not None:
        return profile
    path = Path(run_dir) / "sd_profile.json"
    with open(Path(run_dir) / ".sd_profile.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            log("sd.profile_reused", path=str(path))
            return Profile.load(path)
        log("sd.profiling", path=str(path), grid=list(config.generator.sd_grid))
        profile = profile_for_config(config, target, drafter, tokenizer, repeats=5, num_acceptance_prompts=16)
        profile.save(path)
        log("sd.profiled", path=str(path), seconds=profile.meta.get("seconds"))
        return profile


def generator_profile(config) -> tuple[Profile | None, list[SDConfig]]:
    """For an adaptive generator's setup: (the profile generator.sd_profile names, or None when
    it is to be measured at start; the SD configs the engine must fit). Errors name the key."""
    g = config.generator
    if g.sd_profile:
        try:
            profile = Profile.load(g.sd_profile)
        except (OSError, ValueError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"generator.sd_profile: cannot read the profile {g.sd_profile!r}: {exc}") from None
        return profile, profile.configs
    try:
        return None, parse_grid(g.sd_grid)
    except ValueError as exc:
        raise ValueError(f"generator.sd_grid: {exc}") from None


def scheduler_for(config, profile: Profile) -> AdaptiveScheduler:
    g = config.generator
    return AdaptiveScheduler(SpeedupModel(profile), g.max_batch_size, ema=g.sd_acceptance_ema,
                             probe_interval=g.sd_probe_interval, min_speedup=g.sd_min_speedup)


def profile_warnings(config, profile: Profile) -> list[str]:
    """What makes a profile a poor fit for this run (each a sentence naming the key)."""
    g, warnings = config.generator, []
    if max(profile.batch_sizes) < g.max_batch_size:
        warnings.append(f"the profile stops at batch size {max(profile.batch_sizes)} < generator.max_batch_size "
                        f"{g.max_batch_size}: larger batches are extrapolated from the fit")
    for key, name in (("target", "model.path"), ("drafter", "model.drafter_path")):
        measured = profile.meta.get(key)
        configured = getattr(config.model, name.split(".")[1])
        if measured and configured and Path(measured).resolve() != Path(configured).resolve():
            warnings.append(f"the profile measured {key} {measured}, the run uses {name} = {configured}")
    clock = "wall" if str(config.model.device).startswith("cuda") else "cpu"
    if profile.clock != clock:
        warnings.append(f"the profile's step costs are on the {profile.clock} clock, the run's device "
                        f"{config.model.device} would use {clock}")
    return warnings
