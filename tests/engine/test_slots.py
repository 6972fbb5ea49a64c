"""The slot scheduler alone (no model): admission order and slots, compaction, the stop and
length cuts, and freeing a finished sequence's slot."""

from __future__ import annotations

import collections

import pytest

from respec_async.engine.requests import Request, SDConfig
from respec_async.engine.sampling import SamplingParams
from respec_async.engine.slots import SlotScheduler


def request(i: int, prompt_len: int = 3, **params) -> Request:
    return Request(i, list(range(1, prompt_len + 1)), SamplingParams(**params))


def test_admission_is_in_arrival_order_into_the_lowest_free_slots():
    slots = SlotScheduler(max_batch_size=3, max_seq_len=16)
    for i in range(5):
        slots.add(request(i))
    assert slots.num_active == 3 and slots.refilling
    admitted = slots.admit()
    assert [(s.request.request_id, s.slot) for s in admitted] == [(0, 0), (1, 1), (2, 2)]
    slots.finish(slots.running[1], "stop")
    slots.finish(slots.running[0], "stop")
    assert [(s.request.request_id, s.slot) for s in slots.admit()] == [(3, 0), (4, 1)]
    assert not slots.waiting and not slots.refilling and slots.has_unfinished


def test_compaction_moves_the_highest_running_slots_into_the_holes_below():
    slots = SlotScheduler(max_batch_size=4, max_seq_len=16)
    for i in range(4):
        slots.add(request(i))
    slots.admit()
    slots.finish(slots.running[0], "stop")
    slots.finish(slots.running[1], "stop")
    movers, holes = slots.compaction()
    assert (movers, holes) == ([2, 3], [0, 1])
    ids = [slots.running[slot].request.request_id for slot in movers]
    slots.move(movers, holes)
    assert [slots.running[slot].request.request_id for slot in holes] == ids
    assert all(slots.running[slot].slot == slot for slot in slots.running)
    assert sorted(slots.free_slots) == [2, 3] and slots.compaction() == ([], [])


def test_append_cuts_after_the_first_stop_token_and_at_the_length_budget():
    slots = SlotScheduler(max_batch_size=2, max_seq_len=8)
    slots.add(request(0, stop_token_ids=(9,), max_new_tokens=10))
    slots.add(request(1, prompt_len=5, max_new_tokens=10))
    stopped, capped = slots.admit()
    assert slots.append(stopped, [4, 9, 5], [-1.0, -2.0, -3.0]) == (2, "stop")
    assert stopped.output_ids == [4, 9] and stopped.logprobs == [-1.0, -2.0]
    # max_seq_len 8 with a prompt of 5: 3 new tokens at most, the third ends it.
    assert slots.append(capped, [1, 2], [0.0, 0.0]) == (2, None)
    assert slots.append(capped, [3, 4, 5], [0.0, 0.0, 0.0]) == (1, "length")
    assert capped.output_ids == [1, 2, 3]


def test_finish_frees_the_slot_and_reports_the_sequence_counts():
    slots = SlotScheduler(max_batch_size=1, max_seq_len=16)
    slots.add(request(7))
    sequence, = slots.admit()
    sequence.count_step(SDConfig(4, 1, 4, source="history"), num_drafted=4, num_tokens=3)
    sequence.count_step(None, num_drafted=0, num_tokens=1)
    slots.append(sequence, [1, 2, 3, 4], [0.0] * 4)
    completion = slots.finish(sequence, "stop")
    assert slots.free_slots == [0] and not slots.running and not slots.has_unfinished
    assert (completion.num_decode_steps, completion.num_verify_steps, completion.num_accepted) == (2, 1, 2)
    assert completion.num_history_drafted == 4 and completion.acceptance_length == pytest.approx(3.0)


def test_a_prompt_as_long_as_max_seq_len_is_refused_with_its_length():
    slots = SlotScheduler(max_batch_size=1, max_seq_len=4)
    with pytest.raises(ValueError, match="prompt of 4 tokens"):
        slots.add(request(0, prompt_len=4))


def group(prompt: int, size: int, start: int) -> list[Request]:
    return [Request(start + i, [prompt, prompt + 1], SamplingParams()) for i in range(size)]


def test_spread_siblings_starts_a_few_of_every_group_and_keeps_later_groups_behind():
    slots = SlotScheduler(max_batch_size=6, max_seq_len=16, spread_siblings=True)
    for g in range(3):  # three groups of 4, queued group by group, then a later group
        for r in group(10 * g, 4, 4 * g):
            slots.add(r)
    for r in group(90, 4, 100):
        slots.add(r)
    admitted = slots.admit()
    by_prompt = collections.Counter(s.request.prompt_ids[0] for s in admitted)
    assert by_prompt == {0: 2, 10: 2, 20: 2}  # FIFO would start groups 0 and 10 whole, 20 not at all
    # The later group stays behind this wave's second halves (the window is 2 x free slots).
    assert [r.request_id for r in slots.waiting[:6]] == [2, 3, 6, 7, 10, 11]
    plain = SlotScheduler(max_batch_size=6, max_seq_len=16)
    for g in range(3):
        for r in group(10 * g, 4, 4 * g):
            plain.add(r)
    assert [s.request.request_id for s in plain.admit()] == [0, 1, 2, 3, 4, 5]
