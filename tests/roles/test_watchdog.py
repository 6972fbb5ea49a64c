"""The progress watchdog: a run whose roles all answer pings but that makes no trainer step (here
a reward function that hangs after two steps) gets a run.stalled event naming every role's
mailbox, work since the last step and the groups it holds, within the stall timeout, and then
fails, or (stall_action = "restart") restarts the role holding the groups and completes."""

from __future__ import annotations

import time

import pytest

from respec_async.ledger import audit_run
from tests.roles.conftest import rl_config
from tests.roles.test_rl_loop import assert_each_group_trained_once, finished

HANGS_AFTER_TWO_STEPS = """
import os, time
ONCE = {once}

def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    path = __file__ + ".calls"
    with open(path, "a") as f:
        f.write("x")
    if os.path.getsize(path) > 12 and not os.path.exists(path + ".hung"):  # after 2 steps of 3 x 2 samples
        if ONCE:
            open(path + ".hung", "w").close()
        time.sleep(3600)
    return float(solution_str.strip() == ground_truth)
"""


def hanging_run_config(actor_dir, tmp_path, *, once: bool, steps: int, supervisor: str) -> str:
    """A run whose reward hangs after two steps (for good, or once), with a 6 s stall timeout."""
    reward_file = tmp_path / "hanging_reward.py"
    reward_file.write_text(HANGS_AFTER_TWO_STEPS.format(once=once))
    extra = f"""[reward]
source = "python:{reward_file}:compute_score"
timeout_s = 3600.0
"""
    return rl_config(actor_dir, steps=steps, extra=extra).replace(
        "[supervisor]", "[supervisor]\nstall_timeout_s = 6.0\n" + supervisor, 1)


def test_a_run_that_stops_making_steps_fails_naming_what_waits(launch, random_actor_dir, tmp_path):
    run = launch(hanging_run_config(random_actor_dir, tmp_path, once=False, steps=20, supervisor=""))
    run.wait_event(lambda e: e.get("event") == "train.step" and e.get("step") == 1, timeout=120)
    seen = time.monotonic()
    code = run.proc.wait(timeout=60)
    waited = time.monotonic() - seen
    assert code == 1, run.output()
    stalled = [e for e in run.events() if e.get("event") == "run.stalled"]
    assert len(stalled) == 1 and set(stalled[0]["roles"]) == {"generator-0", "reward-0", "trainer-0"}
    assert 6.0 <= stalled[0]["waited_s"] < 9.0 and waited < 6.0 + 20.0
    failed = next(e for e in run.events() if e.get("event") == "run.failed")
    assert failed["reason"].startswith("no trainer step for ") and "supervisor.stall_timeout_s = 6" in failed["reason"]
    assert "reward-0: mailbox" in failed["reason"] and "trainer-0: mailbox" in failed["reason"]
    assert [e["step"] for e in run.events() if e.get("event") == "train.step"] == [0, 1]


@pytest.mark.parametrize("action", ["restart", "reissue"])
def test_a_stall_with_action_restart_or_reissue_frees_the_held_groups_and_the_run_completes(
        launch, random_actor_dir, tmp_path, action):
    run = launch(hanging_run_config(random_actor_dir, tmp_path, once=True, steps=5,
                                    supervisor=f'stall_action = "{action}"'))
    records = finished(run, timeout=180)
    stalled = [e for e in run.events() if e.get("event") == "run.stalled"]
    assert len(stalled) == 1 and stalled[0]["action"] == action
    assert stalled[0]["roles"]["reward-0"]["groups"] >= 1  # the hung one holds what the step waits for
    # restart: a new reward-0 (its groups re-issued through its hello); reissue: the same one,
    # whose other worker threads score the new attempts while one stays hung.
    assert len(run.role_pids()["reward-0"]) == (2 if action == "restart" else 1)
    assert_each_group_trained_once(records, 5)
    ledger = audit_run(run.run_dir)
    why = "holder_restarted" if action == "restart" else "stalled"
    assert ledger.balanced and ledger.reissue_reasons.get(why, 0) >= 1, ledger.summary()
