"""The ledger of prompt groups: every group's issues, moves between roles and end, written by
the trainer to `<run_dir>/ledger.jsonl`, and the audit that proves each group's fate.

The trainer appends one event per fact as it learns it: a trainer incarnation starting at a
version (`start`), a group issued for a step (`issue`) or issued again with the reason
(`reissue`), a receipt of where an attempt is (`move`), a result kept (`complete`), a group
dropped by dynamic sampling (`drop`), a step's batch trained (`train`), and the trainer's own
count of groups still out when it finished (`end`).

`audit_run` replays the file as the run's final lineage: a trainer that restarted from the
checkpoint at version v discards what its predecessor trained or dropped at steps >= v and
issues those groups again, so only the last word on each data position counts. Each group of
the lineage is then trained, dropped or in flight (issued = trained + dropped + in flight by
construction); what the audit checks is that nothing was trained twice, every data position up
to the last one issued was issued, the ledger's trained and dropped groups equal what
metrics.jsonl recorded per step, and, for a finished run, that nothing is left in flight and
the trainer's own count agrees. A group in flight at the end of a finished run is a lost one.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from respec_async.metrics import MetricsWriter, read_metrics

LEDGER_FILE = "ledger.jsonl"
# Why an attempt was issued again: the role holding it (`holder`) restarted, it was sent to a
# role that did not acknowledge it in time, the reward role handed it back, or the run stalled
# with it there (supervisor.stall_action = "reissue").
REISSUE_REASONS = ("holder_restarted", "in_transit", "returned", "stalled")


class LedgerEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    kind: str  # start | issue | reissue | move | complete | drop | train | end
    time: float
    incarnation: int = 0  # the trainer's restart count
    group_id: int = -1
    attempt: int = -1
    step: int = -1
    version: int = -1
    holder: str = ""  # issue/reissue: the generator it went to; move: GroupMoved.holder
    lost_by: str = ""  # reissue: the role the previous attempt was with
    hop: int = -1
    reason: str = ""  # reissue: REISSUE_REASONS; drop: why
    group_ids: list[int] = []
    num_out: int = -1  # end: groups the trainer still had outstanding or completed but untrained


class Ledger:
    """The trainer's writer: one flushed line per event (MetricsWriter's format and its care for
    a line a killed predecessor cut off)."""

    def __init__(self, run_dir: Path, incarnation: int) -> None:
        self.writer = MetricsWriter(run_dir / LEDGER_FILE)
        self.incarnation = incarnation

    def write(self, kind: str, **fields: object) -> None:
        self.writer.write(LedgerEvent(kind=kind, time=time.time(), incarnation=self.incarnation, **fields))

    def close(self) -> None:
        self.writer.close()


def read_ledger(path: Path) -> list[LedgerEvent]:
    """Every event; a last line cut off by a kill is skipped."""
    decoder = msgspec.json.Decoder(LedgerEvent)
    events = []
    for line in Path(path).read_bytes().splitlines():
        if line.strip():
            try:
                events.append(decoder.decode(line))
            except msgspec.DecodeError:
                continue
    return events


@dataclass
class LedgerAudit:
    num_issued: int = 0  # data positions issued in the final lineage
    num_trained: int = 0
    num_dropped: int = 0
    num_in_flight: int = 0
    num_reissues: int = 0  # new attempts over the whole run, by reason
    reissue_reasons: dict[str, int] = field(default_factory=dict)
    num_trainer_starts: int = 0
    trained_twice: list[int] = field(default_factory=list)
    never_issued: list[int] = field(default_factory=list)  # data positions skipped below the last issued
    metrics_mismatch: list[str] = field(default_factory=list)
    finished: bool = False  # the trainer wrote its `end`
    trainer_num_out: int = -1  # its own count then

    @property
    def num_lost(self) -> int:
        """Groups whose fate will never come: in flight after the trainer finished, or skipped."""
        return (self.num_in_flight if self.finished else 0) + len(self.never_issued)

    @property
    def balanced(self) -> bool:
        return (self.num_issued == self.num_trained + self.num_dropped + self.num_in_flight
                and not self.trained_twice and not self.metrics_mismatch and self.num_lost == 0
                and (not self.finished or self.trainer_num_out == self.num_in_flight))

    def summary(self) -> str:
        reasons = ", ".join(f"{why}: {n}" for why, n in sorted(self.reissue_reasons.items()))
        text = (f"{self.num_issued} issued, {self.num_trained} trained, {self.num_dropped} dropped, "
                f"{self.num_in_flight} in flight, {self.num_lost} lost; "
                f"{self.num_reissues} re-issued" + (f" ({reasons})" if reasons else ""))
        problems = []
        if self.trained_twice:
            problems.append(f"trained twice: {self.trained_twice[:10]}")
        if self.never_issued:
            problems.append(f"never issued: {self.never_issued[:10]}")
        if self.finished and self.trainer_num_out != self.num_in_flight:
            problems.append(f"the trainer counted {self.trainer_num_out} out at its end")
        problems += self.metrics_mismatch
        return text + ("; balanced" if self.balanced else "; NOT BALANCED: " + "; ".join(problems))


def audit(events: list[LedgerEvent], records: list | None = None) -> LedgerAudit:
    """Replay ledger events as the final lineage; `records` (metrics.jsonl's) are cross-checked."""
    result = LedgerAudit()
    ends: dict[int, tuple[str, int]] = {}  # group_id -> ("trained" | "dropped", step)
    issued: dict[int, int] = {}  # group_id -> step, in the current lineage
    for event in events:
        if event.kind == "start":
            result.num_trainer_starts += 1
            result.finished = False
            # Resumed at version v: steps >= v are trained again, their groups issued afresh.
            ends = {g: end for g, end in ends.items() if end[1] < event.version}
            issued = {g: s for g, s in issued.items() if g in ends}
        elif event.kind == "issue":
            issued[event.group_id] = event.step
        elif event.kind == "reissue":
            result.num_reissues += 1
            result.reissue_reasons[event.reason] = result.reissue_reasons.get(event.reason, 0) + 1
        elif event.kind == "drop":
            ends[event.group_id] = ("dropped", event.step)
        elif event.kind == "train":
            for g in event.group_ids:
                if ends.get(g, ("", 0))[0] == "trained":
                    result.trained_twice.append(g)
                ends[g] = ("trained", event.step)
        elif event.kind == "end":
            result.finished = True
            result.trainer_num_out = event.num_out
    result.num_issued = len(issued)
    result.num_trained = sum(1 for g in issued if ends.get(g, ("",))[0] == "trained")
    result.num_dropped = sum(1 for g in issued if ends.get(g, ("",))[0] == "dropped")
    result.num_in_flight = sum(1 for g in issued if g not in ends)
    ended_not_issued = sorted(set(ends) - set(issued))
    if ended_not_issued:
        result.metrics_mismatch.append(f"ended without an issue: {ended_not_issued[:10]}")
    if issued:
        result.never_issued = sorted(set(range(max(issued) + 1)) - set(issued))
    if records is not None and result.finished:  # an unfinished resumed run's metrics still hold
        # the steps its last trainer had yet to redo
        trained = {g for r in records for g in r.group_ids}
        dropped = {g for r in records for g in r.filtered_group_ids}
        ledger_trained = {g for g, (what, _) in ends.items() if what == "trained" and g in issued}
        ledger_dropped = {g for g, (what, _) in ends.items() if what == "dropped" and g in issued}
        if trained != ledger_trained:
            result.metrics_mismatch.append(
                f"metrics.jsonl trained {len(trained)} groups, the ledger {len(ledger_trained)} "
                f"(differ: {sorted(trained ^ ledger_trained)[:10]})")
        # Drops of a step are in metrics with its batch; the ledger has them as they happen.
        finished_steps = {r.step for r in records}
        ledger_dropped = {g for g in ledger_dropped if ends[g][1] in finished_steps}
        if dropped != ledger_dropped:
            result.metrics_mismatch.append(
                f"metrics.jsonl dropped {len(dropped)} groups, the ledger {len(ledger_dropped)}")
        counted = Counter(g for r in records for g in r.group_ids)
        result.trained_twice += sorted({g for g, n in counted.items() if n > 1} - set(result.trained_twice))
    return result


def holders(events: list[LedgerEvent]) -> Counter:
    """Groups the last trainer incarnation has out, by the role that holds them (or they were
    sent to): what a stalled run waits on."""
    where: dict[int, tuple[int, str]] = {}  # group_id -> (attempt, holder)
    for event in events:
        if event.kind == "start":
            where.clear()
        elif event.kind in ("issue", "reissue"):
            where[event.group_id] = (event.attempt, event.holder)
        elif event.kind == "move" and where.get(event.group_id, (None,))[0] == event.attempt:
            where[event.group_id] = (event.attempt, event.holder)
        elif event.kind == "complete":
            where.pop(event.group_id, None)
    return Counter(holder for _, holder in where.values())


def audit_run(run_dir: Path) -> LedgerAudit | None:
    """The audit of a run directory's ledger against its metrics (None: no ledger)."""
    path = Path(run_dir) / LEDGER_FILE
    if not path.exists():
        return None
    metrics = Path(run_dir) / "metrics.jsonl"
    return audit(read_ledger(path), read_metrics(metrics) if metrics.exists() else [])
