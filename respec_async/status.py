"""The supervisor's live view: how far the run is and how it goes, and one row per role.

On a terminal it is redrawn in place: a progress bar over RL steps (step / total, elapsed, ETA,
steps/s), the latest step's reward, accuracy, response length, tokens/s, staleness and, where SD
ran, its share and acceptance length; under it the role table (state, restarts, heartbeat,
busy share of the last ~10 s, mailbox). Warnings and the run's milestones print above it as one-line events (logs.console_worthy);
the full event stream goes to the log files, or to the console too with `respec launch --verbose`.
Elsewhere (CI, a pipe) each step prints one compact line and the role states one line every
`_PLAIN_EVERY_S` seconds.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text


class Watched(Protocol):
    """What the view reads of the supervisor (its run and its roles' states)."""

    run_dir: Path
    roles: dict[str, Any]

_PLAIN_EVERY_S = 15.0


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """RL steps done, from the trainer's train.step events, and the rate since the first one (so
    start-up does not count against the ETA)."""

    def __init__(self, num_steps: int, started: float | None = None) -> None:
        self.num_steps = num_steps
        self.started = time.monotonic() if started is None else started
        self.steps_done = 0
        self.first_step_at: float | None = None
        self.first_step = 0
        self.latest: dict[str, Any] = {}
        self.latest_at = self.started

    def on_step(self, fields: dict[str, Any], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        step = int(fields.get("step", self.steps_done))
        if self.first_step_at is None:
            self.first_step_at, self.first_step = now, step
        self.steps_done = step + 1
        self.latest = fields
        self.latest_at = now

    def steps_per_s(self) -> float | None:
        if self.first_step_at is None or self.steps_done - 1 <= self.first_step:
            return None
        return (self.steps_done - 1 - self.first_step) / max(self.latest_at - self.first_step_at, 1e-9)

    def eta_s(self) -> float | None:
        rate = self.steps_per_s()
        return (self.num_steps - self.steps_done) / rate if rate else None

    def header(self, now: float) -> Text:
        rate, eta = self.steps_per_s(), self.eta_s()
        share = self.steps_done / self.num_steps if self.num_steps else 0.0
        return Text(f" {share:4.0%}  elapsed {_clock(now - self.started)}  ETA "
                    f"{_clock(eta) if eta is not None else '-:--:--'}  "
                    f"{f'{rate:.2f} steps/s' if rate else '- steps/s'}")

    def metrics(self) -> Text:
        f = self.latest
        if not f:
            return Text("waiting for the first step ...", style="dim")
        parts = [f"reward {f['reward']:.3f}", f"acc {f['acc']:.3f}", f"len {f['len']:.1f}",
                 f"tok/s {f['tok_s']:,}", f"stale {f['stale_max']}"]
        if "sd" in f:  # only where SD ran: no "acceptance 0.0" for a run that never speculated
            parts.append(f"SD {f['sd']:.0%} of steps")
        if "accept_len" in f:
            parts.append(f"accept {f['accept_len']:.2f}")
        if "filtered" in f:
            parts.append(f"filtered {f['filtered']:.0%}")
        return Text("  ".join(parts))


class StatusView:
    def __init__(self, supervisor: Watched, live: bool = True, num_steps: int = 0) -> None:
        self.supervisor = supervisor
        self.console = Console(stderr=True)
        self.live_enabled = live and sys.stderr.isatty()
        self.progress = Progress(num_steps) if num_steps else None
        self._live: Live | None = None

    def on_step(self, fields: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.on_step(fields)

    def table(self) -> Table:
        table = Table(title=f"run {self.supervisor.run_dir.name}", expand=False)
        # On a cluster, which machine each role runs on (and its pid there).
        nodes = any(getattr(role, "node", "") for role in self.supervisor.roles.values())
        for column in ("role", *(["node"] if nodes else []), "pid", "state", "restarts", "last heartbeat", "busy",
                       "mailbox", "handled", "dropped"):
            table.add_column(column)
        now = time.monotonic()
        for role in self.supervisor.roles.values():
            running = role.state == "running"
            beat = f"{now - role.last_pong_at:.1f}s ago" if running else "-"
            busy = f"{role.busy_share:.0%}" if running and role.busy_share is not None else "-"
            restarts = Text(str(role.num_restarts), style="bold red" if role.num_restarts else "")
            node = [getattr(role, "node", "") or "-"] if nodes else []
            table.add_row(role.name, *node, str(role.pid or "-"), role.state, restarts, beat, busy,
                          str(role.mailbox_size), str(role.num_handled), str(role.num_dropped))
        return table

    def render(self) -> Group:
        if self.progress is None:
            return Group(self.table())
        now = time.monotonic()
        p = self.progress
        bar = Table.grid(padding=(0, 1))
        bar.add_row(Text(f"step {p.steps_done}/{p.num_steps}", style="bold"),
                    ProgressBar(total=p.num_steps, completed=p.steps_done, width=32), p.header(now))
        return Group(bar, p.metrics(), self.table())

    def summary_line(self) -> str:
        parts = [f"{r.name}:{r.state}" + (f"(restarts={r.num_restarts})" if r.num_restarts else "")
                 for r in self.supervisor.roles.values()]
        return "status " + " ".join(parts)

    async def run(self) -> None:
        if self.live_enabled:
            self._live = Live(self.render(), console=self.console, refresh_per_second=2, transient=True)
            self._live.start()
            while True:
                self._live.update(self.render())
                await asyncio.sleep(0.5)
        while True:
            await asyncio.sleep(_PLAIN_EVERY_S)
            print(self.summary_line(), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
