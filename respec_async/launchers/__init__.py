"""Where the supervisor's role processes run: here (`local`) or on a Ray cluster (`ray`).

A launcher starts one role process (`python -m roles NAME --run-dir DIR --restart-count N`)
and hands back a handle with the part of `subprocess.Popen`'s interface the supervisor uses:
`pid`, `poll()`, `wait()`, `send_signal()`, `kill()`, `returncode`, plus `lost`: why the
process can no longer be reached at all (its node died), or None. The supervisor's restart,
heartbeat and shutdown logic is the same whichever launcher runs the processes.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Protocol

_PR_SET_PDEATHSIG = 1
try:  # loaded here: a preexec_fn runs between fork and exec, no place to load a library in
    _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:
    _LIBC = None


def die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGKILL to the role if the process that started it dies."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def role_argv(name: str, run_dir: Path, restart_count: int) -> list[str]:
    return [sys.executable, "-m", "roles", name, "--run-dir", str(run_dir), "--restart-count", str(restart_count)]


def start_role(name: str, run_dir: Path, restart_count: int, cls: type = subprocess.Popen) -> subprocess.Popen:
    """One role process on this machine, its output appended to <run_dir>/logs/<name>.log; it
    dies with the process that started it."""
    with open(run_dir / "logs" / f"{name}.log", "ab") as out:
        return cls(
            role_argv(name, run_dir, restart_count), stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, preexec_fn=die_with_parent, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


class PlacementFailed(RuntimeError):
    """The launcher cannot place a role (at start, or again after its node was lost); the
    message says what is missing."""


class RoleHandle(Protocol):
    pid: int
    returncode: int | None
    lost: str | None

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def send_signal(self, sig: int) -> None: ...
    def kill(self) -> None: ...


class Launcher(Protocol):
    copies_back: bool  # roles write elsewhere: sync() copies their files into the run directory

    def spawn(self, name: str, restart_count: int) -> RoleHandle: ...
    def host_rendezvous(self, rendezvous: str) -> object | None: ...
    def relocate(self, name: str, endpoints: object) -> str: ...
    def stop_moving(self) -> None: ...
    def where(self, name: str) -> dict[str, str]: ...
    def sync(self) -> object: ...
    def close(self) -> None: ...


class LocalProcess(subprocess.Popen):
    """A role process of this machine: nothing but its own exit can make it unreachable."""

    lost: str | None = None


class LocalLauncher:
    """Every role a child process of the supervisor, in the supervisor's run directory."""

    copies_back = False

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def spawn(self, name: str, restart_count: int) -> RoleHandle:
        return start_role(name, self.run_dir, restart_count, cls=LocalProcess)

    def host_rendezvous(self, rendezvous: str) -> object:
        from transport.weights import host_rendezvous_store  # imports torch: not before a run starts

        return host_rendezvous_store(rendezvous)

    def relocate(self, name: str, endpoints: object) -> str:
        raise PlacementFailed("a local role has no other machine to go to")  # and is never lost

    def stop_moving(self) -> None:
        pass

    def where(self, name: str) -> dict[str, str]:
        return {}

    def close(self) -> None:
        pass
