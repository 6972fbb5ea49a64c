"""The actor runtime every role runs on: typed handlers, a bounded mailbox, a control link to the
supervisor, and compute off the event loop.

A role subclasses `Actor`, declares handlers with `@handles`, and optionally overrides
`setup` (load models, before Ready), `main` (a long-running loop, e.g. the generator's) and
`teardown`. The runtime runs three I/O tasks on uvloop:

- control: the DEALER link to the supervisor. Pings are answered right here, never queued
  behind work, so a role that is computing still proves it is alive.
- inbox: the role's PULL socket; decoded messages go into a bounded mailbox. When the mailbox
  is full this task waits, the socket's high-water mark fills, and senders wait in turn.
- dispatch: takes messages from the mailbox and awaits their handler, one at a time; it starts
  after `setup`, so handlers never see a half-built actor.

Heavy compute (model forwards, optimizer steps, collectives) goes through `run_blocking`, a
worker thread, so the loop keeps answering. A handler that raises is logged and counted; the
role keeps running. An exception in `setup` or `main` is fatal: it is reported to the
supervisor (RoleFailed) and the process exits non-zero, to be restarted; one in `setup` that a
restart would repeat (`DETERMINISTIC_ERRORS`: a missing or malformed file, a bad value) is
reported as such, and the supervisor fails the run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import os
import signal
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar, get_type_hints

import structlog
import zmq
import zmq.asyncio
from safetensors import SafetensorError

from respec_async.config import Config
from respec_async.endpoints import Endpoints, RoleId
from transport.channels import Channel, Kind, open_channel
from transport.schema import InboxMoved, Ping, Pong, Ready, RoleEvent, RoleFailed, Shutdown
from transport.security import Security, start_authenticator

T = TypeVar("T")
Handler = Callable[[Any, Any], Awaitable[None]]

# Start-up errors a restart cannot fix: a missing, unreadable or malformed file (model dir,
# checkpoint, data file, reward module; SafetensorError: a corrupt weights file a loader read
# directly), a bad value. Reported as not retryable.
DETERMINISTIC_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError,
                        KeyError, ImportError, SyntaxError, SafetensorError)
FAILURE_LINGER_MS = 2000  # how long a failed role's context may flush its RoleFailed


def handles(fn: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Mark `async def on_x(self, msg: SomeMessage)` as the handler for `SomeMessage`."""
    fn.__respec_handler__ = True  # type: ignore[attr-defined]
    return fn


@dataclass
class RoleContext:
    """What a role process knows about its run."""

    config: Config
    run_dir: Path
    name: str  # e.g. "generator-0"
    endpoints: Endpoints
    security: Security
    restart_count: int = 0

    @property
    def kind(self) -> str:
        return RoleId.parse(self.name).kind

    @property
    def index(self) -> int:
        return RoleId.parse(self.name).index


class Actor:
    mailbox_size: ClassVar[int] = 256

    def __init__(self, ctx: RoleContext) -> None:
        self.ctx = ctx
        self.name = ctx.name
        self.log = structlog.get_logger(ctx.kind)
        self.state = "starting"
        self.num_handled = 0
        self.num_handler_errors = 0
        self.compute_s = 0.0  # time inside finished run_blocking calls on the "compute" thread
        self._compute_since: float | None = None  # start of the one running there, if any
        self.handlers = self._collect_handlers()
        self.mailbox: asyncio.Queue[Any] = asyncio.Queue(maxsize=self.mailbox_size)
        self.stopped = asyncio.Event()
        self.exit_code = 0
        self.zmq = zmq.asyncio.Context()
        # One worker thread per name, made on first use: "compute" for forwards and optimizer
        # steps, one per weight group for its collectives, so a broadcast is received while the
        # engine keeps stepping and two groups never wait on each other.
        self._executors: dict[str, ThreadPoolExecutor] = {}
        self._outboxes: dict[str, Channel] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self.control: Channel | None = None
        self.inbox: Channel | None = None
        self._cleanup = contextlib.AsyncExitStack()

    # --- what a role overrides --------------------------------------------------------

    async def setup(self) -> None:
        """Load what the role needs before it reports Ready."""

    async def main(self) -> None:
        """The role's own loop, if it has one; returning ends the role with exit code 0."""
        await self.stopped.wait()

    async def teardown(self) -> None:
        """Release resources after the I/O tasks have stopped (before the at_teardown ones)."""

    # --- what a role calls ------------------------------------------------------------

    def at_teardown(self, callback: Callable[[], Any]) -> None:
        """Run callback (sync or async) when the role stops, after its I/O tasks and teardown,
        the last registered first. A role registers what it opens as it opens it, so a setup
        that failed halfway releases what it had and no more."""

        async def run() -> None:
            result = callback()
            if inspect.isawaitable(result):
                await result

        self._cleanup.push_async_callback(run)

    async def send(self, to: str, message: Any) -> None:
        """Push a message into another role's inbox (waits while its queue is full)."""
        channel = self._outboxes.get(to)
        if channel is None:
            endpoint = self.ctx.endpoints.inboxes.get(to)
            if endpoint is None:
                raise KeyError(f"{self.name}: no role named {to!r} in this run")
            channel = open_channel(
                self.zmq, Kind.PUSH, endpoint, bind=False, security=self.ctx.security,
                hwm=self.ctx.config.transport.hwm, name=f"{self.name}->{to}",
            )
            self._outboxes[to] = channel
        try:
            await channel.send(message)
        except (asyncio.CancelledError, zmq.ZMQError):
            task = asyncio.current_task()
            if self._outboxes.get(to) is channel or (task is not None and task.cancelling()):
                raise
            # The peer moved while this send waited (its old channel closed under it): resend.
            await self.send(to, message)

    def _peer_moved(self, message: InboxMoved) -> None:
        """A peer restarted elsewhere: the next message to it goes to its new address; whatever
        queued for the old one is dropped with its channel (the trainer re-issues the groups)."""
        self.ctx.endpoints.inboxes[message.role] = message.endpoint
        channel = self._outboxes.pop(message.role, None)
        if channel is not None:
            channel.close()
        self.log.info("peer.moved", role=message.role, endpoint=message.endpoint)

    async def run_blocking(self, fn: Callable[..., T], *args: Any, thread: str = "compute", **kwargs: Any) -> T:
        """Run `fn` in the role's worker thread named `thread` (one thread per name, so calls on
        one name run in order); the event loop stays responsive meanwhile."""
        executor = self._executors.get(thread)
        if executor is None:
            executor = self._executors[thread] = ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-{thread}")
        loop = asyncio.get_running_loop()
        if thread != "compute":
            return await loop.run_in_executor(executor, functools.partial(fn, *args, **kwargs))

        def timed() -> T:  # timed in the thread: a call queued behind another does not count twice
            self._compute_since = started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.compute_s += time.perf_counter() - started
                self._compute_since = None

        return await loop.run_in_executor(executor, timed)

    def busy_seconds(self) -> float:
        """Seconds this incarnation spent working, for the supervisor's busy share: compute-thread
        time by default; a role whose work is not there (the reward role's scoring) says its own."""
        since = self._compute_since  # a call still running counts up to now
        return self.compute_s + (time.perf_counter() - since if since is not None else 0.0)

    async def notify(self, event: str, level: str = "info", **fields: str | int | float | bool) -> None:
        """Show one line on the supervisor's console (level "warning": also under the live view)."""
        if self.control is not None:
            await self.control.send(RoleEvent(role=self.name, event=event, fields=fields, level=level))

    def stop(self, exit_code: int = 0) -> None:
        self.exit_code = exit_code
        self.state = "stopping"
        self.stopped.set()

    @property
    def num_dropped(self) -> int:
        channels = [c for c in (self.control, self.inbox) if c is not None]
        return sum(c.stats.num_dropped for c in channels)

    # --- the runtime ------------------------------------------------------------------

    def _collect_handlers(self) -> dict[type, Handler]:
        handlers: dict[type, Handler] = {}
        for _, method in inspect.getmembers(type(self), predicate=inspect.isfunction):
            if not getattr(method, "__respec_handler__", False):
                continue
            params = list(inspect.signature(method).parameters)
            hints = get_type_hints(method)
            message_type = hints.get(params[1]) if len(params) > 1 else None
            if message_type is None:
                raise TypeError(f"handler {method.__qualname__} needs a typed message parameter")
            handlers[message_type] = getattr(self, method.__name__)
        return handlers

    async def run(self) -> int:
        cfg = self.ctx.config
        if cfg.transport.scheme == "tcp":
            start_authenticator(self.zmq, self.ctx.security)
        self.control = open_channel(
            self.zmq, Kind.DEALER, self.ctx.endpoints.supervisor, bind=False, security=self.ctx.security,
            hwm=cfg.transport.hwm, identity=self.name.encode(), name=f"{self.name}.control",
        )
        self.inbox = open_channel(
            self.zmq, Kind.PULL, self.ctx.endpoints.inboxes[self.name], bind=True,
            security=self.ctx.security, hwm=cfg.transport.hwm, name=f"{self.name}.inbox",
        )
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            loop.add_signal_handler(signal.SIGTERM, self.stop)
            loop.add_signal_handler(signal.SIGINT, lambda: None)  # the supervisor decides; it sends Shutdown
        self._tasks = [
            asyncio.create_task(self._control_loop(), name="control"),
            asyncio.create_task(self._inbox_loop(), name="inbox"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._io_task_done)
        starting = True
        try:
            await self.setup()
            starting = False
            # Handlers see a fully set-up actor: messages that arrived meanwhile wait in the mailbox.
            dispatch = asyncio.create_task(self._dispatch_loop(), name="dispatch")
            dispatch.add_done_callback(self._io_task_done)
            self._tasks.append(dispatch)
            self.state = "running"
            await self.control.send(Ready(role=self.name, pid=os.getpid(), restart_count=self.ctx.restart_count))
            self.log.info("role.ready", pid=os.getpid(), restart_count=self.ctx.restart_count)
            main = asyncio.create_task(self.main(), name="main")
            stop = asyncio.create_task(self.stopped.wait(), name="stop")
            done, _ = await asyncio.wait({main, stop}, return_when=asyncio.FIRST_COMPLETED)
            if main in done:
                main.result()  # re-raise a failure of the role's loop
                self.stop(self.exit_code)
            else:
                main.cancel()
                await asyncio.gather(main, return_exceptions=True)
        except Exception as exc:
            retryable = not (starting and isinstance(exc, DETERMINISTIC_ERRORS))
            self.log.error("role.failed", error=repr(exc), retryable=retryable, traceback=traceback.format_exc())
            await self._report_failure(exc, retryable)
            self.exit_code = 1
        finally:
            await self._shutdown()
        return self.exit_code

    def _io_task_done(self, task: asyncio.Task[Any]) -> None:
        """An I/O task that ends on its own is fatal: a role that cannot read must not look alive."""
        if task.cancelled() or self.stopped.is_set():
            return
        self.log.error("role.io_failed", task=task.get_name(), error=repr(task.exception()))
        self.stop(1)

    async def _report_failure(self, exc: BaseException, retryable: bool = True) -> None:
        if self.control is None:
            return
        try:
            await asyncio.wait_for(self.control.send(RoleFailed(role=self.name, error=repr(exc)[:2000],
                                                                retryable=retryable)), 1.0)
        except Exception:
            pass

    async def _shutdown(self) -> None:
        self.state = "stopping"
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            try:
                await self.teardown()
            finally:
                await self._cleanup.aclose()
        finally:
            for executor in self._executors.values():
                executor.shutdown(wait=False, cancel_futures=True)
            # After a failure, give the queued RoleFailed a moment to reach the supervisor: a role
            # that fails early may not have connected yet, and linger 0 would drop it (the
            # supervisor then restarted a role whose error a restart repeats).
            self.zmq.destroy(linger=0 if self.exit_code == 0 else FAILURE_LINGER_MS)
            self.log.info("role.stopped", exit_code=self.exit_code, num_handled=self.num_handled,
                          num_dropped=self.num_dropped)

    async def _control_loop(self) -> None:
        assert self.control is not None
        while True:
            envelope = await self.control.recv()
            message = envelope.message
            if isinstance(message, Ping):
                await self.control.send(Pong(
                    seq=message.seq, role=self.name, state=self.state, mailbox_size=self.mailbox.qsize(),
                    num_handled=self.num_handled, num_dropped=self.num_dropped, busy_s=self.busy_seconds(),
                ))
            elif isinstance(message, Shutdown):
                self.log.info("role.shutdown_requested", reason=message.reason)
                self.stop(0)
            elif isinstance(message, InboxMoved):
                self._peer_moved(message)
            else:
                await self.mailbox.put(message)

    async def _inbox_loop(self) -> None:
        assert self.inbox is not None
        while True:
            envelope = await self.inbox.recv()
            await self.mailbox.put(envelope.message)

    async def _dispatch_loop(self) -> None:
        while True:
            message = await self.mailbox.get()
            handler = self.handlers.get(type(message))
            if handler is None:
                self.log.warning("message.unhandled", type=type(message).__name__)
                continue
            started = time.perf_counter()
            try:
                await handler(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.num_handler_errors += 1
                self.log.error("handler.failed", type=type(message).__name__, error=repr(exc),
                               traceback=traceback.format_exc())
            self.num_handled += 1
            self.log.debug("message.handled", type=type(message).__name__,
                           seconds=round(time.perf_counter() - started, 6))
