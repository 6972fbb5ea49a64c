"""Directories written whole or not at all, and a run's checkpoints among them.

`replace_dir` fills a temporary directory beside the final path and renames it into place, so a
crash mid-write never leaves a half directory behind: the trainer's `checkpoints/step-N`, the
drafter learner's `drafter_checkpoints/step-N` and the zoo's stages are all written this way.
A checkpoint is a `step-N` directory holding a marker file (written inside the stage, so it
exists only in complete checkpoints); the latest is the one with the largest N. Its
`manifest.json`, written last, lists every file's size and SHA-256: `verify_manifest` names
the first file that does not match (truncated, corrupted, missing), so a resume can fall back to
the newest checkpoint that is intact.
"""

from __future__ import annotations

import hashlib
import json
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


def newest_intact_step_dir(directory: Path, marker: str, warn=None) -> Path | None:
    """The newest complete checkpoint whose manifest verifies; each newer one that does not is
    reported with warn(path, reason)."""
    for _, path in reversed(step_dirs(directory, marker)):
        try:
            verify_manifest(path)
            return path
        except CheckpointError as exc:
            if warn is not None:
                warn(path, str(exc))
    return None


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


MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Every file under directory (but the manifest) with its size and SHA-256; call it last."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (directory / MANIFEST).write_text(json.dumps({"files": entries}, indent=1))


def verify_manifest(directory: Path) -> None:
    """Raise CheckpointError naming the first file that is missing or differs from the manifest
    (a checkpoint written before manifests existed has none: nothing to check)."""
    path = directory / MANIFEST
    if not path.exists():
        return
    try:
        entries = json.loads(path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a valid manifest ({exc})") from None
    for name, entry in entries.items():
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {path})")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{file}: {size} bytes, the manifest says {entry['bytes']} (truncated or "
                                  f"overwritten)")
        if _sha256(file) != entry["sha256"]:
            raise CheckpointError(f"{file}: its SHA-256 differs from the manifest's (corrupted)")
