"""Checkpoint directories: written whole or not at all, pruned to the newest, and the staging
directory a writer killed mid-write left behind cleared by the next write."""

from __future__ import annotations

from respec_async.checkpoints import prune_step_dirs, replace_dir, step_dirs

MARKER = "counters.json"


def write(directory, step):
    return replace_dir(directory / f"step-{step}", lambda staging: (staging / MARKER).write_text("{}"))


def test_pruning_keeps_the_newest_and_clears_a_dead_writers_staging_directory(tmp_path):
    for step in (1, 2, 3):
        write(tmp_path, step)
    dead = tmp_path / ".staging-step-4-abc123"  # a writer SIGKILLed inside replace_dir
    dead.mkdir()
    (dead / "optimizer.pt").write_bytes(b"half")
    write(tmp_path, 5)
    prune_step_dirs(tmp_path, MARKER, keep=2)
    assert [step for step, _ in step_dirs(tmp_path, MARKER)] == [3, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3", "step-5"]


def test_a_writer_clears_only_staging_directories(tmp_path):
    from respec_async.checkpoints import clear_dead_staging

    write(tmp_path, 1)
    (tmp_path / ".staging-step-2-dead").mkdir()
    (tmp_path / "notes.txt").write_text("kept")
    clear_dead_staging(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "step-1"]
