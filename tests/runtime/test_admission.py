"""Admission control: the staleness bound holds by construction; no group trained twice."""

from __future__ import annotations

import random

import pytest

from respec_async.admission import Admission
from transport.schema import HOP_AT_GENERATOR, HOP_AT_REWARD, HOP_TO_REWARD


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


@pytest.mark.parametrize("k", [0, 1, 3])
def test_dropped_groups_are_replaced_within_the_staleness_bound_and_never_reissued(k):
    """Dynamic sampling: a random third of completed groups are dropped. Every step still trains
    exactly groups_per_step groups, each within k versions, every data position is trained or
    dropped exactly once, and the positions are consumed in order with no gap."""
    rng = random.Random(100 + k)
    adm = Admission(groups_per_step=3, max_staleness=k)
    version, in_flight, fates = 0, [], {}
    while version < 15:
        while adm.can_issue(version) and rng.random() < 0.8:
            in_flight.append(adm.issue(version, "generator-0"))
        rng.shuffle(in_flight)
        if in_flight and rng.random() < 0.7:
            issued = in_flight.pop()
            assert adm.complete(issued.group_id, issued.attempt, issued)
            if rng.random() < 0.33:
                step = adm.step_of(issued.group_id)
                adm.drop(issued.group_id)
                assert adm.can_issue(version) and adm.fill_step == min(adm.fill_step, step)
        if adm.batch_ready(version):
            batch = adm.take_batch(version)
            assert len(batch) == 3 and all(version - g.issued_version <= k for g in batch)
            for g in batch:
                assert fates.setdefault(g.group_id, ("trained", version)) == ("trained", version)
            for group_id in adm.take_dropped(version):
                assert group_id not in fates
                fates[group_id] = ("dropped", version)
            version += 1
        elif not in_flight and not adm.can_issue(version):
            raise AssertionError("deadlock")
    dropped = [g for g, (fate, _) in fates.items() if fate == "dropped"]
    assert adm.num_dropped >= len(dropped) > 5
    pending = set(adm.step_assignment).union(*adm.dropped.values())  # later steps' groups, in flight
    assert not pending & set(fates)
    assert sorted([*fates, *pending]) == list(range(adm.next_group_id))  # no position lost or repeated


def test_resume_position_skips_recorded_fates_and_reissues_unrecorded_drops():
    adm = Admission(groups_per_step=2, max_staleness=1)
    groups = [adm.issue(0, "g") for _ in range(4)]  # 0, 1 -> step 0; 2, 3 -> step 1
    for g in groups:
        adm.complete(g.group_id, g.attempt, g.group_id)
    adm.drop(1)  # step 0 needs another: position 4
    adm.drop(3)  # step 1 too: position 5 (its drop is not recorded before step 1 trains)
    g4, g5 = adm.issue(1, "g"), adm.issue(1, "g")
    assert (adm.step_of(g4.group_id), adm.step_of(g5.group_id)) == (0, 1)
    adm.complete(4, g4.attempt, 4)
    assert adm.take_batch(0) == [0, 4] and adm.take_dropped(0) == [1]
    # Checkpoint at version 1: 2 (completed), 3 (dropped, unrecorded) and 5 (outstanding) go
    # again; 4 (trained) is skipped.
    start, consumed = adm.resume_position()
    assert (start, consumed) == (2, [4])
    fresh = Admission(groups_per_step=2, max_staleness=1)
    fresh.reset_to_step(1, start, consumed)
    assert [fresh.issue(1, "g").group_id for _ in range(4)] == [2, 3, 5, 6]
    assert [fresh.step_of(g) for g in (2, 3, 5, 6)] == [1, 1, 2, 2]
    # Without drops, the old rule: a step starts at step * groups_per_step.
    plain = Admission(groups_per_step=2, max_staleness=0)
    plain.reset_to_step(3)
    assert plain.issue(3, "g").group_id == 6


def test_a_second_resume_keeps_the_positions_a_first_resume_skipped():
    """A drops 1 and 0 and trains 3 (0's replacement) at step 0: its checkpoint says (1, [3]).
    B resumes there and checkpoints after step 1, before its stream reaches 3: 3 must still
    count as consumed, or C issues it and trains it a second time (found by review)."""
    a = Admission(groups_per_step=1, max_staleness=1)
    g0, g1 = a.issue(0, "g"), a.issue(0, "g")  # 0 -> step 0, 1 -> step 1
    a.complete(1, g1.attempt, 1)
    a.drop(1)
    a.issue(0, "g")  # 2 refills step 1
    a.complete(0, g0.attempt, 0)
    a.drop(0)
    g3 = a.issue(0, "g")  # 3 refills step 0
    a.complete(3, g3.attempt, 3)
    assert a.take_batch(0) == [3] and a.take_dropped(0) == [0]
    assert a.resume_position() == (1, [3])
    b = Admission(groups_per_step=1, max_staleness=1)
    b.reset_to_step(1, 1, [3])
    assert [b.issue(1, "g").group_id for _ in range(2)] == [1, 2]  # steps 1 and 2
    b.complete(1, 0, 1)
    assert b.take_batch(1) == [1]
    assert b.resume_position() == (2, [3])  # was (2, []): 3 would have been trained again
    c = Admission(groups_per_step=1, max_staleness=1)
    c.reset_to_step(2, *b.resume_position())
    assert [c.issue(2, "g").group_id for _ in range(2)] == [2, 4]


def test_dropping_an_unknown_or_untrained_group_is_an_error():
    adm = Admission(groups_per_step=1, max_staleness=0)
    issued = adm.issue(0, "g")
    with pytest.raises(KeyError, match="not a completed"):
        adm.drop(issued.group_id)  # still outstanding


def test_receipts_move_a_group_forward_only_and_locate_what_a_restarted_role_held():
    adm = Admission(groups_per_step=4, max_staleness=1)
    a, b, c = (adm.issue(0, "generator-0", now=0.0) for _ in range(3))
    assert adm.move(a.group_id, a.attempt, HOP_AT_GENERATOR, "generator-0", now=1.0)
    assert adm.move(b.group_id, b.attempt, HOP_AT_REWARD, "reward-1", now=1.0)
    # The generator's "sent to reward-1" overtaken by reward-1's receipt: ignored, not a step back.
    assert not adm.move(b.group_id, b.attempt, HOP_TO_REWARD, "reward-1", now=2.0)
    assert not adm.move(a.group_id, a.attempt + 1, HOP_AT_REWARD, "reward-0", now=2.0)  # another attempt
    assert adm.held_by("generator-0") == [a.group_id, c.group_id]  # c: sent there, never acknowledged
    assert adm.held_by("reward-1") == [b.group_id]
    # Only unacknowledged hops age: c after the timeout, a and b (held by a live role) never.
    assert adm.in_transit(now=9.0, timeout_s=10.0) == []
    assert adm.in_transit(now=11.0, timeout_s=10.0) == [c.group_id]
    again = adm.reissue(c.group_id, 0, "generator-1", now=11.0)
    assert adm.held_by("generator-1") == [c.group_id] and adm.in_transit(now=12.0, timeout_s=10.0) == []
    assert not adm.move(c.group_id, c.attempt, HOP_AT_GENERATOR, "generator-0", now=12.0)  # the old attempt
    assert adm.move(c.group_id, again.attempt, HOP_AT_GENERATOR, "generator-1", now=12.0)
