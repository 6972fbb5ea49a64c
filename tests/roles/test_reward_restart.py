"""A reward role SIGKILLed while it holds groups (a slow reward function, so it always holds
some): the restarted role tells the trainer, which re-issues what it has outstanding, and the
run completes with every group trained exactly once (issue 15's first finding: it used to wait
forever)."""

from __future__ import annotations

import os
import signal

import pytest

from tests.roles.conftest import rl_config
from tests.roles.test_rl_loop import assert_each_group_trained_once, finished

pytestmark = pytest.mark.slow

SLOW_REWARD = """import asyncio


async def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    await asyncio.sleep(0.3)
    return float(solution_str.strip() == ground_truth)
"""


def test_a_killed_reward_role_holding_groups_loses_none_of_them(launch, random_actor_dir, tmp_path):
    reward_file = tmp_path / "slow.py"
    reward_file.write_text(SLOW_REWARD)
    extra = f'[reward]\nsource = "python:{reward_file}:compute_score"\n'
    run = launch(rl_config(random_actor_dir, steps=8, extra=extra))
    run.wait_event(lambda e: e.get("event") == "train.step" and e.get("step") == 2, timeout=180)
    os.kill(run.role_pids()["reward-0"][0], signal.SIGKILL)
    records = finished(run, timeout=300)
    assert len(run.role_pids()["reward-0"]) == 2  # restarted once
    assert records[-1].version == 8
    assert_each_group_trained_once(records, 8)
    reissued = [e for e in run.events("trainer-0") if e.get("event") == "trainer.reissue" and "reward" in e]
    assert reissued and reissued[0]["num_groups"] > 0
