"""The supervisor: the one process a user starts (`respec launch CONFIG`).

It creates the run directory, assigns endpoints, starts every configured role as its own OS
process (`python -m roles NAME`, here or on a Ray cluster's nodes: respec_async/launchers),
waits for each role's Ready, pings every role, restarts a role that dies or stops answering (at most `max_restarts` within `restart_window_s`, with
doubling backoff; past that the run fails and says why), and on SIGINT/SIGTERM stops all roles:
a Shutdown message, then SIGTERM, then SIGKILL after the grace period. Children also get
PDEATHSIG, so even a SIGKILLed supervisor leaves no orphans (on Ray: the role hosts are the
supervisor's actors, which Ray ends with it, and their roles die with them).

The run is complete when its driver role (the trainer; echo-0 in a diagnostic run) exits 0.
"""

from __future__ import annotations

import asyncio
import collections
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import structlog
import zmq
import zmq.asyncio

from respec_async.config import Config, config_to_toml
from respec_async.endpoints import TRAINER, Endpoints, assign_endpoints, role_names
from respec_async.launchers import Launcher, LocalLauncher, PlacementFailed, RoleHandle
from respec_async.status import StatusView
from transport.channels import Channel, Kind, open_channel
from transport.schema import InboxMoved, Ping, Pong, Ready, ReissueHeld, RoleEvent, RoleFailed, Shutdown
from transport.security import Security, start_authenticator

log = structlog.get_logger("supervisor")

BUSY_WINDOW_S = 10.0  # the role table's busy share is over about this many recent seconds


class RunFailed(RuntimeError):
    """The run cannot go on; the message says which role and why."""


@dataclass
class RoleProcess:
    name: str
    popen: RoleHandle | None = None  # a subprocess.Popen, or its stand-in for a process on another node
    state: str = "pending"  # pending | starting | running | done | restarting | failed | stopped
    restart_times: collections.deque[float] = field(default_factory=collections.deque)
    num_restarts: int = 0
    started_at: float = 0.0
    last_pong_at: float = 0.0
    last_failure: str = ""
    node: str = ""  # the machine it runs on, on a cluster ("" for a local role)
    mailbox_size: int = 0
    num_handled: int = 0
    num_dropped: int = 0
    handled_at_progress: int = 0  # num_handled at the last trainer step (the watchdog's baseline)
    # (monotonic time, busy seconds) from this incarnation's recent pongs: the busy share's window
    busy_samples: collections.deque[tuple[float, float]] = field(default_factory=collections.deque)

    def on_busy(self, now: float, busy_s: float) -> None:
        if self.busy_samples and busy_s < self.busy_samples[-1][1]:
            self.busy_samples.clear()  # a new incarnation counts from zero
        self.busy_samples.append((now, busy_s))
        while len(self.busy_samples) > 2 and now - self.busy_samples[1][0] >= BUSY_WINDOW_S:
            self.busy_samples.popleft()

    @property
    def busy_share(self) -> float | None:
        """Share of the last ~BUSY_WINDOW_S seconds this role spent working (None: not known yet)."""
        if len(self.busy_samples) < 2:
            return None
        (t0, b0), (t1, b1) = self.busy_samples[0], self.busy_samples[-1]
        return min(max((b1 - b0) / (t1 - t0), 0.0), 1.0) if t1 > t0 else None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


def create_run_dir(config: Config) -> Path:
    root = Path(config.run.root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = root / f"{config.run.name}-{stamp}"
    suffix = 0
    while run_dir.exists():
        suffix += 1
        run_dir = root / f"{config.run.name}-{stamp}-{suffix}"
    run_dir.mkdir(mode=0o700)
    return run_dir.resolve()


def prepare_run_dir(config: Config, run_dir: Path, endpoints: Endpoints | None = None) -> Endpoints:
    """Write what every role reads at start: resolved config, endpoints (assigned here unless
    given), keys."""
    (run_dir / "logs").mkdir(exist_ok=True)
    (run_dir / "config.json").write_bytes(msgspec.json.encode(config))
    (run_dir / "config.toml").write_text(config_to_toml(config))
    endpoints = endpoints or assign_endpoints(config, run_dir)
    endpoints.save(run_dir / "endpoints.json")
    if config.transport.scheme == "tcp" and not config.transport.insecure:
        Security.generate().save(run_dir / "keys.json")
    return endpoints


class Supervisor:
    def __init__(self, config: Config, run_dir: Path, launcher: Launcher | None = None) -> None:
        self.config = config
        self.run_dir = run_dir
        self.launcher = launcher or LocalLauncher(run_dir)
        self.endpoints = Endpoints.load(run_dir / "endpoints.json")
        keys = run_dir / "keys.json"
        self.security = Security.load(keys) if keys.exists() else Security(insecure=True)
        self.roles = {name: RoleProcess(name) for name in role_names(config)}
        self.driver = self._driver_name()
        self.zmq = zmq.asyncio.Context()
        self.control: Channel | None = None
        self.stopping = asyncio.Event()
        self.stop_reason = ""
        self.stop_signal: int | None = None  # the signal that stopped the run, if one did
        self.failure: str | None = None
        self.ready = {name: asyncio.Event() for name in self.roles}
        self.last_progress_at: float | None = None  # the run's readiness, then each trainer step
        self.status = StatusView(self, live=config.supervisor.live_status,
                                 num_steps=config.trainer.num_steps if config.roles.trainer else 0)
        self._ping_seq = 0
        self._moves: set[asyncio.Task] = set()  # roles being started on another node
        self.moved: dict[str, str] = {}  # role -> the inbox it moved to (told to every role at Ready)

    def _driver_name(self) -> str | None:
        if self.config.roles.trainer:
            return TRAINER
        if self.config.roles.echo and self.config.echo.num_rounds:
            return "echo-0"
        return None

    # --- processes --------------------------------------------------------------------

    def _spawn(self, role: RoleProcess) -> None:
        role.popen = self.launcher.spawn(role.name, role.num_restarts)
        where = self.launcher.where(role.name)
        role.node = where.get("node", "")
        role.state = "starting"
        role.started_at = role.last_pong_at = time.monotonic()
        role.num_handled = role.handled_at_progress = 0  # a new process counts from zero
        role.busy_samples.clear()
        self.ready[role.name].clear()
        log.info("role.started", role=role.name, pid=role.popen.pid, restarts=role.num_restarts, **where)

    async def _wait_ready(self, names: list[str]) -> None:
        timeout = self.config.supervisor.ready_timeout_s
        deadline = time.monotonic() + timeout
        while not self.stopping.is_set() and not all(self.ready[n].is_set() for n in names):
            if time.monotonic() > deadline:
                missing = [n for n in names if not self.ready[n].is_set()]
                detail = "; ".join(f"{n}: {self._why_not_ready(n)}" for n in missing)
                raise RunFailed(f"role(s) not ready within {timeout:g}s: {detail}")
            await asyncio.sleep(0.05)

    def _why_not_ready(self, name: str) -> str:
        role = self.roles[name]
        if role.last_failure:
            return role.last_failure
        if role.popen is not None and role.popen.poll() is not None:
            return f"exited with code {role.popen.returncode} (see logs/{name}.log)"
        return f"still starting (see logs/{name}.log)"

    def _restart_or_fail(self, role: RoleProcess, why: str) -> None:
        cfg = self.config.supervisor
        now = time.monotonic()
        while role.restart_times and now - role.restart_times[0] > cfg.restart_window_s:
            role.restart_times.popleft()
        role.last_failure = why
        lost = role.popen.lost if role.popen is not None else None
        if len(role.restart_times) >= cfg.max_restarts:
            role.state = "failed"
            self.fail(f"{role.name} {why}; it was restarted {len(role.restart_times)} times within "
                      f"{cfg.restart_window_s:g}s (max_restarts = {cfg.max_restarts}); see logs/{role.name}.log")
            return
        delay = cfg.restart_backoff_s * (2 ** len(role.restart_times))
        role.restart_times.append(now)
        role.num_restarts += 1
        role.state = "restarting"
        if lost:
            log.warning("role.moving", role=role.name, why=lost, restarts=role.num_restarts)
            self._moves.add(asyncio.get_running_loop().create_task(self._move(role, lost)))
            return
        log.warning("role.restarting", role=role.name, why=why, delay_s=delay, restarts=role.num_restarts)
        asyncio.get_running_loop().call_later(delay, self._respawn, role)

    async def _move(self, role: RoleProcess, lost: str) -> None:
        """Start a role whose node was lost on another node, and tell every other role its new
        inbox (a role that is starting meanwhile hears it with its Ready)."""
        try:
            try:
                endpoint = await asyncio.to_thread(self.launcher.relocate, role.name, self.endpoints)
            except Exception as exc:  # PlacementFailed, or whatever else kept it from its new node
                role.state = "failed"
                if self.stopping.is_set():
                    return  # the run ends anyway (and stopped the search)
                self.fail(f"{role.name} {lost}; not restarted elsewhere: {exc}")
                return
            self.moved[role.name] = endpoint
            for other in self.roles.values():
                if other is not role and other.alive() and not self.stopping.is_set():
                    await self._tell_moved(other.name, {role.name: endpoint})
            if not self.stopping.is_set():
                self._spawn(role)
        finally:
            self._moves.discard(asyncio.current_task())  # type: ignore[arg-type]

    async def _tell_moved(self, name: str, moved: dict[str, str]) -> None:
        for role, endpoint in moved.items():
            try:
                await self.control.send(InboxMoved(role=role, endpoint=endpoint), name.encode())
            except zmq.ZMQError:
                pass  # not connected (yet): its Ready brings it the news

    def _respawn(self, role: RoleProcess) -> None:
        if self.stopping.is_set():
            return
        self._spawn(role)

    def fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
            log.error("run.failed", reason=reason)
        self.request_stop(f"run failed: {reason}")

    def _on_signal(self, sig: int) -> None:
        if not self.stopping.is_set():
            self.stop_signal = sig
        self.request_stop(f"received {signal.Signals(sig).name}")

    def request_stop(self, reason: str) -> None:
        if not self.stopping.is_set():
            self.stop_reason = reason
            log.info("run.stopping", reason=reason)
            self.stopping.set()

    # --- control plane ----------------------------------------------------------------

    async def _control_loop(self) -> None:
        assert self.control is not None
        while True:
            envelope = await self.control.recv()
            message, sender = envelope.message, (envelope.identity or b"").decode()
            role = self.roles.get(sender)
            if role is None:
                log.warning("control.unknown_peer", peer=sender, type=type(message).__name__)
                continue
            if isinstance(message, Ready):
                if role.popen is None or message.pid != role.popen.pid:
                    continue  # a late message from a previous incarnation
                role.state = "running"
                role.last_pong_at = time.monotonic()
                if self.last_progress_at is not None:
                    self.last_progress_at = role.last_pong_at  # a role back from a restart: a full timeout
                self.ready[role.name].set()
                moved = {name: endpoint for name, endpoint in self.moved.items() if name != role.name}
                if moved:  # it may have read the endpoints before a move
                    await self._tell_moved(role.name, moved)
                log.info("role.ready", role=role.name, pid=message.pid,
                         seconds=round(time.monotonic() - role.started_at, 2))
            elif isinstance(message, Pong):
                role.last_pong_at = time.monotonic()
                role.mailbox_size = message.mailbox_size
                role.num_handled = message.num_handled
                role.num_dropped = message.num_dropped
                role.on_busy(role.last_pong_at, message.busy_s)
            elif isinstance(message, RoleFailed):
                role.last_failure = f"failed: {message.error}"
                log.error("role.failed", role=role.name, error=message.error, retryable=message.retryable)
                if not message.retryable:
                    role.state = "failed"
                    self.fail(f"{role.name} cannot start: {message.error}; not restarted, a restart would fail "
                              f"the same way (see logs/{role.name}.log)")
            elif isinstance(message, RoleEvent):
                emit = log.warning if message.level == "warning" else log.info
                emit(message.event, role=role.name, **message.fields)
                if message.event == "train.step":
                    self.status.on_step(message.fields)
                    self._progressed()

    async def _sync_loop(self) -> None:
        """Remote roles' logs and metrics into this run directory, every second."""
        failing = False
        while True:
            try:
                await asyncio.to_thread(self.launcher.sync)
                failing = False
            except Exception as exc:  # noqa: BLE001 (a copy that failed is tried again next time)
                if not failing:
                    log.error("run.copy_back_failed", error=repr(exc))
                failing = True
            await asyncio.sleep(1.0)

    async def _ping_loop(self) -> None:
        assert self.control is not None
        interval = self.config.supervisor.ping_interval_s
        while True:
            self._ping_seq += 1
            for role in self.roles.values():
                if role.state == "running" and role.alive():
                    try:
                        await self.control.send(Ping(seq=self._ping_seq, sent_at=time.time()), role.name.encode())
                    except zmq.ZMQError:
                        pass  # not connected yet / just died: the watch loop decides
            await asyncio.sleep(interval)

    async def _watch_loop(self) -> None:
        cfg = self.config.supervisor
        while True:
            now = time.monotonic()
            for role in self.roles.values():
                if role.state not in ("starting", "running") or role.popen is None:
                    continue
                code = role.popen.poll()
                if code is None:
                    if role.state == "running" and now - role.last_pong_at > cfg.ping_timeout_s:
                        silent = now - role.last_pong_at
                        role.popen.kill()
                        role.popen.wait()
                        self._restart_or_fail(role, f"stopped answering pings for {silent:.1f}s (killed)")
                    continue
                if code == 0:
                    role.state = "done"
                    log.info("role.done", role=role.name)
                    if role.name == self.driver:
                        self.request_stop(f"{role.name} finished")
                    continue
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                how = role.popen.lost or how
                if role.last_failure.startswith("failed:"):
                    how += f" ({role.last_failure})"
                self._restart_or_fail(role, how)
            self._check_progress(now)
            await asyncio.sleep(0.1)

    # --- progress watchdog --------------------------------------------------------------

    def _progressed(self) -> None:
        self.last_progress_at = time.monotonic()
        for role in self.roles.values():
            role.handled_at_progress = role.num_handled

    def _check_progress(self, now: float) -> None:
        """A stall: no trainer step for stall_timeout_s while every role is up (a dead or silent
        role is the restart logic's; a role that is (re)starting, or just came back Ready,
        restarts the clock)."""
        cfg = self.config.supervisor
        if (not cfg.stall_timeout_s or self.driver != TRAINER or self.last_progress_at is None
                or self.stopping.is_set() or now - self.last_progress_at < cfg.stall_timeout_s):
            return
        if any(r.state not in ("running", "done") for r in self.roles.values()):
            self.last_progress_at = now  # a role is (re)starting: give it a full timeout
            return
        waited = now - self.last_progress_at
        held = self._groups_held()
        roles = {r.name: {"mailbox": r.mailbox_size, "handled_since_step": r.num_handled - r.handled_at_progress,
                          "heartbeat_s": round(now - r.last_pong_at, 1), "restarts": r.num_restarts,
                          "groups": held.get(r.name, 0)}
                 for r in self.roles.values()}
        detail = "; ".join(f"{name}: mailbox {v['mailbox']}, handled {v['handled_since_step']} since the last step, "
                           f"holds {v['groups']} groups" for name, v in roles.items())
        what = (f"no trainer step for {waited:.0f}s (supervisor.stall_timeout_s = {cfg.stall_timeout_s:g}) while "
                f"every role answers pings: {detail}")
        stuck = [self.roles[name] for name in sorted(held) if name in self.roles and held[name]]
        action = cfg.stall_action if stuck else "fail"
        log.error("run.stalled", waited_s=round(waited, 1), roles=roles, action=action)
        if action == "fail":
            self.fail(what)
            return
        self.last_progress_at = now
        if action == "reissue":
            self._reissue_task = asyncio.get_running_loop().create_task(self._ask_reissue([r.name for r in stuck]))
            return
        for role in stuck:
            if role.popen is not None and role.popen.poll() is None:
                role.popen.kill()
                role.popen.wait()
            self._restart_or_fail(role, f"held {held[role.name]} groups while the run stalled (restarted)")

    async def _ask_reissue(self, names: list[str]) -> None:
        try:
            await self.control.send(ReissueHeld(roles=names), TRAINER.encode())
        except zmq.ZMQError as exc:
            self.fail(f"the run stalled and the trainer could not be asked to re-issue: {exc!r}")

    def _groups_held(self) -> dict[str, int]:
        """Prompt groups out per role, from the trainer's ledger (empty if it cannot be read)."""
        from respec_async.ledger import LEDGER_FILE, holders, read_ledger

        try:
            return dict(holders(read_ledger(self.run_dir / LEDGER_FILE)))
        except OSError:
            return {}

    # --- lifecycle --------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        if self.config.transport.scheme == "tcp":
            start_authenticator(self.zmq, self.security)
        self.control = open_channel(
            self.zmq, Kind.ROUTER, self.endpoints.supervisor, bind=True, security=self.security,
            hwm=max(self.config.transport.hwm, 1000), name="supervisor.control",
        )
        # The torch.distributed rendezvous store is hosted here (a file in the run directory, see
        # assign_endpoints; on Ray, by the trainer's node): its host outlives every role's
        # restarts, so groups re-form after them.
        self.store = self.launcher.host_rendezvous(self.endpoints.torch_dist)
        log.info("run.started", run_dir=str(self.run_dir), roles=list(self.roles), driver=self.driver)
        tasks = [asyncio.create_task(self._control_loop(), name="control")]
        if self.launcher.copies_back:
            tasks.append(asyncio.create_task(self._sync_loop(), name="sync"))
        try:
            for role in self.roles.values():
                self._spawn(role)
            tasks.append(asyncio.create_task(self._watch_loop(), name="watch"))
            await self._wait_ready(list(self.roles))
            if not self.stopping.is_set():
                log.info("run.ready", num_roles=len(self.roles))
                self._progressed()
            tasks.append(asyncio.create_task(self._ping_loop(), name="ping"))
            tasks.append(asyncio.create_task(self.status.run(), name="status"))
            await self.stopping.wait()
        except RunFailed as exc:
            self.fail(str(exc))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._moves:  # a role being placed on another node: stop trying, then stop all
                self.launcher.stop_moving()
                await asyncio.wait(self._moves, timeout=30.0)
            await self._stop_all()
            self.launcher.close()  # on Ray: the last copy of remote logs and metrics first
            self.status.close()
            self.zmq.destroy(linger=0)
            sock = self.run_dir / "sock"
            if sock.is_symlink():  # a private temp dir used because the run path was too long
                shutil.rmtree(sock.resolve(), ignore_errors=True)
                sock.unlink()
        self._audit_ledger()
        if self.failure:
            log.error("run.finished", ok=False, reason=self.failure, run_dir=str(self.run_dir))
            return 1
        if self.stop_signal is not None and self.driver is not None:
            # Stopped from outside before the driver (the trainer) finished: not a success.
            # 128 + N, as a shell reports a process a signal ended (130 for SIGINT). A run with
            # no driver (serving roles only) has no last step: a signal is how it ends.
            name = signal.Signals(self.stop_signal).name
            progress = self._progress()
            log.warning("run.interrupted", signal=name, run_dir=str(self.run_dir), **progress)
            where = (f"interrupted at step {progress['steps_done']} of {progress['num_steps']}"
                     if progress else "interrupted")
            print(f"{where} ({name}); `respec launch --resume {self.run_dir}` continues it", file=sys.stderr)
            return 128 + self.stop_signal
        log.info("run.finished", ok=True, reason=self.stop_reason, run_dir=str(self.run_dir))
        return 0

    def _audit_ledger(self) -> None:
        """Every run with a trainer ends with the check that each prompt group has a fate."""
        from respec_async.ledger import audit_run

        try:
            result = audit_run(self.run_dir)
        except (OSError, msgspec.DecodeError) as exc:
            log.error("run.ledger_unreadable", error=repr(exc))
            return
        if result is not None:
            (log.info if result.balanced else log.error)(
                "run.ledger", balanced=result.balanced, issued=result.num_issued, trained=result.num_trained,
                dropped=result.num_dropped, in_flight=result.num_in_flight, lost=result.num_lost,
                reissued=result.num_reissues, summary=result.summary())

    def _progress(self) -> dict[str, int]:
        """Steps the trainer recorded and the steps the run was for (empty without a trainer)."""
        if not self.config.roles.trainer:
            return {}
        from respec_async.metrics import read_metrics

        path = self.run_dir / "metrics.jsonl"
        try:
            records = read_metrics(path) if path.exists() else []
        except msgspec.DecodeError:  # a record cut off by the stop: count none rather than fail the exit
            records = []
        return {"steps_done": len(records), "num_steps": self.config.trainer.num_steps}

    async def _stop_all(self) -> None:
        grace = self.config.supervisor.shutdown_grace_s
        live = [r for r in self.roles.values() if r.alive()]
        if self.control is not None:
            for role in live:
                try:
                    await self.control.send(Shutdown(reason=self.stop_reason), role.name.encode())
                except zmq.ZMQError:
                    pass
        # A role still starting has nothing to save and reads no Shutdown before it is ready:
        # SIGTERM it now rather than after half the grace (a failed start then ends in seconds).
        starting = [r for r in live if not self.ready[r.name].is_set()]
        if starting:
            log.info("roles.signal", signal="SIGTERM", roles=[r.name for r in starting], why="still starting")
            for role in starting:
                role.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        for sig, wait_s in ((None, grace / 2), (signal.SIGTERM, grace / 2), (signal.SIGKILL, 5.0)):
            live = [r for r in live if r.alive()]
            if not live:
                break
            if sig is not None:
                log.warning("roles.signal", signal=sig.name, roles=[r.name for r in live])
                for role in live:
                    role.popen.send_signal(sig)  # type: ignore[union-attr]
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and any(r.alive() for r in live):
                await asyncio.sleep(0.05)
        for role in self.roles.values():
            if role.popen is not None:
                role.popen.wait()
                if role.state not in ("done", "failed"):
                    role.state = "stopped"


def launch(config: Config, run_dir: Path | None = None, verbose: bool = False) -> tuple[int, Path]:
    """Create (or reuse) the run directory and supervise the run; returns (exit code, run dir).
    Under the live view the console shows warnings and the run's milestones only, unless
    `verbose`; the log files always get every event."""
    import uvloop

    if config.roles.generator or config.roles.trainer:
        from respec_async.models import resolve_models

        config = resolve_models(config)
    resuming = run_dir is not None
    if run_dir is None:
        run_dir = create_run_dir(config)
    elif not (run_dir / "config.toml").exists():
        raise RunFailed(f"{run_dir} is not a run directory (no config.toml)")
    from respec_async.logs import configure_logging, console_worthy

    (run_dir / "logs").mkdir(exist_ok=True)
    live = config.supervisor.live_status and sys.stderr.isatty() and not verbose
    configure_logging(run_dir / "logs" / "supervisor.jsonl", role="supervisor", level=config.run.log_level,
                      console_filter=console_worthy if live else None)
    launcher: Launcher
    if config.supervisor.launcher == "ray":
        from respec_async.launchers.ray_cluster import RayLauncher

        try:
            launcher = RayLauncher(config, run_dir, resuming=resuming)
        except PlacementFailed as exc:
            log.error("run.failed", reason=str(exc))
            print(f"run failed: {exc}", file=sys.stderr)
            return 1, run_dir
        try:
            prepare_run_dir(config, run_dir, launcher.endpoints())
            launcher.deliver(run_dir)
        except BaseException:
            launcher.close(copy=False)
            raise
    else:
        prepare_run_dir(config, run_dir)
        launcher = LocalLauncher(run_dir)

    async def main() -> int:
        return await Supervisor(config, run_dir, launcher).run()

    return uvloop.run(main()), run_dir
