"""Test tiers. `make check` runs every test that starts no process and is not marked slow
(`pytest -m "not process and not slow"`, about a minute on 2 cores); `make test` runs them all.
A test that starts a process (a role, a reward server, a CLI, a torch.distributed peer) is
marked `process`: modules set `pytestmark`, tests/roles/ is marked whole. The quick tier
enforces it: an unmarked test that starts a process fails, naming itself."""

from __future__ import annotations

import multiprocessing.process
import subprocess
from pathlib import Path

import pytest

PROCESS_DIRS = ("roles",)  # every test under tests/<dir>/ starts role processes


def pytest_configure(config):
    # matplotlib builds its font cache on first import by running fc-list: do it here, before the
    # guard below, or the first plotting test of a fresh machine counts as starting a process.
    import matplotlib.font_manager  # noqa: F401


# Files that take minutes, run first: `make test` hands whole files to two xdist workers in
# collection order, and a long file dealt last leaves one worker idle while it runs.
LONGEST_FIRST = ("roles/test_ray_cluster.py", "roles/test_drafter_learner.py", "roles/test_rl_loop.py")


def pytest_collection_modifyitems(config, items):
    root = Path(__file__).resolve().parent
    paths = {}
    for item in items:
        parts = Path(item.path).resolve().relative_to(root).parts
        paths[item.nodeid] = "/".join(parts)
        if parts and parts[0] in PROCESS_DIRS:
            item.add_marker(pytest.mark.process)

    def rank(item) -> int:  # a stable sort: a file's tests stay together and in order
        path = paths[item.nodeid]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)


@pytest.fixture(autouse=True)
def _no_process_unless_marked(request, monkeypatch):
    if request.node.get_closest_marker("process") is not None:
        return

    def refuse(*args, **kwargs):
        raise RuntimeError(f"{request.node.nodeid} starts a process: mark it pytest.mark.process "
                           "(tests/conftest.py)")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
