"""What a Ray node's roles write reaches the supervisor's run directory: new tails of logs and
metrics appended, changed files replaced, checkpoints and the start files left where they are."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="Ray is not installed (pip install 'respec-async[ray]')")

from respec_async.launchers.ray_cluster import apply_change, changed_files  # noqa: E402


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def copy_back(node: Path, here: Path, copied: dict) -> list[tuple[str, int, bytes]]:
    changes = changed_files(node, copied)
    for rel, offset, data in changes:
        apply_change(here, rel, offset, data)
    return changes


def test_a_node_directory_is_mirrored_incrementally(tmp_path):
    node, here = tmp_path / "node", (tmp_path / "here").resolve()
    (node / "logs").mkdir(parents=True)
    here.mkdir()
    (node / "logs" / "trainer-0.jsonl").write_text('{"event": "a"}\n')
    (node / "profile.json").write_text('{"v": 1}')
    (node / "checkpoints" / "step-2").mkdir(parents=True)
    (node / "checkpoints" / "step-2" / "model.safetensors").write_bytes(b"\0" * 64)
    (node / "keys.json").write_text("secret")
    (node / ".config.json.part").write_text("half")
    copied: dict = {}
    copy_back(node, here, copied)
    assert tree(here) == {"logs/trainer-0.jsonl": b'{"event": "a"}\n', "profile.json": b'{"v": 1}'}

    with open(node / "logs" / "trainer-0.jsonl", "a") as f:
        f.write('{"event": "b", "half": ')  # a line still being written
    changes = copy_back(node, here, copied)
    assert [(rel, offset) for rel, offset, _ in changes] == [("logs/trainer-0.jsonl", 15)]  # the tail only
    with open(node / "logs" / "trainer-0.jsonl", "a") as f:
        f.write("true}\n")
    (node / "profile.json").write_text('{"v": 22}')
    os.utime(node / "profile.json", ns=(1, 1))  # a rewrite is seen by its mtime, whatever its size
    (node / "logs" / "generator-0.log").write_text("started\n")
    copy_back(node, here, copied)
    assert copy_back(node, here, copied) == []  # nothing new: nothing sent
    assert tree(here) == {k: v for k, v in tree(node).items()
                          if not k.startswith(("checkpoints", "keys", ".config"))}


def test_a_file_naming_a_place_outside_the_run_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match="outside the run directory"):
        apply_change(tmp_path.resolve(), "../elsewhere.txt", 0, b"x")
