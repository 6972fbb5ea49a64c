"""A reward role SIGKILLed while it holds groups (a slow reward function, so it always holds
some): the restarted role tells the trainer, which re-issues the groups its ledger has at that
role and no others, and the run completes with every group trained exactly once and the ledger
balanced (issue 15's first finding: it used to wait forever). With two generators and two reward
roles a generator is killed in the same run."""

from __future__ import annotations

import os
import signal

import pytest

from respec_async.ledger import LEDGER_FILE, read_ledger
from tests.roles.conftest import rl_config
from tests.roles.test_rl_loop import assert_each_group_trained_once, finished

pytestmark = pytest.mark.slow

SLOW_REWARD = """import asyncio


async def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    await asyncio.sleep(0.3)
    return float(solution_str.strip() == ground_truth)
"""


@pytest.mark.parametrize("roles", [1, 2], ids=["one-each", "two-each"])
def test_a_killed_reward_role_holding_groups_loses_none_of_them(launch, random_actor_dir, tmp_path, roles):
    reward_file = tmp_path / "slow.py"
    reward_file.write_text(SLOW_REWARD)
    extra = f'[reward]\nsource = "python:{reward_file}:compute_score"\n'
    run = launch(rl_config(random_actor_dir, steps=8, generators=roles, rewards=roles, extra=extra))
    run.wait_event(lambda e: e.get("event") == "train.step" and e.get("step") == 2, timeout=180)
    os.kill(run.role_pids()["reward-0"][0], signal.SIGKILL)
    if roles == 2:
        os.kill(run.role_pids()["generator-1"][0], signal.SIGKILL)
    records = finished(run, timeout=300)  # and the ledger balanced
    assert len(run.role_pids()["reward-0"]) == 2  # restarted once
    assert records[-1].version == 8
    assert_each_group_trained_once(records, 8)
    # Each group re-issued for reward-0's restart was, by the roles' receipts, at reward-0 (or
    # on its way there) when it was re-issued: the trainer knew where it was.
    events = read_ledger(run.run_dir / LEDGER_FILE)
    where: dict[tuple[int, int], str] = {}
    reissued = []
    for e in events:
        if e.kind in ("issue", "reissue", "move"):
            if e.kind == "reissue" and e.reason == "holder_restarted" and e.lost_by == "reward-0":
                reissued.append(where[(e.group_id, e.attempt - 1)])
            where[(e.group_id, e.attempt)] = e.holder
    assert reissued and set(reissued) == {"reward-0"}, reissued
    warned = [e for e in run.events() if e.get("event") == "trainer.reissue" and e.get("holder") == "reward-0"]
    assert warned and warned[0]["level"] == "warning" and warned[0]["reason"] == "holder_restarted", warned
    lost_by = {e.lost_by for e in events if e.kind == "reissue"}
    assert "reward-0" in lost_by and lost_by <= {"reward-0", "generator-1"}, lost_by
