"""Where every role listens: assigned once by the supervisor, saved in the run directory.

Each role instance ("generator-0", "trainer-0", ...) binds one PULL inbox that any peer can
push typed messages to (weights travel over torch.distributed, not here). The supervisor binds a ROUTER that roles connect to for the control plane
(Ready, Ping/Pong, Shutdown). ipc:// endpoints live in a 0700 socket directory of the run;
tcp:// endpoints get free ports on the configured host.
"""

from __future__ import annotations

import os
import random
import socket
import tempfile
from pathlib import Path
from typing import NamedTuple

import msgspec

from respec_async.config import Config

# Linux limits a unix socket path to 107 bytes; leave room for the socket file names.
_MAX_SOCKET_DIR_LEN = 70


class RoleId(NamedTuple):
    """A role instance: its kind (the roles/ module it runs) and its index among that kind;
    written "kind-index" ("generator-0") in endpoints, logs and the run directory."""

    kind: str
    index: int

    @classmethod
    def parse(cls, name: str) -> RoleId:
        kind, sep, index = name.rpartition("-")
        if not sep or not kind or not index.isdigit():
            raise ValueError(f"not a role instance name (kind-index, e.g. generator-0): {name!r}")
        return cls(kind, int(index))

    def __str__(self) -> str:
        return f"{self.kind}-{self.index}"


# The singleton roles every other role addresses by name: one trainer (it owns the data stream,
# the optimizer and the policy version) and at most one drafter learner.
TRAINER = str(RoleId("trainer", 0))
DRAFTER_LEARNER = str(RoleId("drafter_learner", 0))


class Endpoints(msgspec.Struct, kw_only=True):
    supervisor: str
    inboxes: dict[str, str]
    torch_dist: str  # file:///path or tcp://host:port: the weight groups' rendezvous store

    def save(self, path: Path) -> None:
        part = path.with_name(f".{path.name}.part")  # replaced whole: a reader never sees half a file
        part.write_bytes(msgspec.json.encode(self))
        os.replace(part, path)

    @classmethod
    def load(cls, path: Path) -> Endpoints:
        return msgspec.json.decode(path.read_bytes(), type=cls)

    def roles(self, kind: str) -> list[str]:
        """The names of every instance of one role kind in this run, by index."""
        found = [RoleId.parse(name) for name in self.inboxes]
        return [str(role) for role in sorted(r for r in found if r.kind == kind)]


def role_names(config: Config) -> list[str]:
    """Every role instance the config asks for, in start order (trainer last: it drives)."""
    counts = msgspec.to_builtins(config.roles)
    order = ["echo", "reward", "drafter_learner", "generator", "trainer"]
    return [str(RoleId(kind, i)) for kind in order for i in range(counts.get(kind, 0))]


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for ports it picks itself (outgoing connections, bind to port 0)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_tcp_port(host: str, rng: random.Random | None = None) -> int:
    """A port free on host now, below the kernel's ephemeral range where it can: a role binds
    its port only once it starts, and a port from that range can meanwhile become the source
    port of any process's outgoing connection (Ray's many among them), which a restart of the
    role would then hit every time."""
    rng = rng or random.SystemRandom()
    low = ephemeral_port_range()[0]
    for _ in range(50 if low > 10000 else 0):
        port = rng.randrange(10000, low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def socket_dir(run_dir: Path) -> Path:
    """A 0700 directory for ipc sockets: inside the run when the path is short enough, else a
    private temp dir linked from the run directory."""
    inside = run_dir / "sock"
    if inside.exists():
        return inside.resolve()
    if len(str(inside.resolve())) <= _MAX_SOCKET_DIR_LEN:
        inside.mkdir(mode=0o700)
        return inside.resolve()
    outside = Path(tempfile.mkdtemp(prefix="respec-"))
    os.chmod(outside, 0o700)
    inside.symlink_to(outside, target_is_directory=True)
    return outside


def assign_endpoints(config: Config, run_dir: Path) -> Endpoints:
    names = role_names(config)
    # torch.distributed's rendezvous store takes no credentials: in both schemes it is a file in
    # the 0700 run directory (the supervisor starts every role on its own host), so only the
    # run's user reaches it; the weights' own gloo / NCCL connections do not go through it.
    torch_dist = f"file://{(run_dir / 'rendezvous.store').resolve()}"
    if config.transport.scheme == "ipc":
        sock = socket_dir(run_dir)
        return Endpoints(
            supervisor=f"ipc://{sock}/supervisor",
            inboxes={n: f"ipc://{sock}/{n}.in" for n in names},
            torch_dist=torch_dist,
        )
    host = config.transport.host

    def tcp() -> str:
        return f"tcp://{host}:{free_tcp_port(host)}"

    return Endpoints(supervisor=tcp(), inboxes={n: tcp() for n in names}, torch_dist=torch_dist)
