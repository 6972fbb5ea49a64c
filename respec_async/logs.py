"""structlog set-up: events with fields, JSON lines to a file in the run directory, and (for the
supervisor and CLI) one readable line per event on the console.

Usage: `configure_logging(run_dir / "logs" / "trainer-0.jsonl", role="trainer-0")` once per
process, then `log = structlog.get_logger(); log.info("weights.applied", version=7)`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _StderrProxy:
    """Looks up sys.stderr at write time, so a live display that swaps it sees our lines."""

    def write(self, text: str) -> None:
        sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class _Tee:
    """Writes each rendered event to several (renderer, stream, filter) sinks; a sink with a
    filter writes only the events it accepts."""

    def __init__(self, sinks: list[tuple[Any, TextIO, Callable[[dict[str, Any]], bool] | None]]) -> None:
        self.sinks = sinks

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> str:
        for render, stream, accept in self.sinks:
            if accept is not None and not accept(event):
                continue
            stream.write(render(logger, method, dict(event)) + "\n")
            stream.flush()
        raise structlog.DropEvent


# What the console shows under a live view (the rest goes to the log files only): warnings and
# errors, and the run's own milestones.
RUN_EVENTS = {"run.started", "run.ready", "run.stopping", "run.finished", "run.failed", "run.interrupted"}


def console_worthy(event: dict[str, Any]) -> bool:
    return event.get("level") in ("warning", "error", "critical") or event.get("event") in RUN_EVENTS


def configure_logging(
    json_path: Path | None = None,
    *,
    role: str | None = None,
    console: bool = True,
    level: str = "info",
    console_stream: TextIO | None = None,
    console_filter: Callable[[dict[str, Any]], bool] | None = None,
) -> None:
    """JSON lines to `json_path` (if given) and readable lines to the console (if `console`; only
    the events `console_filter` accepts, when given)."""
    sinks: list[tuple[Any, TextIO, Callable[[dict[str, Any]], bool] | None]] = []
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        sinks.append((structlog.processors.JSONRenderer(), open(json_path, "a", buffering=1), None))
    if console:
        stream = console_stream or _StderrProxy()
        colors = sys.stderr.isatty()
        sinks.append((structlog.dev.ConsoleRenderer(colors=colors, pad_event_to=28), stream, console_filter))
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=False),
        structlog.processors.format_exc_info,
    ]
    if role:
        structlog.contextvars.bind_contextvars(role=role)
    structlog.configure(
        processors=[*processors, _Tee(sinks)],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        cache_logger_on_first_use=False,
    )
