"""What a Ray node's roles write reaches the supervisor's run directory: new tails of logs and
metrics appended, changed files replaced, checkpoints and the start files left where they are;
nothing lost when a copy call is lost, nothing of an earlier launch overwritten."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="Ray is not installed (pip install 'respec-async[ray]')")

from respec_async.launchers import ray_cluster  # noqa: E402
from respec_async.launchers.ray_cluster import CopyBack, changed_files  # noqa: E402


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def copy(node: Path, back: CopyBack) -> list:
    changes = changed_files(node, back.copied, back.held())
    back.apply(changes)
    return changes


@pytest.fixture
def dirs(tmp_path):
    node, here = tmp_path / "node", (tmp_path / "here").resolve()
    (node / "logs").mkdir(parents=True)
    here.mkdir()
    return node, here


def test_a_node_directory_is_mirrored_incrementally(dirs):
    node, here = dirs
    (node / "logs" / "trainer-0.jsonl").write_text('{"event": "a"}\n')
    (node / "profile.json").write_text('{"v": 1}')
    (node / "checkpoints" / "step-2").mkdir(parents=True)
    (node / "checkpoints" / "step-2" / "model.safetensors").write_bytes(b"\0" * 64)
    (node / "keys.json").write_text("secret")
    (node / ".config.json.part").write_text("half")
    back = CopyBack(here)
    copy(node, back)
    assert tree(here) == {"logs/trainer-0.jsonl": b'{"event": "a"}\n', "profile.json": b'{"v": 1}'}

    with open(node / "logs" / "trainer-0.jsonl", "a") as f:
        f.write('{"event": "b", "half": ')  # a line still being written
    changes = copy(node, back)
    assert [(rel, offset) for rel, offset, *_ in changes] == [("logs/trainer-0.jsonl", 15)]  # the tail only
    with open(node / "logs" / "trainer-0.jsonl", "a") as f:
        f.write("true}\n")
    (node / "profile.json").write_text('{"v": 22}')
    os.utime(node / "profile.json", ns=(1, 1))  # a rewrite is seen by its mtime, whatever its size
    (node / "logs" / "generator-0.log").write_text("started\n")
    copy(node, back)
    assert copy(node, back) == []  # nothing new: nothing sent
    assert tree(here) == {k: v for k, v in tree(node).items()
                          if not k.startswith(("checkpoints", "keys", ".config"))}


def test_bytes_a_lost_call_carried_are_sent_again(dirs):
    node, here = dirs
    back = CopyBack(here)
    (node / "ledger.jsonl").write_text("issued 0\n")
    copy(node, back)
    with open(node / "ledger.jsonl", "a") as f:
        f.write("issued 1\n")
    changed_files(node, back.copied, back.held())  # computed on the node, never applied (a timed-out call)
    with open(node / "ledger.jsonl", "a") as f:
        f.write("issued 2\n")
    copy(node, back)
    assert (here / "ledger.jsonl").read_text() == "issued 0\nissued 1\nissued 2\n"  # no hole, no NULs


def test_logs_of_an_earlier_launch_are_continued_not_replaced(dirs):
    node, here = dirs
    (here / "logs").mkdir()
    (here / "logs" / "generator-0.jsonl").write_text("first launch\n")
    (here / "metrics.jsonl").write_text("step 0\nstep 1\n")
    # The same machine again: its file still starts with what the run directory holds.
    (node / "metrics.jsonl").write_text("step 0\nstep 1\nstep 2\n")
    # Another machine: a new file of its own.
    (node / "logs" / "generator-0.jsonl").write_text("second launch\n")
    back = CopyBack(here)
    copy(node, back)
    assert (here / "metrics.jsonl").read_text() == "step 0\nstep 1\nstep 2\n"
    assert (here / "logs" / "generator-0.jsonl").read_text() == "first launch\nsecond launch\n"
    with open(node / "logs" / "generator-0.jsonl", "a") as f:
        f.write("more\n")
    copy(node, back)
    assert (here / "logs" / "generator-0.jsonl").read_text() == "first launch\nsecond launch\nmore\n"


def test_a_file_naming_a_place_outside_the_run_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match="outside the run directory"):
        CopyBack(tmp_path.resolve()).apply([("../elsewhere.txt", 0, b"x", 1, False)])


def test_logs_bigger_than_one_piece_come_in_pieces_even_when_first_seen_on_a_resume(dirs, monkeypatch):
    monkeypatch.setattr(ray_cluster, "_MAX_COPY_BYTES", 64)
    node, here = dirs
    lines = "".join(f"step {i:04d}\n" for i in range(40))  # 400 bytes: seven pieces
    (here / "metrics.jsonl").write_text(lines[:200])  # an earlier launch's copy, beyond one piece
    (node / "metrics.jsonl").write_text(lines)  # the same machine's file, grown since
    (node / "logs" / "reward-0.jsonl").write_text(lines)  # never seen before, beyond one piece
    back = CopyBack(here)
    for _ in range(10):
        copy(node, back)
    assert (here / "metrics.jsonl").read_text() == lines  # continued from 200 bytes, nothing doubled
    assert (here / "logs" / "reward-0.jsonl").read_text() == lines
    assert copy(node, back) == []
