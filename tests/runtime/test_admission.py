"""Admission control: the staleness bound holds by construction; no group trained twice."""

from __future__ import annotations

import random

import pytest

from respec_async.admission import Admission


@pytest.mark.parametrize("k", [0, 1, 2, 4])
def test_random_completion_order_never_exceeds_the_staleness_bound(k):
    rng = random.Random(k)
    adm = Admission(groups_per_step=3, max_staleness=k)
    version, in_flight, worst = 0, [], 0
    while version < 20:
        while adm.can_issue(version) and rng.random() < 0.8:
            in_flight.append(adm.issue(version, "generator-0"))
        rng.shuffle(in_flight)
        if in_flight and rng.random() < 0.7:
            issued = in_flight.pop()
            if rng.random() < 0.1:  # lost: re-issued at the current version
                in_flight.append(adm.reissue(issued.group_id, version, "generator-1"))
            else:
                assert adm.complete(issued.group_id, issued.attempt, issued.issued_version)
        if adm.batch_ready(version):
            for issued_version in adm.take_batch(version):
                worst = max(worst, version - issued_version)
                assert version - issued_version <= k
            version += 1
        elif not in_flight and not adm.can_issue(version):
            raise AssertionError("deadlock: nothing in flight, nothing admissible, batch not ready")
    assert worst <= k


def test_k0_issues_a_step_only_after_the_previous_one_trained():
    adm = Admission(groups_per_step=2, max_staleness=0)
    a, b = adm.issue(0, "g"), adm.issue(0, "g")
    assert not adm.can_issue(0)
    adm.complete(a.group_id, 0, "a")
    adm.complete(b.group_id, 0, "b")
    assert adm.take_batch(0) == ["a", "b"]
    assert adm.can_issue(1)


def test_duplicates_and_superseded_attempts_are_ignored_and_counted():
    adm = Admission(groups_per_step=1, max_staleness=1)
    first = adm.issue(0, "generator-0")
    again = adm.reissue(first.group_id, 0, "generator-1")
    assert not adm.complete(first.group_id, first.attempt, "old")
    assert adm.complete(again.group_id, again.attempt, "new")
    assert not adm.complete(again.group_id, again.attempt, "dup")
    assert adm.take_batch(0) == ["new"]
    assert (adm.num_reissued, adm.num_stale_results, adm.num_duplicates) == (1, 1, 1)
