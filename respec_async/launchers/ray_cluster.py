"""Roles on a Ray cluster (`supervisor.launcher = "ray"`).

The supervisor joins a running cluster as a Ray driver and reserves one placement-group bundle
per role instance (the `[ray.<kind>]` resources), so a run gets all of its roles or fails at
once naming what no node has. On each bundle a small actor, `RoleHost`, runs the role as its own
OS process (the same `python -m roles NAME` as the local launcher), reports its exit status and
takes the supervisor's signals. Heartbeats, restarts, the ledger and shutdown are the
supervisor's, as on one machine.

What each node needs and what it keeps:
- A node-local run directory, `<ray.local_dir>/<run>-<hash>/<host name>` (mode 0700): the actor writes
  the config, the endpoints and the CURVE keys there (nothing goes through a shared disk); the
  roles on that node write their logs, metrics, ledger and checkpoints there. The supervisor
  copies logs and metrics back into its own run directory while they grow (every second, and
  once more at the end); checkpoints stay on the node that wrote them.
- The model and drafter paths of the config, readable at the same path (a shared filesystem
  or the same files on every node).
- Inboxes on each node's own address (as Ray reports it), CURVE on; the torch.distributed
  rendezvous store is a TCPStore on the trainer's node, hosted by the trainer's actor (it
  outlives the trainer's restarts). It takes no credentials: keep the cluster's network private.

A node that dies takes its roles with it. A generator or a reward role (nothing of theirs is
on the node's disk) starts again wherever Ray re-places its bundle, at a new inbox address that
the supervisor sends every other role (`InboxMoved`); its groups are re-issued as after any
restart. The trainer and the drafter learner keep checkpoints on their node (the trainer also
hosts the rendezvous store), so their node's loss fails the run, naming the node; so does a
role no live node can hold within `ray.placement_timeout_s`.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import ray
import structlog
from ray.exceptions import GetTimeoutError, RayError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from respec_async.config import Config, RayRoleResources
from respec_async.endpoints import TRAINER, Endpoints, RoleId, free_tcp_port, role_names
from respec_async.launchers import PlacementFailed, start_role

log = structlog.get_logger("supervisor")

CALL_TIMEOUT_S = 10.0  # a live actor answers within this long; past it the node counts as gone
# Written by the supervisor, or not worth copying back (checkpoints stay on their node).
_NOT_COPIED_FILES = {"config.json", "config.toml", "endpoints.json", "keys.json"}
_NOT_COPIED_DIRS = {"checkpoints", "drafter_checkpoints", "tracking", "sock"}
_APPENDED = (".log", ".jsonl")  # copied by their new tail; any other file whole when it changes
_MAX_COPY_BYTES = 16 << 20
# Roles that keep nothing on their node's disk: when their node is lost they start on another.
MOVABLE = ("generator", "reward", "echo")


@ray.remote(max_concurrency=8)  # threaded: a blocking wait() on the role does not stop signal() or changes()
class RoleHost:
    """One role instance's foothold on its node: starts, signals and waits for its process."""

    def __init__(self, name: str, run_key: str, local_root: str) -> None:
        self.name = name
        self.node_id = ray.get_runtime_context().get_node_id()
        self.ip = ray.util.get_node_ip_address()
        self.hostname = socket.gethostname()
        root = Path(local_root or Path(tempfile.gettempdir()) / "respec-ray") / run_key
        # By host name, not Ray's node id (new at every `ray start`): a resumed run finds its
        # checkpoints again when the trainer lands on the same machine.
        self.run_dir = root / self.hostname
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for directory in (root, self.run_dir):
            os.chmod(directory, 0o700)
        (self.run_dir / "logs").mkdir(exist_ok=True)
        self.processes: dict[int, subprocess.Popen] = {}
        self.store = None

    def info(self) -> dict[str, object]:
        return {"node": self.ip, "node_id": self.node_id, "hostname": self.hostname,
                "dir": str(self.run_dir), "host_pid": os.getpid()}

    def has_checkpoint(self) -> bool:
        from respec_async.training import checkpoints_newest_first  # what a resuming trainer looks for

        return bool(checkpoints_newest_first(self.run_dir))

    def free_port(self) -> int:
        return free_tcp_port(self.ip)

    def host_rendezvous(self, rendezvous: str) -> None:
        from transport.weights import host_rendezvous_store

        self.store = host_rendezvous_store(rendezvous)

    def deliver(self, files: dict[str, bytes]) -> None:
        """The run's start files, each 0600 (the keys among them), replaced atomically (other
        hosts on this machine, and other calls, write the same files at once: a part file each)."""
        for name, data in files.items():
            fd, part = tempfile.mkstemp(dir=self.run_dir, prefix=f".{name}.")  # mode 0600
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(part, self.run_dir / name)

    def start(self, restart_count: int) -> int:
        process = start_role(self.name, self.run_dir, restart_count)
        self.processes[process.pid] = process
        return process.pid

    def wait(self, pid: int) -> int:
        return self.processes[pid].wait()

    def signal(self, pid: int, sig: int) -> None:
        process = self.processes[pid]
        if process.poll() is None:
            process.send_signal(sig)

    def changes(self, copied: dict[str, tuple[int, int]],
                held: dict[str, tuple[int, str]]) -> list[tuple[str, int, bytes, int, bool]]:
        return changed_files(self.run_dir, copied, held)


def _prefix_digest(path: Path, size: int) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while size > 0:
            chunk = f.read(min(size, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            size -= len(chunk)
    return digest.hexdigest()


def changed_files(run_dir: Path, copied: dict[str, tuple[int, int]], held: dict[str, tuple[int, str]] | None = None
                  ) -> list[tuple[str, int, bytes, int, bool]]:
    """What grew or changed in a node's run directory beyond `copied` (path -> (bytes the
    supervisor holds, mtime_ns of its copy)): (path, offset, bytes, mtime_ns, continues). A log
    or metrics file comes by its new bytes from `offset`, 16 MiB at most a call (the rest
    next time); any other changed file whole (up to 16 MiB). `held` names logs the supervisor
    already holds from an earlier launch but has not copied from this node (path -> (size,
    sha1)): when this node's file starts with those bytes it `continues` them and comes from
    there; else it comes whole, to be appended after them. Files that vanish are skipped."""
    held = held or {}
    out = []
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir)
        name = str(rel)
        if rel.parts[0] in _NOT_COPIED_DIRS or name in _NOT_COPIED_FILES or rel.name.startswith("."):
            continue
        try:
            if not path.is_file():
                continue
            stat = path.stat()
            done, mtime = copied.get(name, (-1, 0))
            continues = False
            if path.name.endswith(_APPENDED):
                if done < 0 and name in held:
                    size, digest = held[name]
                    continues = stat.st_size >= size and _prefix_digest(path, size) == digest
                    done = size if continues else 0
                if done > stat.st_size:
                    done = 0  # the file started over (a new one): it comes whole
                if stat.st_size == max(done, 0):
                    continue
                start = max(done, 0)
            elif mtime == stat.st_mtime_ns or stat.st_size > _MAX_COPY_BYTES:
                continue
            else:
                start = 0
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read(_MAX_COPY_BYTES)
        except FileNotFoundError:
            continue  # a temporary file, replaced between listing and reading
        out.append((name, start, data, stat.st_mtime_ns, continues))
    return out


class CopyBack:
    """The supervisor's side of copying one node directory back: what it holds of each file.
    Bytes count as copied only once written here, so a lost or failed call loses nothing (the
    next one sends them again). A log the run directory already holds from an earlier launch
    is continued, never replaced: by its new tail when the node's file still starts with it
    (the node compares), else (another machine's new file) appended after it."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.copied: dict[str, tuple[int, int]] = {}
        self.base: dict[str, int] = {}  # where the node's file starts in ours
        # The logs already here when this node's copying began (an earlier launch's, or those of
        # a lost node this one replaces): (size, sha1), for the node to compare its own with.
        self.before: dict[str, tuple[int, str]] = {}
        for path in run_dir.rglob("*"):
            if path.name.endswith(_APPENDED) and not path.name.startswith(".") and path.is_file():
                size = path.stat().st_size
                if size:
                    self.before[str(path.relative_to(run_dir))] = (size, _prefix_digest(path, size))

    def held(self) -> dict[str, tuple[int, str]]:
        return {name: held for name, held in self.before.items() if name not in self.copied}

    def apply(self, changes: list[tuple[str, int, bytes, int, bool]]) -> None:
        for rel, offset, data, mtime, continues in changes:
            dest = (self.run_dir / rel).resolve()
            if self.run_dir not in dest.parents:
                raise ValueError(f"a node sent a file outside the run directory: {rel!r}")
            appended = rel.endswith(_APPENDED)
            if appended and offset == 0 and self.copied.get(rel, (0, 0))[0] > 0:
                self.copied.pop(rel)  # the node's file started over (a new, shorter one): appended too
            if appended and rel not in self.copied:
                self.base[rel] = 0 if continues or not dest.exists() else dest.stat().st_size
            write_at(dest, self.base.get(rel, 0) + offset if appended else offset, data, whole=not appended)
            self.copied[rel] = (offset + len(data), mtime)


def write_at(dest: Path, offset: int, data: bytes, whole: bool) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if whole:
        part = dest.with_name(f".{dest.name}.part")
        part.write_bytes(data)
        os.replace(part, dest)
        return
    with open(dest, "r+b" if dest.exists() else "wb") as f:
        f.seek(offset)
        f.write(data)


def _labels(labels: dict[str, str] | None) -> str:
    """", labels a=b" for what a user set (Ray's own ray.io/* labels left out), else ""."""
    shown = {k: v for k, v in (labels or {}).items() if not k.startswith("ray.io/")}
    return ", labels " + ", ".join(f"{k}={v}" for k, v in sorted(shown.items())) if shown else ""


def _first_line(exc: object) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _bundle(wants: RayRoleResources) -> dict[str, float]:
    bundle = {"CPU": wants.num_cpus, "GPU": wants.num_gpus, **wants.resources}
    return {k: v for k, v in bundle.items() if v}


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items()) if not k.startswith(("node:", "memory",
                                                                                                 "object_store")))


def _live_nodes() -> str:
    """Every live node's address, resources and labels, for a placement error."""
    return "; ".join(f"{n['NodeManagerAddress']} ({_describe(n['Resources'])}{_labels(n.get('Labels'))})"
                     for n in ray.nodes() if n["Alive"])


class RayRoleProcess:
    """A role process on a Ray node, behind the slice of Popen's interface the supervisor uses;
    started by its node's RoleHost. Lost (`lost` says why) when that host cannot be reached;
    an error raised inside the host is the role's failure, exit status 1."""

    def __init__(self, host, where: dict[str, str], restart_count: int) -> None:
        self.host = host
        self.where = where
        self.pid = -1
        self.returncode: int | None = None
        self.lost: str | None = None
        try:
            self.pid = ray.get(host.start.remote(restart_count), timeout=CALL_TIMEOUT_S)
        except RayError as exc:
            self._fail(exc)
            return
        self._exit = host.wait.remote(self.pid)

    def _settle(self, timeout: float) -> int | None:
        ready, _ = ray.wait([self._exit], timeout=timeout)
        if ready:
            try:
                self.returncode = ray.get(self._exit)
            except RayError as exc:
                self._fail(exc)
        return self.returncode

    def poll(self) -> int | None:
        return self.returncode if self.returncode is not None else self._settle(0)

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None and self._settle(CALL_TIMEOUT_S if timeout is None else timeout) is None:
            if timeout is not None:
                raise subprocess.TimeoutExpired("ray role", timeout)
            self._fail(GetTimeoutError(f"no exit status from its node within {CALL_TIMEOUT_S:g}s"))
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        """Sent, not awaited: the exit (or the host's loss) shows in poll(), and a signal to a
        silent node must not hold the supervisor's loop."""
        if self.returncode is None:
            self.host.signal.remote(self.pid, int(sig))

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _fail(self, exc: Exception) -> None:
        if isinstance(exc, RayTaskError):  # the host raised: the role failed, its node is fine
            log.error("role.host_error", pid=self.pid, error=_first_line(exc), **self.where)
            self.returncode = 1
            return
        node_id = self.where["node_id"]
        alive = next((n["Alive"] for n in ray.nodes() if n["NodeID"] == node_id), False)
        state = "unreachable; Ray does not list it dead yet" if alive else "dead"
        self.lost = f"lost its node {self.where['node']} (Ray node {node_id}, {state}): {_first_line(exc)}"
        self.returncode = -signal.SIGKILL


class RayLauncher:
    """Joins the cluster, places every role of the run, and starts each on its bundle."""

    copies_back = True  # roles write node-local directories: sync() brings their files here

    def __init__(self, config: Config, run_dir: Path, resuming: bool = False) -> None:
        self.config = config
        self.run_dir = run_dir
        self.names = role_names(config)
        address = config.supervisor.ray_address
        try:
            ray.init(address=address, namespace="respec-async", log_to_driver=False, logging_level="warning")
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise PlacementFailed(f"no Ray cluster at supervisor.ray_address = {address!r} ({exc}); start one with "
                                  f"`ray start --head` or name its address") from None
        # Node directories are per run: its name and a hash of where its run directory is.
        self.run_key = f"{run_dir.name}-{hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:8]}"
        self.pg = None
        self.hosts: dict[str, object] = {}
        self.copy_back: dict[str, CopyBack] = {}
        self.moving = threading.Lock()  # one relocation at a time rewrites the endpoints
        self.stopped = threading.Event()  # the run is ending: stop trying to place a lost role
        self.copying = threading.Lock()  # the periodic copy (a thread) and the last one at close
        try:
            self._place()
            if resuming:
                self._check_resume()
        except BaseException:
            self.close(copy=False)
            raise

    def _wants(self, name: str) -> RayRoleResources:
        return getattr(self.config.ray, RoleId.parse(name).kind)

    def _place(self) -> None:
        bundles = [_bundle(self._wants(name)) for name in self.names]
        labels = [dict(self._wants(name).labels) for name in self.names]
        nodes = [n for n in ray.nodes() if n["Alive"]]
        for name, bundle, wanted in zip(self.names, bundles, labels):
            if not any(all(n["Resources"].get(k, 0) >= v for k, v in bundle.items())
                       and all(n.get("Labels", {}).get(k) == v for k, v in wanted.items()) for n in nodes):
                raise PlacementFailed(f"no node of the Ray cluster has what {name} asks for ({_describe(bundle)}"
                                      f"{_labels(wanted)}; ray.{RoleId.parse(name).kind}); its nodes: {_live_nodes()}")
        timeout = self.config.ray.placement_timeout_s
        self.pg = placement_group(bundles, strategy=self.config.ray.strategy, name=f"respec-{self.run_dir.name}",
                                  bundle_label_selector=labels if any(labels) else None)
        try:
            ray.get(self.pg.ready(), timeout=timeout)
        except RayError:
            asked = "; ".join(f"{n}: {_describe(b)}" for n, b in zip(self.names, bundles))
            raise PlacementFailed(
                f"Ray did not place the run's roles within {timeout:g}s (ray.placement_timeout_s, strategy "
                f"{self.config.ray.strategy}): asked for {asked}; the cluster has "
                f"{_describe(ray.cluster_resources())}, {_describe(ray.available_resources())} of it free") from None
        for name in self.names:
            self.hosts[name] = self._new_host(name)
        try:
            infos = ray.get([self.hosts[n].info.remote() for n in self.names], timeout=max(timeout, CALL_TIMEOUT_S))
        except RayError as exc:
            raise PlacementFailed(f"a role host did not start on its node (ray.local_dir = "
                                  f"{self.config.ray.local_dir or '<temp dir>'!r}): {_first_line(exc)}") from None
        self.info = dict(zip(self.names, infos))
        for name in self.names:
            log.info("role.placed", role=name, **self.info[name])
        self._pick_copiers()

    def _new_host(self, name: str):
        wants = self._wants(name)
        return RoleHost.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.pg, placement_group_bundle_index=self.names.index(name)),
            num_cpus=wants.num_cpus, num_gpus=wants.num_gpus, resources=dict(wants.resources),
        ).remote(name, self.run_key, self.config.ray.local_dir)

    def _place_again(self, name: str, deadline: float):
        """(host, info, port) of a new host for `name` started before `deadline`, or None. Until
        Ray marks the lost node dead its bundle still points there and a new host dies at once;
        then Ray re-places the bundle, if some node can hold it, and the host starts."""
        while time.monotonic() < deadline and not self.stopped.is_set():
            host = self._new_host(name)
            try:
                info = ray.get(host.info.remote(), timeout=max(deadline - time.monotonic(), 0.1))
                return host, info, ray.get(host.free_port.remote(), timeout=CALL_TIMEOUT_S)
            except RayError:
                ray.kill(host)
                time.sleep(1.0)
        return None

    def _pick_copiers(self) -> None:
        # One host per node directory copies it back (the roles of a machine share it).
        with self.copying:
            copiers = {f"{info['node']}:{info['dir']}": self.hosts[name] for name, info in reversed(self.info.items())}
            for key in copiers:
                self.copy_back.setdefault(key, CopyBack(self.run_dir))
            self.copiers = copiers

    def _check_resume(self) -> None:
        """A resumed run's trainer must land where its checkpoints are (its node directory),
        else it would start over from step 0 under the earlier steps' records."""
        steps = self.run_dir / "metrics.jsonl"
        if TRAINER not in self.hosts or not steps.exists() or not steps.stat().st_size:
            return
        try:
            found = ray.get(self.hosts[TRAINER].has_checkpoint.remote(), timeout=CALL_TIMEOUT_S)
        except RayError as exc:
            raise PlacementFailed(f"--resume: the trainer's node did not say whether it holds a checkpoint: "
                                  f"{_first_line(exc)}") from None
        if not found:
            where = self.info[TRAINER]
            raise PlacementFailed(f"--resume: the trainer was placed on {where['hostname']} ({where['node']}), whose "
                                  f"{where['dir']} holds no checkpoint of this run; pin the trainer to the machine "
                                  f"that ran it (a custom resource in ray.trainer.resources)")

    def endpoints(self) -> Endpoints:
        """Every inbox on its role's node; the control socket here; the rendezvous on the trainer's node."""
        ports = dict(zip(self.names, ray.get([self.hosts[n].free_port.remote() for n in self.names],
                                              timeout=CALL_TIMEOUT_S)))
        here = ray.util.get_node_ip_address()
        inboxes = {n: f"tcp://{self.info[n]['node']}:{ports[n]}" for n in self.names}
        if TRAINER in self.hosts:
            store_host = self.info[TRAINER]["node"]
            port = ray.get(self.hosts[TRAINER].free_port.remote(), timeout=CALL_TIMEOUT_S)
        else:
            store_host, port = here, free_tcp_port(here)
        return Endpoints(supervisor=f"tcp://{here}:{free_tcp_port(here)}", inboxes=inboxes,
                         torch_dist=f"tcp://{store_host}:{port}")

    def deliver(self, run_dir: Path, strict: bool = True) -> None:
        """The start files to every node (`strict`: every host must take them; else a lost one is skipped)."""
        files = {name: (run_dir / name).read_bytes() for name in ("config.json", "config.toml", "endpoints.json",
                                                                  "keys.json") if (run_dir / name).exists()}
        for ref in [host.deliver.remote(files) for host in self.hosts.values()]:
            try:
                ray.get(ref, timeout=CALL_TIMEOUT_S)
            except RayError:
                if strict:
                    raise

    def relocate(self, name: str, endpoints: Endpoints) -> str:
        """A new host for a role whose node was lost: Ray re-places its bundle on a node that can
        hold it; the role's new inbox goes into `endpoints` (saved in the run directory and sent to
        every node). Only roles that keep nothing on their node's disk move."""
        kind = RoleId.parse(name).kind
        if kind not in MOVABLE:
            raise PlacementFailed(f"a {kind} keeps its state on its node's disk (checkpoints"
                                  f"{', the rendezvous store' if name == TRAINER else ''}), so it is not moved")
        try:
            ray.kill(self.hosts[name])
        except RayError:
            pass
        timeout = self.config.ray.placement_timeout_s
        placed = self._place_again(name, time.monotonic() + timeout)
        if placed is None:
            raise PlacementFailed(f"no other node took it within {timeout:g}s (ray.placement_timeout_s); it asks "
                                  f"for {_describe(_bundle(self._wants(name)))}; live nodes: {_live_nodes()}")
        host, info, port = placed
        with self.moving:
            self.hosts[name], self.info[name] = host, info
            self._pick_copiers()
            log.info("role.placed", role=name, moved=True, **info)
            endpoints.inboxes[name] = f"tcp://{info['node']}:{port}"
            endpoints.save(self.run_dir / "endpoints.json")
            self.deliver(self.run_dir, strict=False)
            return endpoints.inboxes[name]

    def host_rendezvous(self, rendezvous: str):
        if TRAINER in self.hosts:
            # The actor's first torch import: seconds on a busy node.
            ray.get(self.hosts[TRAINER].host_rendezvous.remote(rendezvous), timeout=6 * CALL_TIMEOUT_S)
            return None
        from transport.weights import host_rendezvous_store

        return host_rendezvous_store(rendezvous)

    def spawn(self, name: str, restart_count: int) -> RayRoleProcess:
        return RayRoleProcess(self.hosts[name], self.info[name], restart_count)

    def where(self, name: str) -> dict[str, str]:
        return {"node": self.info[name]["node"], "node_id": self.info[name]["node_id"][:12]}

    def sync(self) -> int:
        """Copy what each live node's roles wrote since the last call into the supervisor's run
        dir; the number of changes copied."""
        copied = 0
        with self.copying:
            pending = {d: host.changes.remote(self.copy_back[d].copied, self.copy_back[d].held())
                       for d, host in self.copiers.items()}
            for directory, ref in pending.items():
                try:
                    changes = ray.get(ref, timeout=CALL_TIMEOUT_S)
                except RayError:
                    continue  # a lost node: the role handles say so; what it copied before stays
                self.copy_back[directory].apply(changes)
                copied += len(changes)
        return copied

    def stop_moving(self) -> None:
        self.stopped.set()

    def close(self, copy: bool = True) -> None:
        self.stopped.set()
        try:
            # The last copy: again until nothing is left (a big file comes in 16 MiB pieces).
            for _ in range(64 if copy and self.hosts else 0):
                if not self.sync():
                    break
        finally:
            for host in self.hosts.values():
                try:
                    ray.kill(host)
                except RayError:
                    pass
            if self.pg is not None:
                remove_placement_group(self.pg)
            ray.shutdown()
