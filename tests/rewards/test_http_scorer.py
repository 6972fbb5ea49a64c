"""HTTP reward servers (`reward.source = "http://..."`) against a real aiohttp server on
loopback: OpenRLHF's batch schema and the per-sample form, bearer tokens, concurrency limit,
sharding over several URLs, and injected faults (timeout, 500, garbage, wrong length, NaN,
string, a server that dies mid-run and comes back) with retries and failures counted exactly."""

from __future__ import annotations

import asyncio

import pytest

from respec_async.rewards import make_scorer
from tests.rewards.conftest import HttpRewardServer, expected_rewards, make_requests, run, section

FAULT_KINDS = {"timeout": "timeout", "500": "http_500", "garbage": "bad_response", "wrong_length": "bad_response",
               "nan": "bad_response", "string": "bad_response"}


def score_groups(cfg, servers, num_groups, group_size, during=None):
    """Start the servers, score `num_groups` groups concurrently (running `during` meanwhile),
    stop everything; returns (results per group, scorer stats)."""
    async def go():
        for server in servers:
            await server.start()
        scorer = make_scorer(cfg)
        try:
            work = asyncio.gather(*(scorer.score(make_requests(group_size, g)) for g in range(num_groups)))
            if during is not None:
                await during()
            return await work, scorer.stats
        finally:
            await scorer.close()
            for server in servers:
                await server.stop()
    return run(go())


def rewards(groups):
    return [[r.reward for r in g] for g in groups]


@pytest.mark.parametrize("form", ["batch", "sample"])
def test_both_schemas_score_every_rollout(form):
    server = HttpRewardServer()
    groups, stats = score_groups(section(f"{server.url}/{form}", http_format=form), [server], 3, 4)
    assert rewards(groups) == [expected_rewards(4)] * 3
    assert stats.num_calls == (3 if form == "batch" else 12) == server.num_requests
    if form == "batch":  # scores and extra_logs of the batch schema are kept for logging
        assert groups[0][0].extra == {"score": 1.0, "length": 2}


@pytest.mark.parametrize("fault", list(FAULT_KINDS))
def test_each_injected_fault_is_retried_and_counted(fault):
    server = HttpRewardServer()
    server.faults = [fault] * 3  # 3 faults over 4 groups with 3 retries each: nothing fails in the end
    groups, stats = score_groups(section(f"{server.url}/batch", timeout_s=0.3), [server], 4, 2)
    assert rewards(groups) == [expected_rewards(2)] * 4
    assert stats.num_retries == 3 and stats.errors_by_kind == {FAULT_KINDS[fault]: 3}
    assert stats.num_failed_calls == 0 and server.num_requests == 4 + 3


def test_faults_beyond_the_retries_fail_exactly_those_rollouts_with_the_server_named():
    server = HttpRewardServer()
    server.faults = ["500", "garbage", "wrong_length"]  # one call, max_retries=2: three tries, three faults
    groups, stats = score_groups(section(f"{server.url}/batch", max_retries=2), [server], 1, 2)
    assert all(r.error and r.reward == 0.0 and not r.correct for r in groups[0])
    assert groups[0][0].source == f"{server.url}/batch" and "rewards has 3 values for 2" in groups[0][0].error
    assert stats.num_failed_calls == 1 and stats.num_failed_rollouts == 2 and stats.num_retries == 2
    assert stats.errors_by_kind == {"http_500": 1, "bad_response": 2}


def test_a_server_that_dies_mid_run_and_comes_back_loses_no_rollout():
    server = HttpRewardServer()
    server.delay_s = 0.02

    async def outage():
        await asyncio.sleep(0.1)
        await server.stop()
        await asyncio.sleep(0.4)
        await server.start()

    cfg = section(f"{server.url}/sample", http_format="sample", max_retries=8, max_concurrency=4,
                  retry_backoff_s=0.05, retry_backoff_max_s=0.2)
    groups, stats = score_groups(cfg, [server], 16, 4, during=outage)
    assert rewards(groups) == [expected_rewards(4)] * 16
    assert stats.num_failed_calls == 0 and stats.num_retries >= 1
    assert set(stats.errors_by_kind) <= {"connection", "timeout"}
    assert stats.num_retries == sum(stats.errors_by_kind.values())


def test_two_urls_share_the_load_and_a_failed_try_moves_to_the_other():
    good, bad = HttpRewardServer(), HttpRewardServer()
    bad.faults = ["500"] * 1000
    groups, stats = score_groups(section(f"{good.url}/batch, {bad.url}/batch", max_retries=1), [good, bad], 10, 2)
    assert all(not r.error for g in groups for r in g)
    assert good.num_requests == 10 and bad.num_requests == 5  # round robin: half start on the bad one
    assert stats.errors_by_kind == {"http_500": 5} and stats.num_retries == 5


def test_requests_in_flight_never_exceed_max_concurrency():
    server = HttpRewardServer()
    server.delay_s = 0.05
    score_groups(section(f"{server.url}/sample", http_format="sample", max_concurrency=3), [server], 4, 4)
    assert server.num_requests == 16 and server.max_in_flight == 3


def test_bearer_token_comes_from_the_environment_variable_named_in_config(monkeypatch):
    server = HttpRewardServer(token="s3cret")
    monkeypatch.setenv("MY_REWARD_TOKEN", "s3cret")
    groups, _ = score_groups(section(f"{server.url}/batch", token_env="MY_REWARD_TOKEN"), [server], 1, 2)
    assert rewards(groups) == [[1.0, 0.0]]
    groups, stats = score_groups(section(f"{server.url}/batch", max_retries=0), [server], 1, 2)
    assert all(r.error for r in groups[0]) and stats.errors_by_kind == {"http_401": 1}
    monkeypatch.delenv("MY_REWARD_TOKEN")
    with pytest.raises(ValueError, match="MY_REWARD_TOKEN"):
        make_scorer(section(f"{server.url}/batch", token_env="MY_REWARD_TOKEN"))
