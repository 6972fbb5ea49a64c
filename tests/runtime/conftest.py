"""Helpers to run a real supervisor (`respec launch`) in a subprocess and read its run dir."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


class LaunchedRun:
    def __init__(self, proc: subprocess.Popen[str], root: Path) -> None:
        self.proc = proc
        self.root = root

    @property
    def run_dir(self) -> Path:
        dirs = [p for p in self.root.iterdir() if p.is_dir()]
        assert len(dirs) == 1, dirs
        return dirs[0]

    def events(self, source: str = "supervisor") -> list[dict]:
        path = self.run_dir / "logs" / f"{source}.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line still being written
        return out

    def wait_event(self, predicate, timeout: float = 60.0, source: str = "supervisor") -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.root.exists() and any(self.root.iterdir()):
                for event in self.events(source):
                    if predicate(event):
                        return event
            if self.proc.poll() is not None and not any(predicate(e) for e in self.events(source)):
                raise AssertionError(f"supervisor exited ({self.proc.returncode}) before the event; "
                                     f"output:\n{self.output()}")
            time.sleep(0.1)
        raise AssertionError(f"event not seen within {timeout}s; events: {[e.get('event') for e in self.events(source)]}")

    def role_pids(self) -> dict[str, list[int]]:
        pids: dict[str, list[int]] = {}
        for e in self.events():
            if e.get("event") == "role.started":
                pids.setdefault(e["role"], []).append(e["pid"])
        return pids

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        if self.proc.poll() is None:
            return "<still running>"
        return self.proc.stdout.read() if self.proc.stdout else ""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie counts as gone
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        return state != "Z"
    except OSError:
        return False


@pytest.fixture
def launch(tmp_path):
    runs: list[LaunchedRun] = []

    def start(toml: str, *overrides: str, own_root: bool = False) -> LaunchedRun:
        # own_root: a run directory root of its own, so several runs can be told apart at once.
        root = tmp_path / (f"runs{len(runs)}" if own_root else "runs")
        config = tmp_path / f"config{len(runs)}.toml"
        if "[run]" in toml:
            toml = toml.replace("[run]", f'[run]\nroot = "{root}"', 1)
        else:
            toml = f'[run]\nroot = "{root}"\n' + toml
        config.write_text(toml)
        args = [sys.executable, "-m", "respec_async.cli", "launch", str(config)]
        for o in overrides:
            args += ["--set", o]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        run = LaunchedRun(proc, root)
        runs.append(run)
        return run

    yield start
    for run in runs:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
        for pids in (run.role_pids().values() if run.root.exists() and any(run.root.iterdir()) else []):
            for pid in pids:
                if pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)
