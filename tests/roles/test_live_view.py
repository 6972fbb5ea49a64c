"""`respec launch` on a terminal: the live view (progress over RL steps, ETA, latest metrics, the
role table) read back from a real pseudo-terminal, and the event stream kept to the log files."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

from tests.roles.conftest import rl_config

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")


def terminal_env() -> dict[str, str]:
    """The environment of a program on a 150-column terminal: COLUMNS / LINES removed (pytest-xdist
    sets them to 80 x 24 in its workers, and rich reads them before the terminal's own size)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return {**env, "TERM": "xterm-256color"}


def run_on_a_terminal(args: list[str], timeout_s: float = 240.0) -> tuple[int, str]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 150, 0, 0))  # rows, columns
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                            env=terminal_env())
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the terminal closed: every writer exited
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    code = proc.wait(timeout=30)
    return code, ANSI.sub("", b"".join(chunks).decode(errors="replace"))


SLOW_REWARD = """
import time

def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    time.sleep(0.15)  # 6 samples a step: ~1 s steps, slow enough for a view redrawn twice a second
    return float(solution_str.strip() == ground_truth)
"""


def test_the_live_view_shows_steps_advancing_an_eta_and_no_event_stream(random_actor_dir, tmp_path):
    root = tmp_path / "runs"
    (tmp_path / "slow_reward.py").write_text(SLOW_REWARD)
    extra = f'[reward]\nsource = "python:{tmp_path / "slow_reward.py"}:compute_score"\n'
    toml = rl_config(random_actor_dir, steps=12, k=0, extra=extra).replace("live_status = false",
                                                                             "live_status = true")
    config = tmp_path / "live.toml"
    config.write_text(toml.replace("[run]", f'[run]\nroot = "{root}"', 1))
    code, screen = run_on_a_terminal([sys.executable, "-m", "respec_async.cli", "launch", str(config)])
    assert code == 0, screen[-3000:]
    shown = [int(n) for n in re.findall(r"step (\d+)/12", screen)]
    assert len(set(shown)) >= 3 and shown == sorted(shown), shown  # the counter advances
    assert re.search(r"ETA \d:\d\d:\d\d", screen) and re.search(r"\d+\.\d\d steps/s", screen)
    assert re.search(r"reward \d\.\d{3}\s+acc \d\.\d{3}\s+len \d", screen)
    assert "trainer-0" in screen and "last heartbeat" in screen  # the role table under it
    # The console shows the view, warnings and milestones; every event is in the log files.
    assert "train.step" not in screen and "role.started" not in screen
    (run_dir,) = root.iterdir()
    log = (run_dir / "logs" / "supervisor.jsonl").read_text()
    assert log.count('"event": "train.step"') == 12
    assert "run " in screen and "12 steps in" in screen  # the end-of-run summary still prints
