"""The live view's content, rendered by rich into a recorded console: the step counter, elapsed
time and ETA from the steps' rate (start-up excluded), the latest metrics with SD fields only
where SD ran, and the role table."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from rich.console import Console

from respec_async.status import Progress, StatusView
from respec_async.supervisor import RoleProcess

FIELDS = {"step": 0, "reward": 0.5, "acc": 0.25, "len": 30.0, "tok_s": 1200, "stale_max": 1, "wait_s": 0.1,
          "train_s": 0.2}


def test_eta_comes_from_the_rate_of_steps_after_the_first():
    progress = Progress(10, started=0.0)
    assert progress.eta_s() is None
    progress.on_step({**FIELDS, "step": 0}, now=30.0)  # 30 s of start-up
    assert progress.eta_s() is None
    progress.on_step({**FIELDS, "step": 1}, now=32.0)
    progress.on_step({**FIELDS, "step": 2}, now=34.0)  # 2 s a step
    assert progress.steps_done == 3 and progress.steps_per_s() == 0.5 and progress.eta_s() == 14.0


def render(view: StatusView) -> str:
    console = Console(record=True, width=140)
    console.print(view.render())
    return console.export_text()


def test_the_view_shows_progress_metrics_and_roles():
    role = SimpleNamespace(name="trainer-0", pid=42, state="running", num_restarts=1, last_pong_at=0.0,
                           mailbox_size=0, num_handled=5, num_dropped=0, busy_share=0.75)
    view = StatusView(SimpleNamespace(run_dir=Path("runs/tiny-1"), roles={"trainer-0": role}), live=False, num_steps=60)
    assert "waiting for the first step" in render(view)
    view.on_step({**FIELDS, "step": 11})
    text = render(view)
    assert "step 12/60" in text and "20%" in text and "ETA -:--:--" in text
    assert "reward 0.500  acc 0.250  len 30.0  tok/s 1,200  stale 1" in text
    assert "SD" not in text and "accept" not in text  # SD never ran: nothing said about it
    assert "trainer-0" in text and "42" in text and "busy" in text and "75%" in text
    view.on_step({**FIELDS, "step": 12, "sd": 0.45, "accept_len": 3.2})
    text = render(view)
    assert "SD 45% of steps  accept 3.20" in text and "step 13/60" in text
    assert "node" not in text  # one machine: no node column


def test_on_a_cluster_the_role_table_says_which_node_each_role_is_on():
    roles = {name: SimpleNamespace(name=name, pid=pid, state="running", num_restarts=0, last_pong_at=0.0,
                                   mailbox_size=0, num_handled=0, num_dropped=0, busy_share=None, node=node)
             for name, pid, node in (("generator-0", 7, "10.0.0.2"), ("trainer-0", 8, "10.0.0.1"))}
    text = render(StatusView(SimpleNamespace(run_dir=Path("runs/tiny-1"), roles=roles), live=False, num_steps=60))
    rows = {line.split()[1]: line for line in text.splitlines() if "-0 " in line}
    assert "node" in text and "10.0.0.2" in rows["generator-0"] and "10.0.0.1" in rows["trainer-0"]


def test_under_the_live_view_the_console_keeps_warnings_and_milestones_only():
    from respec_async.logs import console_worthy

    assert not console_worthy({"level": "info", "event": "train.step"})
    assert not console_worthy({"level": "info", "event": "role.started"})
    assert console_worthy({"level": "warning", "event": "role.restarting"})
    assert console_worthy({"level": "error", "event": "role.failed"})
    assert console_worthy({"level": "info", "event": "run.finished"})


def test_the_busy_share_is_over_the_last_ten_seconds_and_starts_again_with_an_incarnation():
    role = RoleProcess("generator-0")
    assert role.busy_share is None
    role.on_busy(0.0, 0.0)
    role.on_busy(5.0, 2.5)
    assert role.busy_share == 0.5
    role.on_busy(10.0, 5.0)
    role.on_busy(15.0, 10.0)  # the sample at 0 s falls out of the window: (10 - 2.5) / (15 - 5)
    assert role.busy_share == 0.75
    role.on_busy(16.0, 0.5)  # a restarted role reports from zero
    assert role.busy_share is None
