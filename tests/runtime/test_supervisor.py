"""The supervisor with real role processes: start, restart, hang detection, limits, shutdown."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.runtime.conftest import pid_alive

pytestmark = pytest.mark.process

ECHO_SERVE = """
[roles]
generator = 0
reward = 0
trainer = 0
echo = 2
[supervisor]
live_status = false
ping_interval_s = 0.5
ping_timeout_s = 4.0
restart_backoff_s = 0.2
shutdown_grace_s = 4.0
"""


def is_ready(role: str, pid: int | None = None):
    return lambda e: e.get("event") == "role.ready" and e.get("role") == role and (pid is None or e.get("pid") == pid)


def test_diagnostic_run_completes_when_its_driver_finishes(launch):
    run = launch(ECHO_SERVE + "[echo]\nnum_rounds = 50\n")
    assert run.proc.wait(timeout=120) == 0, run.output()
    events = [e["event"] for e in run.events()]
    assert "echo.done" in events and events[-1] == "run.finished"
    done = next(e for e in run.events() if e["event"] == "echo.done")
    assert done["num_rounds"] == 50
    assert all(not pid_alive(p) for pids in run.role_pids().values() for p in pids)


def test_sigkilled_role_is_restarted_and_run_continues(launch):
    run = launch(ECHO_SERVE)
    run.wait_event(lambda e: e.get("event") == "run.ready")
    old_pid = run.role_pids()["echo-1"][0]
    os.kill(old_pid, signal.SIGKILL)
    run.wait_event(lambda e: e.get("event") == "role.restarting" and e.get("role") == "echo-1")
    started = run.wait_event(lambda e: e.get("event") == "role.started" and e.get("role") == "echo-1"
                             and e.get("restarts") == 1)
    assert started["pid"] != old_pid
    run.wait_event(is_ready("echo-1", started["pid"]))
    assert run.proc.poll() is None  # the run goes on
    assert run.stop() == 0, run.output()


def test_hung_role_is_killed_and_restarted(launch):
    run = launch(ECHO_SERVE)
    run.wait_event(lambda e: e.get("event") == "run.ready")
    pid = run.role_pids()["echo-0"][0]
    os.kill(pid, signal.SIGSTOP)  # alive but silent
    event = run.wait_event(lambda e: e.get("event") == "role.restarting" and e.get("role") == "echo-0", timeout=30)
    assert "stopped answering pings" in event["why"]
    assert not pid_alive(pid)
    run.wait_event(lambda e: e.get("event") == "role.ready" and e.get("role") == "echo-0" and e.get("pid") != pid)
    assert run.stop() == 0, run.output()


def test_restarts_past_the_limit_fail_the_run_with_the_reason(launch):
    run = launch(ECHO_SERVE, "supervisor.max_restarts=1")
    run.wait_event(lambda e: e.get("event") == "run.ready")
    os.kill(run.role_pids()["echo-1"][0], signal.SIGKILL)
    started = run.wait_event(lambda e: e.get("event") == "role.started" and e.get("role") == "echo-1"
                             and e.get("restarts") == 1)
    run.wait_event(is_ready("echo-1", started["pid"]))
    os.kill(started["pid"], signal.SIGKILL)
    assert run.proc.wait(timeout=60) == 1
    failed = run.wait_event(lambda e: e.get("event") == "run.failed")
    assert "echo-1" in failed["reason"] and "max_restarts = 1" in failed["reason"]
    assert "signal 9" in failed["reason"]
    assert all(not pid_alive(p) for pids in run.role_pids().values() for p in pids)


def test_sigterm_to_supervisor_leaves_no_child_process(launch):
    run = launch(ECHO_SERVE)
    run.wait_event(lambda e: e.get("event") == "run.ready")
    pids = [p for ps in run.role_pids().values() for p in ps]
    assert pids and all(pid_alive(p) for p in pids)
    assert run.stop(signal.SIGTERM) == 0
    assert not any(pid_alive(p) for p in pids)
    stopped = [e for e in run.events() if e.get("event") == "run.stopping"]
    assert "SIGTERM" in stopped[0]["reason"]


def test_roles_that_ignore_shutdown_are_killed_after_the_grace_period(launch):
    run = launch(ECHO_SERVE, "supervisor.shutdown_grace_s=2.0")
    run.wait_event(lambda e: e.get("event") == "run.ready")
    pids = [p for ps in run.role_pids().values() for p in ps]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)  # cannot handle Shutdown or SIGTERM
    started = time.monotonic()
    assert run.stop(signal.SIGINT) == 0
    assert time.monotonic() - started < 15
    assert not any(pid_alive(p) for p in pids)
    assert any(e.get("event") == "roles.signal" and e.get("signal") == "SIGKILL" for e in run.events())


def test_sigkill_of_the_supervisor_takes_its_roles_down(launch):
    run = launch(ECHO_SERVE)
    run.wait_event(lambda e: e.get("event") == "run.ready")
    pids = [p for ps in run.role_pids().values() for p in ps]
    run.stop(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(pid_alive(p) for p in pids)


def test_role_not_ready_in_time_is_named(launch):
    run = launch(ECHO_SERVE, "supervisor.ready_timeout_s=0.3")
    assert run.proc.wait(timeout=60) == 1
    failed = run.wait_event(lambda e: e.get("event") == "run.failed")
    assert "not ready within 0.3s" in failed["reason"] and "echo-0" in failed["reason"]
