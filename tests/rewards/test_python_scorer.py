"""User reward functions from a file (`reward.source = "python:/path/file.py:fn"`): the verl
signature, batched and async forms, and failures (hang, exception, NaN, string, wrong length)
retried, counted and reported per rollout."""

from __future__ import annotations

import time

import pytest

from respec_async.config import source_kind
from respec_async.rewards import make_scorer, to_result
from tests.rewards.conftest import expected_rewards, make_requests, run, section


def score(cfg, requests):
    async def go():
        scorer = make_scorer(cfg)
        try:
            return await scorer.score(requests), scorer.stats
        finally:
            await scorer.close()
    return run(go())


def test_function_from_a_file_with_the_verl_signature_scores_and_keeps_the_other_dict_keys(reward_file):
    results, stats = score(section(f"python:{reward_file}:compute_score"), make_requests(4))
    assert [r.reward for r in results] == expected_rewards(4)
    assert [r.correct for r in results] == [True, False, True, False]
    assert results[0].extra == {"length": 2} and not any(r.error for r in results)
    assert stats.num_calls == 4 and stats.num_retries == 0


def test_function_from_a_module_path_is_imported(reward_file, monkeypatch):
    monkeypatch.syspath_prepend(str(reward_file.parent))
    results, _ = score(section("python:my_reward:plain_float"), make_requests(2))
    assert [r.reward for r in results] == [1.0, 0.0]


def test_batched_function_is_called_once_per_group_with_lists(reward_file):
    results, stats = score(section(f"python:{reward_file}:batched_score", batched=True), make_requests(6))
    assert [r.reward for r in results] == expected_rewards(6)
    assert stats.num_calls == 1


def test_async_function_runs_on_the_loop(reward_file):
    results, stats = score(section(f"python:{reward_file}:async_score"), make_requests(8))
    assert [r.reward for r in results] == expected_rewards(8) and stats.num_failed_calls == 0


def test_a_hanging_sync_call_times_out_is_retried_then_fails_alone_while_the_others_are_scored(reward_file):
    requests = make_requests(4)
    requests[1] = type(requests[1])(**{**requests[1].__dict__, "completion_text": "hang"})
    started = time.perf_counter()
    results, stats = score(section(f"python:{reward_file}:hangs_on_hang", timeout_s=0.3, max_retries=1,
                                   num_workers=2), requests)
    assert time.perf_counter() - started < 2.5  # the hung threads are abandoned, not waited for
    assert [bool(r.error) for r in results] == [False, True, False, False]
    assert results[1].reward == 0.0 and "timeout" in results[1].error
    assert stats.errors_by_kind == {"timeout": 2} and stats.num_retries == 1
    assert stats.num_failed_calls == 1 and stats.num_failed_rollouts == 1


def test_an_exception_is_retried_and_the_retries_are_counted(reward_file):
    results, stats = score(section(f"python:{reward_file}:fails_twice"), make_requests(1))
    assert results[0].reward == 1.0 and not results[0].error
    assert stats.num_retries == 2 and stats.errors_by_kind == {"exception": 2} and stats.num_failed_calls == 0


@pytest.mark.parametrize("function, batched", [("returns_nan", False), ("returns_string", False),
                                               ("batched_wrong_length", True)])
def test_nan_string_or_wrong_length_is_a_bad_response_of_the_source(reward_file, function, batched):
    results, stats = score(section(f"python:{reward_file}:{function}", batched=batched, max_retries=2),
                           make_requests(3))
    assert all(r.error and r.reward == 0.0 and not r.correct for r in results)
    calls = 1 if batched else 3
    assert stats.errors_by_kind == {"bad_response": 3 * calls} and stats.num_retries == 2 * calls
    assert stats.num_failed_rollouts == 3


def test_a_bad_source_is_refused_with_the_key_named(reward_file):
    with pytest.raises(ValueError, match="no function 'nope'"):
        make_scorer(section(f"python:{reward_file}:nope"))
    with pytest.raises(ValueError, match="cannot import no_such_pkg"):
        make_scorer(section("python:no_such_pkg.mod:fn"))
    for bad in ["ftp://example", "python:nofunction", "http://a:1/x,zmq://b:2", "localhost:8000", ""]:
        with pytest.raises(ValueError, match="reward.source"):
            source_kind(bad)
    assert [source_kind(s) for s in ["builtin", "python:pkg.mod:fn", "python:/a/b.py:fn",
                                     "http://a:1/x, https://b/y", "zmq://h:5555,zmq://ipc:///tmp/s"]] == \
        ["builtin", "python", "python", "http", "zmq"]


def test_dict_results_use_score_for_functions_and_reward_for_http_samples():
    assert to_result({"score": 1.0, "reward": 0.5}, "f").reward == 1.0
    assert to_result({"score": 1.0, "reward": 0.5}, "u", key="reward").reward == 0.5
    assert to_result({"reward": 0.5, "acc": True}, "f").correct is True
    assert to_result(True, "f").reward == 1.0
