"""Directories written whole or not at all, and a run's checkpoints among them.

`replace_dir` fills a temporary directory beside the final path and renames it into place, so a
crash mid-write never leaves a half directory behind: the trainer's `checkpoints/step-N`, the
drafter learner's `drafter_checkpoints/step-N` and the zoo's stages are all written this way.
A checkpoint is a `step-N` directory holding a marker file (written inside the stage, so it
exists only in complete checkpoints); the latest is the one with the largest N.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def replace_dir(final: Path, fill: Callable[[Path], object]) -> Path:
    """fill(staging_dir) in a temporary directory beside final, then rename it into place: final
    is either absent, the old directory, or complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{final.name}-", dir=final.parent))
    try:
        fill(staging)
        if final.exists():
            shutil.rmtree(final)
        os.rename(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def step_dirs(directory: Path, marker: str) -> list[tuple[int, Path]]:
    """The complete checkpoints (step-N holding `marker`) in directory, oldest first."""
    found = []
    for path in directory.glob("step-*"):
        step = path.name.removeprefix("step-")
        if step.isdigit() and (path / marker).exists():
            found.append((int(step), path))
    return sorted(found)


def latest_step_dir(directory: Path, marker: str) -> Path | None:
    found = step_dirs(directory, marker)
    return found[-1][1] if found else None


def prune_step_dirs(directory: Path, marker: str, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and dead writers' staging."""
    found = step_dirs(directory, marker)
    for _, path in found[:max(len(found) - keep, 0)]:
        shutil.rmtree(path, ignore_errors=True)
    clear_dead_staging(directory)


def clear_dead_staging(directory: Path) -> None:
    """Delete the staging directories a writer killed inside replace_dir left behind. Only for a
    directory with one writer, after its own write: any other staging directory is a dead one's."""
    for path in directory.glob(".staging-*"):
        shutil.rmtree(path, ignore_errors=True)
