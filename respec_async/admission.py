"""Admission control for bounded staleness: which prompt groups the trainer may hand out, and
which batch each group belongs to.

Group g (in data order) belongs to step s = g // groups_per_step, and step s trains at policy
version s. The trainer may issue group g only while its version v satisfies v >= s - k
(k = max_staleness). A group issued at version u >= s - k and trained at version s is therefore
at most k versions stale, by construction rather than by dropping late work. k = 0 is
synchronous on-policy RL: the groups of step s go out only once version s exists.

A group lost with a generator, or returned by the reward role, is re-issued (a new attempt,
at the current version, which only lowers its staleness). The first complete result of a
group is kept; later results (a lost attempt that turned up after all, or a duplicate) are
counted and ignored, so no group is trained twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class IssuedGroup:
    group_id: int
    attempt: int
    issued_version: int
    generator: str


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

    def step_of(self, group_id: int) -> int:
        return group_id // self.groups_per_step

    def can_issue(self, version: int) -> bool:
        return version >= self.step_of(self.next_group_id) - self.max_staleness

    def issue(self, version: int, generator: str) -> IssuedGroup:
        if not self.can_issue(version):
            raise RuntimeError(f"group {self.next_group_id} is not admissible at version {version}")
        issued = IssuedGroup(self.next_group_id, self.first_attempt, version, generator)
        self.outstanding[issued.group_id] = issued
        self.next_group_id += 1
        return issued

    def reissue(self, group_id: int, version: int, generator: str) -> IssuedGroup:
        previous = self.outstanding[group_id]
        issued = IssuedGroup(group_id, previous.attempt + 1, version, generator)
        self.outstanding[group_id] = issued
        self.num_reissued += 1
        return issued

    def outstanding_on(self, generator: str) -> list[int]:
        return [g for g, issued in self.outstanding.items() if issued.generator == generator]

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
        return True

    def batch_ready(self, step: int) -> bool:
        first = step * self.groups_per_step
        return all(g in self.completed for g in range(first, first + self.groups_per_step))

    def take_batch(self, step: int) -> list[Any]:
        first = step * self.groups_per_step
        ids = range(first, first + self.groups_per_step)
        batch = [self.completed.pop(g) for g in ids]
        overlap = self.trained_group_ids.intersection(ids)
        if overlap:
            raise AssertionError(f"groups {sorted(overlap)} would be trained twice")
        self.trained_group_ids.update(ids)
        return batch

    def reset_to_step(self, step: int) -> None:
        """After resuming from a checkpoint at version `step`: everything from that step on is
        issued afresh; nothing is outstanding."""
        self.next_group_id = step * self.groups_per_step
        self.outstanding.clear()
        self.completed.clear()
