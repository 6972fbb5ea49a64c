"""Admission control for bounded staleness: which prompt groups the trainer may hand out, and
which batch each group belongs to.

Groups are numbered by data position and assigned to steps when they are issued: each step s
takes groups_per_step of them, and step s trains at policy version s. The trainer may issue a
group for step s only while its version v satisfies v >= s - k (k = max_staleness). A group
issued at version u >= s - k and trained at version s is therefore at most k versions stale,
by construction rather than by dropping late work. k = 0 is synchronous on-policy RL: the
groups of step s go out only once version s exists. Without dropped groups (below), group g
belongs to step g // groups_per_step.

Each outstanding attempt also has a place: the role that holds it, or the role it was sent to
(`move`, from the roles' `GroupMoved` receipts, furthest hop first). A group whose holder
restarted (`held_by`), that stays between roles too long (`in_transit`), or that the reward role
returns, is re-issued (a new attempt, at the current version, which only lowers its staleness). The first complete result of a
group is kept; later results (a lost attempt that turned up after all, or a duplicate) are
counted and ignored, so no group is trained twice.

Dynamic sampling (DAPO): a completed group can be *dropped* (its rewards are all equal, so it
carries no GRPO signal). It counts as consumed, never as lost: its data position is not issued
again, its step gets one more group in its place (the next data position, under the same
staleness bound, since its step is already admissible), and it is reported with the step's
batch (`take_dropped`).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from transport.schema import HOP_TO_GENERATOR, HOP_TO_REWARD


@dataclass
class IssuedGroup:
    group_id: int
    attempt: int
    issued_version: int
    generator: str
    hop: int = HOP_TO_GENERATOR  # the furthest GroupMoved hop of this attempt
    holder: str = ""  # the role that holds it (HOP_AT_*) or that it was sent to (HOP_TO_*)
    moved_at: float = 0.0


@dataclass
class Admission:
    groups_per_step: int
    max_staleness: int
    next_group_id: int = 0  # data position: the next group to issue for the first time
    first_attempt: int = 0  # attempt number of a first issue (a restarted trainer starts higher)
    outstanding: dict[int, IssuedGroup] = field(default_factory=dict)
    completed: dict[int, Any] = field(default_factory=dict)  # group_id -> result, until trained
    trained_group_ids: set[int] = field(default_factory=set)
    num_reissued: int = 0
    num_duplicates: int = 0
    num_stale_results: int = 0
    num_dropped: int = 0
    # group_id -> step, from issue until trained or dropped; steps' groups counted in `assigned`
    # (outstanding or completed, not dropped) and `ready` (completed).
    step_assignment: dict[int, int] = field(default_factory=dict)
    assigned: Counter = field(default_factory=Counter)
    ready: Counter = field(default_factory=Counter)
    dropped: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    fill_step: int = 0  # the lowest step that still lacks groups: where the next issue goes
    skip: set[int] = field(default_factory=set)  # data positions already consumed (after a resume)

    def step_of(self, group_id: int) -> int:
        """The step an issued group belongs to."""
        return self.step_assignment[group_id]

    def can_issue(self, version: int) -> bool:
        return version >= self.fill_step - self.max_staleness

    def issue(self, version: int, generator: str, now: float = 0.0) -> IssuedGroup:
        if not self.can_issue(version):
            raise RuntimeError(f"step {self.fill_step}'s groups are not admissible at version {version}")
        while self.next_group_id in self.skip:
            self.skip.discard(self.next_group_id)
            self.next_group_id += 1
        issued = IssuedGroup(self.next_group_id, self.first_attempt, version, generator, holder=generator, moved_at=now)
        self.outstanding[issued.group_id] = issued
        self.step_assignment[issued.group_id] = self.fill_step
        self.assigned[self.fill_step] += 1
        self.next_group_id += 1
        while self.assigned[self.fill_step] >= self.groups_per_step:
            self.fill_step += 1
        return issued

    def reissue(self, group_id: int, version: int, generator: str, now: float = 0.0) -> IssuedGroup:
        previous = self.outstanding[group_id]
        issued = IssuedGroup(group_id, previous.attempt + 1, version, generator, holder=generator, moved_at=now)
        self.outstanding[group_id] = issued
        self.num_reissued += 1
        return issued

    def move(self, group_id: int, attempt: int, hop: int, holder: str, now: float = 0.0) -> bool:
        """A receipt: the current attempt reached `hop` at `holder`. Receipts of superseded
        attempts, of groups no longer outstanding, and of hops already passed are ignored."""
        issued = self.outstanding.get(group_id)
        if issued is None or issued.attempt != attempt or hop <= issued.hop:
            return False
        issued.hop, issued.holder, issued.moved_at = hop, holder, now
        return True

    def held_by(self, role: str) -> list[int]:
        """Outstanding groups that `role` holds or that were sent to it (lost if it restarted)."""
        return sorted(g for g, issued in self.outstanding.items() if issued.holder == role)

    def in_transit(self, now: float, timeout_s: float) -> list[int]:
        """Outstanding groups sent to a role that has not said it received them for timeout_s."""
        return sorted(g for g, issued in self.outstanding.items()
                      if issued.hop in (HOP_TO_GENERATOR, HOP_TO_REWARD) and now - issued.moved_at > timeout_s)

    def complete(self, group_id: int, attempt: int, result: Any) -> bool:
        """Record a result; False (and counted) for duplicates and superseded attempts."""
        issued = self.outstanding.get(group_id)
        if issued is None:
            self.num_duplicates += 1
            return False
        if attempt != issued.attempt:
            self.num_stale_results += 1
            return False
        del self.outstanding[group_id]
        self.completed[group_id] = result
        self.ready[self.step_assignment[group_id]] += 1
        return True

    def drop(self, group_id: int) -> None:
        """A completed group leaves its step without being trained; the step takes one more."""
        if group_id not in self.completed:
            raise KeyError(f"group {group_id} is not a completed, untrained group")
        del self.completed[group_id]
        step = self.step_assignment.pop(group_id)
        self.assigned[step] -= 1
        self.ready[step] -= 1
        self.dropped[step].append(group_id)
        self.num_dropped += 1
        self.fill_step = min(self.fill_step, step)

    def num_drawn(self, step: int) -> int:
        """Groups assigned to a step so far, dropped ones included."""
        return self.assigned[step] + len(self.dropped.get(step, ()))

    def batch_ready(self, step: int) -> bool:
        return self.ready[step] >= self.groups_per_step

    def take_batch(self, step: int) -> list[Any]:
        ids = sorted(g for g in self.completed if self.step_assignment[g] == step)
        if len(ids) != self.groups_per_step:
            raise RuntimeError(f"step {step} has {len(ids)} of {self.groups_per_step} groups")
        batch = [self.completed.pop(g) for g in ids]
        overlap = self.trained_group_ids.intersection(ids)
        if overlap:
            raise AssertionError(f"groups {sorted(overlap)} would be trained twice")
        self.trained_group_ids.update(ids)
        for g in ids:
            del self.step_assignment[g]
        del self.assigned[step], self.ready[step]
        return batch

    def take_dropped(self, step: int) -> list[int]:
        """The groups dropped from a step (once, with its batch)."""
        return self.dropped.pop(step, [])

    def resume_position(self) -> tuple[int, list[int]]:
        """Where a trainer resumed at the current step restarts the data stream: the lowest data
        position whose fate is not yet recorded (trained, or dropped and taken with its step's
        batch), and the positions above it whose fate is (a replacement for a dropped group can
        come after the next step's groups). Groups dropped from steps not yet trained are
        issued again: their drop was never recorded."""
        pending = set(self.step_assignment).union(*self.dropped.values())
        start = min(pending, default=self.next_group_id)
        consumed = {g for g in range(start, self.next_group_id) if g not in pending}
        # Positions a resumed predecessor recorded as consumed and this one has not reached yet.
        consumed |= {g for g in self.skip if g >= start}
        return start, sorted(consumed)

    def reset_to_step(self, step: int, data_position: int | None = None, consumed: list[int] = ()) -> None:
        """After resuming from a checkpoint at version `step`: everything from that step on is
        issued afresh from data_position (default step * groups_per_step), skipping the
        positions in `consumed`; nothing is outstanding."""
        self.next_group_id = step * self.groups_per_step if data_position is None else data_position
        self.skip = set(consumed)
        self.fill_step = step
        self.outstanding.clear()
        self.completed.clear()
        self.step_assignment.clear()
        self.assigned.clear()
        self.ready.clear()
        self.dropped.clear()
