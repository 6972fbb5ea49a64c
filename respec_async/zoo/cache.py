"""The zoo's cache: stages keyed by their spec, copied from the package's trained copies when
they match, trained (under a file lock, into a staging directory renamed into place) otherwise."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from respec_async.checkpoints import replace_dir
from respec_async.zoo.spec import STAMP_NAME, ZOO_FORMAT_VERSION, ZooSpec

@dataclass(frozen=True)
class ZooPaths:
    target_dir: Path  # Hugging Face layout: config.json, model.safetensors, tokenizer.json
    drafter_dir: Path  # Eagle3Drafter.save_pretrained layout
    tokenizer_path: Path


def default_cache_dir() -> Path:
    return Path(os.environ.get("RESPEC_ZOO_DIR") or Path.home() / ".cache" / "respec_async" / "zoo")


# Trained copies of the default zoo's two stages, shipped with the package (about 4 MB) so a
# fresh clone's demo does not spend six minutes training the target first. They are what this
# package's training writes, stamp included; ensure_zoo copies a stage from here into the cache
# only when its stamp's key matches the spec (any recipe change retrains), and --force always
# retrains. Refresh them with `python -m respec_async.zoo --force --ship`.
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"


def _stage_dirs(cache_dir: Path, spec: ZooSpec) -> tuple[Path, Path]:
    return cache_dir / f"target-{spec.target_key()}", cache_dir / f"zoo-{spec.key()}"


def _paths(cache_dir: Path, spec: ZooSpec) -> ZooPaths:
    target_root, zoo_root = _stage_dirs(cache_dir, spec)
    return ZooPaths(target_dir=target_root, drafter_dir=zoo_root / "drafter",
                    tokenizer_path=target_root / "tokenizer.json")


TARGET_FILES = ("config.json", "model.safetensors", "tokenizer.json")
DRAFTER_FILES = ("drafter/config.json", "drafter/model.safetensors")


def _stamp_matches(root: Path, key: str, required: tuple[str, ...]) -> bool:
    try:
        stamp = json.loads((root / STAMP_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return stamp.get("key") == key and all((root / name).is_file() for name in required)


def is_complete(cache_dir: Path, spec: ZooSpec) -> bool:
    target_root, zoo_root = _stage_dirs(cache_dir, spec)
    return (_stamp_matches(target_root, spec.target_key(), TARGET_FILES)
            and _stamp_matches(zoo_root, spec.key(), DRAFTER_FILES))


def _copy_shipped(root: Path, key: str, required: tuple[str, ...], log: Callable[[str], None]) -> bool:
    """Copy the shipped stage named like root into root if its stamp matches key."""
    shipped = SHIPPED_DIR / root.name
    if not _stamp_matches(shipped, key, required):
        return False
    replace_dir(root, lambda staging: shutil.copytree(shipped, staging, dirs_exist_ok=True))
    log(f"zoo: {root.name} copied from the trained copy shipped with the package "
        f"(python -m respec_async.zoo --force retrains it)")
    return True


def _build_stage(root: Path, key: str, build: Callable[[Path], dict]) -> None:
    """Run build(staging_dir) -> metrics and stamp the result, into root (see checkpoints.replace_dir)."""

    def fill(staging: Path) -> None:
        metrics = build(staging)
        (staging / STAMP_NAME).write_text(json.dumps({"key": key, "format_version": ZOO_FORMAT_VERSION,
                                                      "metrics": metrics}, indent=2))

    replace_dir(root, fill)


def ensure_zoo(cache_dir: str | Path | None = None, spec: ZooSpec | None = None, force: bool = False,
               log: Callable[[str], None] | None = None, num_threads: int = 1,
               with_drafter: bool = True) -> ZooPaths:
    """The zoo's directories, trained first unless a matching one is cached (see module docstring).

    Two stages, each cached under its own key: target-<key> (model + tokenizer) and zoo-<key>
    (the drafter, the evaluation, the full spec). --force retrains both. with_drafter=False
    makes sure of the target stage only (a run without speculative decoding needs no drafter);
    the returned drafter_dir then exists only if an earlier call trained it.

    Training runs on num_threads torch threads (restored afterwards). One is the default: these
    matrices are too small to gain from a second thread, and on a shared machine it can cost
    several times more (docs/BENCHMARKS.md, "The model zoo")."""
    spec = spec or ZooSpec()
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    return _ensure_zoo_locked(cache_dir, spec, force, log, with_drafter, num_threads)


def _train(stage: str, *args, num_threads: int) -> dict:
    """A stage of respec_async.zoo.training on num_threads torch threads (restored afterwards):
    the training code and torch are imported only when a stage is trained."""
    import torch

    from respec_async.zoo import training

    previous_num_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        return getattr(training, stage)(*args)
    finally:
        torch.set_num_threads(previous_num_threads)


def _ensure_zoo_locked(cache_dir: Path, spec: ZooSpec, force: bool, log: Callable[[str], None],
                       with_drafter: bool, num_threads: int) -> ZooPaths:
    paths = _paths(cache_dir, spec)
    target_root, zoo_root = _stage_dirs(cache_dir, spec)
    with open(cache_dir / ".lock", "w") as lock:
        # Serialises concurrent callers: the second waits, then finds the first one's zoo.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(cache_dir, spec) and not force:
            log(f"zoo: using cached {zoo_root}")
            return paths
        target_ready = _stamp_matches(target_root, spec.target_key(), TARGET_FILES)
        if not with_drafter and target_ready and not force:
            log(f"zoo: using cached target {target_root}")
            return paths
        # Holding the lock, any staging directory is a killed builder's leftover.
        for leftover in cache_dir.glob(".staging-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        if force or not target_ready:
            if force or not _copy_shipped(target_root, spec.target_key(), TARGET_FILES, log):
                _build_stage(target_root, spec.target_key(),
                             lambda out: _train("train_target_stage", out, spec, log, num_threads=num_threads))
        else:
            log(f"zoo: using cached target {target_root}")
        if not with_drafter:
            log(f"zoo: target ready in {target_root}")
            return paths
        if not force and _copy_shipped(zoo_root, spec.key(), DRAFTER_FILES, log):
            return paths

        def build_drafter_stage(out: Path) -> dict:
            metrics = _train("train_drafter_stage", target_root, out / "drafter", spec, log, num_threads=num_threads)
            metrics["spec"] = dataclasses.asdict(spec)
            return metrics

        _build_stage(zoo_root, spec.key(), build_drafter_stage)
    log(f"zoo: saved to {zoo_root}")
    return paths


def read_stamp(paths: ZooPaths) -> dict:
    """The zoo's record: key, spec and every measured number (target, drafter, generation)."""
    stamp = json.loads((paths.drafter_dir.parent / STAMP_NAME).read_text())
    target_stamp = json.loads((paths.target_dir / STAMP_NAME).read_text())
    stamp["metrics"]["target"] = target_stamp["metrics"]
    return stamp


def ship(paths: ZooPaths, shipped_dir: Path | None = None) -> None:
    """Replace the shipped copies of this zoo's two stages (target and drafter) and their stamps;
    other stages shipped (another task's zoo) stay."""
    shipped_dir = shipped_dir or SHIPPED_DIR
    shipped_dir.mkdir(parents=True, exist_ok=True)
    for stage in (paths.target_dir, paths.drafter_dir.parent):
        if (shipped_dir / stage.name).exists():
            shutil.rmtree(shipped_dir / stage.name)
        shutil.copytree(stage, shipped_dir / stage.name, ignore=shutil.ignore_patterns(".*"))
    print(f"shipped: {shipped_dir}")


