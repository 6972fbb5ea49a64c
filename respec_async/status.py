"""The supervisor's live status: one row per role (pid, state, restarts, last heartbeat).

On a terminal it is a `rich` table redrawn in place under the event lines; elsewhere (CI,
logs piped to a file) it prints a compact one-line summary every `_PLAIN_EVERY_S` seconds.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.live import Live
from rich.table import Table


class Watched(Protocol):
    """What the view reads of the supervisor (its run and its roles' states)."""

    run_dir: Path
    roles: dict[str, Any]

_PLAIN_EVERY_S = 15.0


class StatusView:
    def __init__(self, supervisor: Watched, live: bool = True) -> None:
        self.supervisor = supervisor
        self.console = Console(stderr=True)
        self.live_enabled = live and sys.stderr.isatty()
        self._live: Live | None = None

    def table(self) -> Table:
        table = Table(title=f"run {self.supervisor.run_dir.name}", expand=False)
        for column in ("role", "pid", "state", "restarts", "last heartbeat", "mailbox", "handled", "dropped"):
            table.add_column(column)
        now = time.monotonic()
        for role in self.supervisor.roles.values():
            beat = f"{now - role.last_pong_at:.1f}s ago" if role.state == "running" else "-"
            table.add_row(role.name, str(role.pid or "-"), role.state, str(role.num_restarts), beat,
                          str(role.mailbox_size), str(role.num_handled), str(role.num_dropped))
        return table

    def summary_line(self) -> str:
        parts = [f"{r.name}:{r.state}" + (f"(restarts={r.num_restarts})" if r.num_restarts else "")
                 for r in self.supervisor.roles.values()]
        return "status " + " ".join(parts)

    async def run(self) -> None:
        if self.live_enabled:
            self._live = Live(self.table(), console=self.console, refresh_per_second=2, transient=True)
            self._live.start()
            while True:
                self._live.update(self.table())
                await asyncio.sleep(0.5)
        while True:
            await asyncio.sleep(_PLAIN_EVERY_S)
            print(self.summary_line(), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
