"""DAPO dynamic sampling in a real launch: groups whose rewards are all equal are dropped and
replaced until each step has its informative groups; every data position is trained or dropped
exactly once, through a SIGKILLed and resumed trainer too."""

from __future__ import annotations

import os
import signal

from tests.roles.conftest import rl_config
from tests.roles.test_rl_loop import finished

# A coin per sample (crc32 of its text): with 2 samples a group is informative half the time.
# The sleep keeps the run long enough for the test to kill the trainer midway (without it a
# fast machine ran all 8 steps before the kill landed).
COIN_REWARD = """import time
import zlib


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    time.sleep(0.15)
    return float(zlib.crc32(solution_str.encode()) % 2)
"""


def ledger(records) -> list[int]:
    return sorted(g for r in records for g in [*r.group_ids, *r.filtered_group_ids])


def test_uninformative_groups_are_dropped_replaced_and_accounted_for_across_a_trainer_restart(
        launch, random_actor_dir, tmp_path):
    reward_file = tmp_path / "coin.py"
    reward_file.write_text(COIN_REWARD)
    extra = f'[reward]\nsource = "python:{reward_file}:compute_score"\n'
    run = launch(rl_config(random_actor_dir, steps=8, extra=extra), "trainer.dynamic_sampling=true",
                 "trainer.dynamic_sampling_max_factor=3", "sampling.temperature=1.0")
    run.wait_event(lambda e: e.get("event") == "trainer.checkpoint" and e.get("version") == 4,
                   timeout=180, source="trainer-0")
    os.kill(run.role_pids()["trainer-0"][0], signal.SIGKILL)
    run.wait_event(lambda e: e.get("event") == "trainer.resumed", timeout=120, source="trainer-0")
    records = finished(run)
    assert [r.step for r in records] == list(range(8)) and records[-1].version == 8
    positions = ledger(records)
    assert positions == list(range(len(positions)))  # no position lost, none trained or dropped twice
    assert sum(r.num_filtered for r in records) >= 4
    for r in records:
        assert len(r.group_ids) == 3
        assert r.num_filtered == len(r.filtered_group_ids) <= 3 * 3 - 3  # the draw cap
        assert r.filtered_share == r.num_filtered / (r.num_filtered + 3)
        # Uninformative groups are trained only where the step hit its cap.
        assert r.num_uninformative == 0 or r.num_filtered == 6, (r.step, r.num_uninformative, r.num_filtered)
        assert all(0 <= int(lag) <= 1 for lag in r.staleness)  # replacements keep the staleness bound


def test_without_dynamic_sampling_uninformative_groups_are_trained_and_counted(launch, random_actor_dir, tmp_path):
    reward_file = tmp_path / "coin.py"
    reward_file.write_text(COIN_REWARD)
    extra = f'[reward]\nsource = "python:{reward_file}:compute_score"\n'
    records = finished(launch(rl_config(random_actor_dir, steps=4, extra=extra), "sampling.temperature=1.0"))
    assert ledger(records) == list(range(12)) and all(r.num_filtered == 0 for r in records)
    assert sum(r.num_uninformative for r in records) > 0
