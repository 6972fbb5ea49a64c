"""The progress watchdog: a run whose roles all answer pings but that makes no trainer step (here
a reward function that hangs after two steps) fails with a run.stalled event naming every role's
mailbox and work since the last step, within the stall timeout, instead of hanging."""

from __future__ import annotations

import time

from tests.roles.conftest import rl_config

HANGS_AFTER_TWO_STEPS = """
import os, time

def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    path = __file__ + ".calls"
    with open(path, "a") as f:
        f.write("x")
    if os.path.getsize(path) > 12:  # 2 steps of 3 groups x 2 samples: then the backend hangs
        time.sleep(3600)
    return float(solution_str.strip() == ground_truth)
"""


def test_a_run_that_stops_making_steps_fails_naming_what_waits(launch, random_actor_dir, tmp_path):
    reward_file = tmp_path / "hanging_reward.py"
    reward_file.write_text(HANGS_AFTER_TWO_STEPS)
    extra = f"""[reward]
source = "python:{reward_file}:compute_score"
timeout_s = 3600.0
"""
    toml = rl_config(random_actor_dir, steps=20, extra=extra).replace(
        "[supervisor]", "[supervisor]\nstall_timeout_s = 6.0", 1)
    run = launch(toml)
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
