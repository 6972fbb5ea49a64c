"""Async ZeroMQ channels that carry typed messages: PUSH/PULL, PUB/SUB, ROUTER/DEALER.

A `Channel` owns one `zmq.asyncio` socket and a `Codec`. `send` encodes a message into frames
and sends them without copying tensor bytes; `recv` returns the next message that decodes,
logging, counting and dropping anything that does not, so a peer's garbage never reaches (or
kills) the actor. High-water marks bound every queue: when a consumer is slow, `send` waits
instead of letting memory grow (except on PUB, where ZeroMQ drops messages for a subscriber
that is behind by more than the HWM).

Endpoints are `ipc://` paths inside the run directory by default, or `tcp://host:port`, which
are CURVE-encrypted and authenticated unless the config says `insecure = true`
(see `transport.security`).
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import structlog
import zmq
import zmq.asyncio

from transport.codec import Codec, DecodeError
from transport.security import Security

log = structlog.get_logger("transport")


class Kind(enum.Enum):
    PUSH = zmq.PUSH
    PULL = zmq.PULL
    PUB = zmq.PUB
    SUB = zmq.SUB
    ROUTER = zmq.ROUTER
    DEALER = zmq.DEALER


@dataclass
class ChannelStats:
    num_sent: int = 0
    num_received: int = 0
    num_dropped: int = 0
    dropped_by_reason: collections.Counter[str] = field(default_factory=collections.Counter)


class Envelope(NamedTuple):
    """A received message; `identity` is the peer's routing id on ROUTER sockets, else None.
    (A NamedTuple: immutable like a frozen dataclass, at a third of its construction cost.)"""

    message: Any
    identity: bytes | None = None


class Channel:
    """One typed socket. Use from a single event loop."""

    def __init__(self, socket: zmq.asyncio.Socket, kind: Kind, endpoint: str, name: str = "") -> None:
        self.socket = socket
        self.kind = kind
        self.endpoint = endpoint
        self.name = name or f"{kind.name.lower()}:{endpoint}"
        self.codec = Codec()
        self.stats = ChannelStats()

    async def send(self, message: Any, identity: bytes | None = None) -> None:
        frames = self.codec.encode(message)
        if self.kind is Kind.ROUTER:
            if identity is None:
                raise ValueError(f"{self.name}: a ROUTER send needs the peer identity")
            frames = [identity, *frames]
        # copy=False: tensor frames go out straight from the tensors' memory.
        await self.socket.send_multipart(frames, copy=False)
        self.stats.num_sent += 1

    async def recv(self) -> Envelope:
        while True:
            frames = await self.socket.recv_multipart(copy=False)
            envelope = self.decode(frames)
            if envelope is not None:
                return envelope

    def decode(self, frames: list[Any]) -> Envelope | None:
        """Decode raw frames; returns None (counted, logged) for anything malformed."""
        identity = None
        if self.kind is Kind.ROUTER:
            identity, frames = frames[0].bytes, frames[1:]
        try:
            # zmq.Frames go to the codec as they are: msgspec reads their buffer directly.
            message = self.codec.decode(frames)
        except DecodeError as exc:
            self.stats.num_dropped += 1
            self.stats.dropped_by_reason[exc.reason] += 1
            log.warning("message.dropped", channel=self.name, reason=exc.reason, error=str(exc)[:200])
            return None
        self.stats.num_received += 1
        return Envelope(message, identity)

    def close(self, linger_s: float = 0.0) -> None:
        self.socket.close(linger=int(linger_s * 1000))


def open_channel(
    ctx: zmq.asyncio.Context,
    kind: Kind,
    endpoint: str,
    *,
    bind: bool,
    security: Security | None = None,
    hwm: int = 1000,
    identity: bytes | None = None,
    subscribe: bytes = b"",
    name: str = "",
) -> Channel:
    """Create, secure, and bind or connect a socket; returns the typed channel around it."""
    socket = ctx.socket(kind.value)
    socket.setsockopt(zmq.SNDHWM, hwm)
    socket.setsockopt(zmq.RCVHWM, hwm)
    socket.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        socket.setsockopt(zmq.IDENTITY, identity)
    if kind is Kind.ROUTER:
        # An unroutable identity is an error we want to see, not a silent drop.
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if endpoint.startswith("tcp://"):
        if security is None:
            raise ValueError(f"{endpoint}: tcp endpoints need a Security (CURVE keys or insecure=True)")
        security.apply(socket, server=bind)
    if kind is Kind.SUB:
        socket.setsockopt(zmq.SUBSCRIBE, subscribe)
    if bind:
        socket.bind(endpoint)
    else:
        socket.connect(endpoint)
    return Channel(socket, kind, endpoint, name)
