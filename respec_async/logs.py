"""structlog set-up: events with fields, JSON lines to a file in the run directory, and (for the
supervisor and CLI) one readable line per event on the console.

Usage: `configure_logging(run_dir / "logs" / "trainer-0.jsonl", role="trainer-0")` once per
process, then `log = structlog.get_logger(); log.info("weights.applied", version=7)`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _StderrProxy:
    """Looks up sys.stderr at write time, so a live display that swaps it sees our lines."""

    def write(self, text: str) -> None:
        sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class _Tee:
    """Writes each rendered event to several (renderer, stream) pairs."""

    def __init__(self, sinks: list[tuple[Any, TextIO]]) -> None:
        self.sinks = sinks

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> str:
        for render, stream in self.sinks:
            stream.write(render(logger, method, dict(event)) + "\n")
            stream.flush()
        raise structlog.DropEvent


def configure_logging(
    json_path: Path | None = None,
    *,
    role: str | None = None,
    console: bool = True,
    level: str = "info",
    console_stream: TextIO | None = None,
) -> None:
    """JSON lines to `json_path` (if given) and readable lines to the console (if `console`)."""
    sinks: list[tuple[Any, TextIO]] = []
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        sinks.append((structlog.processors.JSONRenderer(), open(json_path, "a", buffering=1)))
    if console:
        stream = console_stream or _StderrProxy()
        colors = sys.stderr.isatty()
        sinks.append((structlog.dev.ConsoleRenderer(colors=colors, pad_event_to=28), stream))
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
