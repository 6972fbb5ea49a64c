"""Reward failures inside a real RL run (supervisor, generator, reward, trainer processes):
faults injected by real reward servers on loopback are retried, dropped groups are re-issued
by the trainer, zeroed rollouts are flagged, and the run completes with every prompt group
trained exactly once. The counts the roles record (the reward role's metrics file, the
trainer's metrics.jsonl) must match what the servers injected."""

from __future__ import annotations

import collections
import threading
import zlib

import msgspec
import pytest

from tests.rewards.conftest import HttpRewardServer, ServerThread, reward_serve, short_ipc  # noqa: F401
from tests.roles.conftest import rl_config
from tests.roles.test_rl_loop import finished

pytestmark = pytest.mark.slow

STEPS, GROUPS_PER_STEP, GROUP_SIZE = 6, 3, 2  # rl_config's shape


def reward_record(run) -> dict:
    lines = (run.run_dir / "reward-0.metrics.jsonl").read_bytes().splitlines()
    return msgspec.json.decode(lines[-1])


def assert_each_group_trained_once(records, steps):
    trained = [g for r in records for g in r.group_ids]
    assert sorted(trained) == list(range(steps * GROUPS_PER_STEP)), trained


def bucket(prompt: str) -> int:
    return zlib.crc32(prompt.encode()) % 4


def test_http_faults_are_retried_or_dropped_and_reissued_and_every_group_is_trained_once(launch, random_actor_dir):
    """Per prompt (by bucket): 0 -> 500, then a timeout: retries exhausted, the group is dropped
    and re-issued, and its next attempt is scored; 1 -> garbage once, 2 -> wrong length once:
    retried and scored; 3 -> no fault."""
    server = HttpRewardServer()
    requests_per_prompt: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def choose_fault(body):
        prompt = body["prompts"][0]
        with lock:
            n = requests_per_prompt[prompt]
            requests_per_prompt[prompt] += 1
        plan = {0: ["500", "timeout"], 1: ["garbage"], 2: ["wrong_length"], 3: []}[bucket(prompt)]
        return plan[n] if n < len(plan) else None

    server.choose_fault = choose_fault
    thread = ServerThread(server)
    thread.start()
    try:
        extra = f"""[reward]
source = "{server.url}/batch"
timeout_s = 1.0
max_retries = 1
retry_backoff_s = 0.05
on_error = "drop"
"""
        run = launch(rl_config(random_actor_dir, steps=STEPS, extra=extra))
        records = finished(run)
    finally:
        thread.close()
    assert_each_group_trained_once(records, STEPS)
    assert len(requests_per_prompt) == STEPS * GROUPS_PER_STEP  # one distinct prompt per group
    by_bucket = collections.Counter(bucket(p) for p in requests_per_prompt)
    dropped, garbage, wrong = by_bucket[0], by_bucket[1], by_bucket[2]
    assert dropped >= 1 and garbage + wrong >= 1, by_bucket
    # Requests the server saw: dropped groups 3 (2 tries, then the re-issued attempt), retried 2, clean 1.
    assert all(n == {0: 3, 1: 2, 2: 2, 3: 1}[bucket(p)] for p, n in requests_per_prompt.items())
    rec = reward_record(run)
    assert rec["scorer"]["errors_by_kind"] == {"http_500": dropped, "timeout": dropped,
                                               "bad_response": garbage + wrong}
    assert rec["scorer"]["num_retries"] == dropped + garbage + wrong
    assert rec["num_groups_dropped"] == dropped and rec["num_rollouts_dropped"] == dropped * GROUP_SIZE
    assert rec["num_rollouts_zeroed"] == 0 and rec["num_group_errors"] == 0
    assert records[-1].num_returned == dropped and records[-1].num_reissued == dropped
    assert sum(r.num_reward_errors for r in records) == 0
    assert records[-1].version == STEPS
    # On the supervisor's console: the failures (at most one line per 5 s) and the re-issues.
    warned = [e for e in run.events() if e.get("event") == "reward.failed"]
    assert warned and all(e["level"] == "warning" and e["role"] == "reward-0" for e in warned)
    assert sum(e["num_rollouts"] for e in warned) <= rec["num_rollouts_failed"] and "/batch" in warned[0]["server"]
    reissued = [e for e in run.events() if e.get("event") == "trainer.reissue"]
    assert sum(e["num_groups"] for e in reissued) == dropped and {e["reason"] for e in reissued} == {"returned"}


ZERO_ON_BUCKET_0 = """
import zlib

def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    prompt = extra_info["prompt"]
    if zlib.crc32(prompt.encode()) % 4 == 0:
        with open(__file__ + ".failures", "a") as f:
            f.write(extra_info["rollout_id"] + "\\n")
        raise RuntimeError("reward backend down for " + prompt)
    return float(solution_str.strip() == ground_truth)
"""


def test_zero_policy_scores_failed_rollouts_0_flags_them_and_reissues_nothing(launch, random_actor_dir, tmp_path):
    """A Python reward function from a file fails (after 1 retry) for bucket-0 prompts: those
    rollouts are trained with reward 0, flagged in num_reward_errors; no group is returned."""
    reward_file = tmp_path / "zero_reward.py"
    reward_file.write_text(ZERO_ON_BUCKET_0)
    extra = f"""[reward]
source = "python:{reward_file}:compute_score"
max_retries = 1
retry_backoff_s = 0.05
on_error = "zero"
"""
    run = launch(rl_config(random_actor_dir, steps=STEPS, extra=extra))
    records = finished(run)
    assert_each_group_trained_once(records, STEPS)
    failures = (tmp_path / "zero_reward.py.failures").read_text().split()
    zeroed = len(set(failures))
    assert zeroed >= 1 and len(failures) == 2 * zeroed  # each failing rollout: a try and a retry
    assert sum(r.num_reward_errors for r in records) == zeroed
    rec = reward_record(run)
    assert rec["num_rollouts_zeroed"] == rec["num_rollouts_failed"] == zeroed
    assert rec["scorer"]["num_retries"] == zeroed and rec["scorer"]["errors_by_kind"] == {"exception": 2 * zeroed}
    assert rec["num_groups_dropped"] == 0 and records[-1].num_returned == 0 and records[-1].num_reissued == 0


def test_native_reward_server_killed_mid_run_and_restarted_loses_no_group(launch, random_actor_dir, reward_serve,
                                                                         tmp_path):
    """`respec reward-serve` is SIGKILLed after step 1 and restarted: rollouts scored during the
    outage fail, their groups are dropped and re-issued, and the run completes with each group
    trained once; the reward role's drops equal the trainer's returns."""
    endpoint = short_ipc(tmp_path, "rl")
    function = tmp_path / "fn.py"
    function.write_text("def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                        "    return float(solution_str.strip() == ground_truth)\n")
    server = reward_serve(f"{function}:compute_score", endpoint)
    extra = f"""[reward]
source = "zmq://{endpoint}"
timeout_s = 1.0
max_retries = 1
retry_backoff_s = 0.1
on_error = "drop"
"""
    steps = 8
    run = launch(rl_config(random_actor_dir, steps=steps, extra=extra))
    run.wait_event(lambda e: e.get("event") == "train.step" and e.get("step") == 1, timeout=240)
    server.kill()
    # Until a group in flight has exhausted its retries and was dropped.
    run.wait_event(lambda e: e.get("event") == "reward.failed" and e.get("on_error") == "drop", timeout=60,
                   source="reward-0")
    server.start()
    records = finished(run)
    assert_each_group_trained_once(records, steps)
    rec = reward_record(run)
    assert rec["num_groups_dropped"] >= 1
    assert rec["num_groups_dropped"] == records[-1].num_returned == records[-1].num_reissued
    assert rec["scorer"]["num_failed_calls"] == rec["num_groups_dropped"]
    assert set(rec["scorer"]["errors_by_kind"]) <= {"connection", "timeout"}
    assert records[-1].version == steps
