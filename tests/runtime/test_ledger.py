"""The ledger of groups: its events round-trip through the file, and the audit replays them as
the final lineage (a resumed trainer's redone steps count once) and catches what is wrong."""

from __future__ import annotations

from respec_async.ledger import LEDGER_FILE, Ledger, audit, audit_run, read_ledger
from respec_async.metrics import MetricsWriter, StepRecord


def record(step: int, group_ids: list[int], filtered: list[int] = ()) -> StepRecord:
    zeros = dict.fromkeys(("time", "reward_mean", "accuracy", "response_len_mean", "tokens_per_s",
                           "acceptance_length", "sd_step_share", "wait_s", "train_s", "sync_s",
                           "generation_s", "loss", "clip_fraction", "is_weight_mean", "kl"), 0.0)
    return StepRecord(step=step, version=step + 1, response_len_max=0, num_samples=0, num_tokens=0, staleness={},
                      staleness_max=0, group_ids=group_ids, filtered_group_ids=list(filtered), **zeros)


def write_run(tmp_path, incarnations: list[list[tuple]], records: list[StepRecord]):
    for n, events in enumerate(incarnations):
        ledger = Ledger(tmp_path, incarnation=n)
        for kind, fields in events:
            ledger.write(kind, **fields)
        ledger.close()
    metrics = MetricsWriter(tmp_path / "metrics.jsonl")
    for r in records:
        metrics.write(r)
    metrics.close()
    return audit_run(tmp_path)


def two_steps(start_version: int = 0, groups=(0, 1, 2, 3, 4), end: bool = True) -> list[tuple]:
    """Steps of two groups; group 2 dropped by dynamic sampling, group 4 replaces it."""
    g = list(groups)
    events = [("start", {"version": start_version})]
    events += [("issue", {"group_id": i, "attempt": 0, "step": 0 if i < 2 else 1}) for i in g]
    events += [("drop", {"group_id": 2, "step": 1, "reason": "all rewards equal"})] if 2 in g else []
    events += [("train", {"step": 0, "group_ids": [0, 1]})] if start_version == 0 else []
    events += [("train", {"step": 1, "group_ids": [3, 4]})]
    return events + ([("end", {"version": 2, "num_out": 0})] if end else [])


def test_a_clean_run_balances_and_states_its_counts(tmp_path):
    result = write_run(tmp_path, [two_steps()], [record(0, [0, 1]), record(1, [3, 4], [2])])
    assert (result.num_issued, result.num_trained, result.num_dropped, result.num_in_flight) == (5, 4, 1, 0)
    assert result.balanced and result.num_lost == 0
    assert "5 issued, 4 trained, 1 dropped, 0 in flight, 0 lost" in result.summary()
    assert result.summary().endswith("balanced")


def test_a_resumed_trainer_redoing_steps_trains_nothing_twice_in_the_final_lineage(tmp_path):
    # Incarnation 0 trained steps 0 and 1 and died before its checkpoint of version 2; the next
    # resumed at version 1 and redid step 1 with the same groups (issued afresh).
    first = two_steps(end=False)
    second = two_steps(start_version=1, groups=(2, 3, 4))
    result = write_run(tmp_path, [first, second], [record(0, [0, 1]), record(1, [3, 4], [2])])
    assert result.balanced, result.summary()
    assert (result.num_issued, result.num_trained, result.num_trainer_starts) == (5, 4, 2)
    # Without the resume's start event the redone step is a second training of groups 3 and 4.
    events = read_ledger(tmp_path / LEDGER_FILE)
    replay = audit([e for e in events if not (e.kind == "start" and e.incarnation == 1)])
    assert replay.trained_twice == [3, 4] and not replay.balanced


def test_a_group_left_in_flight_at_the_end_or_never_issued_is_lost(tmp_path):
    events = two_steps() + [("issue", {"group_id": 6, "attempt": 0, "step": 2})]
    events.insert(-1, events.pop())  # issued before the trainer's end event
    result = write_run(tmp_path, [events], [record(0, [0, 1]), record(1, [3, 4], [2])])
    assert result.num_in_flight == 1 and result.never_issued == [5] and result.num_lost == 2
    assert not result.balanced
    assert "never issued: [5]" in result.summary() and "NOT BALANCED" in result.summary()


def test_the_ledger_must_agree_with_what_metrics_recorded(tmp_path):
    result = write_run(tmp_path, [two_steps()], [record(0, [0, 1]), record(1, [3, 5], [2])])
    assert not result.balanced
    assert any("metrics.jsonl trained" in m for m in result.metrics_mismatch)


def test_reissues_are_counted_by_reason_and_a_cut_off_last_line_is_skipped(tmp_path):
    events = two_steps()
    events.insert(3, ("reissue", {"group_id": 1, "attempt": 1, "reason": "holder_restarted", "lost_by": "reward-0"}))
    events.insert(3, ("reissue", {"group_id": 0, "attempt": 1, "reason": "in_transit", "lost_by": "reward-0"}))
    write_run(tmp_path, [events], [record(0, [0, 1]), record(1, [3, 4], [2])])
    with open(tmp_path / LEDGER_FILE, "ab") as f:
        f.write(b'{"kind":"iss')
    result = audit_run(tmp_path)
    assert result.balanced and result.num_reissues == 2
    assert result.reissue_reasons == {"holder_restarted": 1, "in_transit": 1}
    assert audit_run(tmp_path / "nowhere") is None


def test_a_new_incarnation_after_a_cut_off_line_starts_on_a_line_of_its_own(tmp_path):
    first = Ledger(tmp_path, incarnation=0)
    for kind, fields in two_steps(end=False):
        first.write(kind, **fields)
    first.close()
    with open(tmp_path / LEDGER_FILE, "ab") as f:
        f.write(b'{"kind":"iss')  # the trainer was killed mid-line
    result = write_run(tmp_path, [[], two_steps(start_version=1, groups=(2, 3, 4))],
                       [record(0, [0, 1]), record(1, [3, 4], [2])])
    # Joined to the cut-off line, the resume's start would be skipped: steps redone read as twice.
    assert result.num_trainer_starts == 2 and result.balanced, result.summary()
