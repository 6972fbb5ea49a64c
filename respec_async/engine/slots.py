"""The engine's slot scheduler: which request waits, which sequence holds which slot of the
preallocated caches, and what a sequence has emitted. Host-side bookkeeping only; the engine
(engine/engine.py) runs the models on the slots this hands it and moves the device state when
`compaction` relabels slots.

Admission is first come, first served into the lowest free slots, so the running sequences
stay in slots 0..n-1. With spread_siblings, a request whose prompt has fewer samples running
goes first among the next 2 x (free slots) waiting, so a wave of RL groups (G samples of each
prompt) starts a few samples of every group and the rest follow with siblings ahead of them:
drafts for the history drafter. A sequence finishes at a stop token (kept in its output), at
max_new_tokens, or when it would pass max_seq_len.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from respec_async.engine.history import Cursor
from respec_async.engine.requests import Completion, Request, SDConfig


@dataclass
class Sequence:
    request: Request
    slot: int
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    num_drafted: int = 0
    num_accepted: int = 0
    num_verify_steps: int = 0
    num_decode_steps: int = 0
    num_history_drafted: int = 0
    num_history_accepted: int = 0
    num_history_verify_steps: int = 0
    cursor: Cursor | None = None  # its place in the history index, if the engine keeps one
    prompt_key: tuple[int, ...] = ()  # the prompt ids, for the engine's prompt sharing
    prompt_weights: int = -1  # which target weights computed its prompt's K/V (the engine's count)

    def count_step(self, sd: SDConfig | None, num_drafted: int, num_tokens: int) -> None:
        """One decode step that produced num_tokens (accepted drafts + 1) for this sequence."""
        self.num_decode_steps += 1
        if sd is None:
            return
        self.num_verify_steps += 1
        self.num_drafted += num_drafted
        self.num_accepted += num_tokens - 1
        if sd.source == "history":
            self.num_history_verify_steps += 1
            self.num_history_drafted += num_drafted
            self.num_history_accepted += num_tokens - 1


class SlotScheduler:
    def __init__(self, max_batch_size: int, max_seq_len: int, spread_siblings: bool = False) -> None:
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.spread_siblings = spread_siblings
        self.waiting: list[Request] = []
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self.free_slots = list(range(max_batch_size))

    def add(self, request: Request) -> None:
        if not 1 <= len(request.prompt_ids) < self.max_seq_len:
            raise ValueError(f"request {request.request_id}: prompt of {len(request.prompt_ids)} tokens must be "
                             f"non-empty and shorter than max_seq_len {self.max_seq_len}")
        self.waiting.append(request)

    @property
    def num_active(self) -> int:
        """Sequences the next step will decode: the running ones plus those it will admit."""
        return len(self.running) + min(len(self.waiting), len(self.free_slots))

    @property
    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def refilling(self) -> bool:
        """More requests wait than slots are free: a slot freed by a finishing sequence is
        refilled (and prefilled) at the next step."""
        return len(self.waiting) > len(self.free_slots)

    def admit(self) -> list[Sequence]:
        """Waiting requests into free slots, the lowest first, in arrival order (spread_siblings:
        see the module docstring)."""
        admitted = []
        self.free_slots.sort()
        if self.spread_siblings and len(self.waiting) > len(self.free_slots):
            self._spread()
        while self.waiting and self.free_slots:
            sequence = Sequence(self.waiting.pop(0), self.free_slots.pop(0))
            self.running[sequence.slot] = sequence
            admitted.append(sequence)
        return admitted

    def _spread(self) -> None:
        """Reorder the head of the queue (the next 2 x free requests; the rest keep their order,
        so a later step's groups do not overtake this one's): repeatedly the request whose
        prompt has the fewest samples running or already picked, the earliest on a tie."""
        num_free = len(self.free_slots)
        window = self.waiting[:2 * num_free]
        keys = [tuple(r.prompt_ids) for r in window]
        counts = collections.Counter(tuple(s.request.prompt_ids) for s in self.running.values())
        order = []
        remaining = list(range(len(window)))
        for _ in range(num_free):
            best = min(remaining, key=lambda i: (counts[keys[i]], i))
            remaining.remove(best)
            order.append(best)
            counts[keys[best]] += 1
        self.waiting[:len(window)] = [window[i] for i in order + remaining]

    def compaction(self) -> tuple[list[int], list[int]]:
        """(movers, holes): the running sequences in slots at or above the running count, and
        the free slots below it they move to, so the running slots become 0..n-1. The caller
        moves the device state from movers to holes, then calls `move`."""
        num_running = len(self.running)
        holes = sorted(slot for slot in self.free_slots if slot < num_running)
        if not holes:
            return [], []
        return sorted(slot for slot in self.running if slot >= num_running), holes

    def move(self, movers: list[int], holes: list[int]) -> None:
        for old, new in zip(movers, holes):
            sequence = self.running.pop(old)
            sequence.slot = new
            self.running[new] = sequence
        self.free_slots = sorted(set(self.free_slots) - set(holes) | set(movers))

    def append(self, sequence: Sequence, tokens: list[int], logprobs: list[float]) -> tuple[int, str | None]:
        """Append a step's new tokens, cut after the first stop token or at the length budget
        (max_new_tokens, or max_seq_len with the prompt): (tokens kept, finish reason or None)."""
        params = sequence.request.params
        num_new, reason = len(tokens), None
        if params.stop_token_ids:
            stop_at = next((i for i, token in enumerate(tokens) if token in params.stop_token_ids), None)
            if stop_at is not None:
                num_new, reason = stop_at + 1, "stop"
        budget = min(params.max_new_tokens, self.max_seq_len - len(sequence.request.prompt_ids)) \
            - len(sequence.output_ids)
        if num_new > budget or (num_new == budget and reason is None):
            num_new, reason = budget, "length"
        sequence.output_ids += tokens[:num_new]
        sequence.logprobs += logprobs[:num_new]
        return num_new, reason

    def finish(self, sequence: Sequence, reason: str) -> Completion:
        """Free the sequence's slot; its completion."""
        del self.running[sequence.slot]
        self.free_slots.append(sequence.slot)
        request = sequence.request
        acceptance_length = ((sequence.num_accepted + sequence.num_verify_steps) / sequence.num_verify_steps
                             if sequence.num_verify_steps else 0.0)
        return Completion(request.request_id, list(request.prompt_ids), sequence.output_ids, sequence.logprobs,
                          reason, sequence.num_drafted, sequence.num_accepted, sequence.num_verify_steps,
                          sequence.num_decode_steps, acceptance_length, sequence.num_history_drafted,
                          sequence.num_history_accepted, sequence.num_history_verify_steps)
