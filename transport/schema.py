"""Every message that crosses a process boundary, as tagged `msgspec.Struct`s.

This is the only module that defines wire types. Each type is tagged (the tag is the class
name) so one socket can carry the `Message` union; `transport.codec` encodes them with msgpack
and moves `torch.Tensor` fields as separate zero-copy frames. Fields are plain data: ids,
versions, counts and tensors, named for what they are.
"""

from __future__ import annotations

import msgspec
import torch


class Struct(msgspec.Struct, tag=True, frozen=True, array_like=True, omit_defaults=True):
    """Base of every wire type: tagged by class name, encoded as a msgpack array."""


# --- supervisor <-> role control plane -------------------------------------------------


class Ready(Struct):
    """A role finished start-up and is ready for work."""

    role: str  # role instance name, e.g. "generator-0"
    pid: int
    restart_count: int = 0


class Ping(Struct):
    """Liveness probe from the supervisor; answered by the role's I/O task, not its mailbox."""

    seq: int
    sent_at: float


class Pong(Struct):
    """Answer to a Ping, with the role's live state for the status view."""

    seq: int
    role: str
    state: str  # "starting" | "running" | "stopping"
    mailbox_size: int = 0
    num_handled: int = 0
    num_dropped: int = 0


class Shutdown(Struct):
    """Asks a role to stop gracefully."""

    reason: str


class RoleFailed(Struct):
    """A role reports a fatal error before exiting, so the supervisor can say why."""

    role: str
    error: str


class RoleEvent(Struct):
    """A notable event a role wants shown on the supervisor's console (one line)."""

    role: str
    event: str
    fields: dict[str, str | int | float | bool] = {}


# --- generic payloads used by tests, benchmarks and examples ----------------------------


class Echo(Struct):
    """Request for an actor to send `payload` back to `reply_to` (tests, benchmarks)."""

    seq: int
    reply_to: str = ""
    payload: bytes = b""


class TensorMessage(Struct):
    """Named tensors plus a small header, e.g. for transport tests and benchmarks."""

    seq: int
    names: list[str]
    tensors: list[torch.Tensor]


Message = Ready | Ping | Pong | Shutdown | RoleFailed | RoleEvent | Echo | TensorMessage

MESSAGE_TYPES: tuple[type[Struct], ...] = Message.__args__  # type: ignore[attr-defined]
