"""Garbage pushed into a live actor's inbox: every kind is dropped and counted with its reason
(logs/echo-0.jsonl), and the actor stays alive, keeps answering pings and handles the next
valid message. A real supervisor and real role processes (`respec launch`)."""

from __future__ import annotations

import collections
import os
import time

import msgspec
import pytest
import torch
import zmq

from respec_async.endpoints import Endpoints
from tests.runtime.conftest import launch, pid_alive  # noqa: F401 (launch is a fixture)
from transport.codec import Codec
from transport.schema import Echo, TensorMessage

pytestmark = pytest.mark.process

ECHO_PAIR = """
[roles]
generator = 0
reward = 0
trainer = 0
echo = 2
[supervisor]
live_status = false
ping_interval_s = 0.3
ping_timeout_s = 2.0
shutdown_grace_s = 4.0
"""


def garbage() -> list[tuple[str, list[bytes]]]:
    """(expected drop reason, frames) for each kind of garbage."""
    good = Codec().encode(TensorMessage(seq=1, names=["t"], tensors=[torch.arange(256, dtype=torch.float32)]))
    header, frame = good[0], bytes(good[1])

    def with_dtype(dtype: str) -> bytes:
        return msgspec.msgpack.encode(["TensorMessage", 1, ["t"], [[dtype, [256], 1]]])

    return [
        ("malformed", [b"\xc1" + os.urandom(200)]),  # 0xc1 is never valid msgpack
        ("unknown_type", [msgspec.msgpack.encode(["NoSuchMessage", 1, "x"])]),
        ("tensor_size", [header, frame[: len(frame) // 2]]),  # truncated tensor frame
        ("tensor_frame", [header]),  # tensor frame missing altogether
        ("dtype", [with_dtype("complex64"), frame]),  # a dtype we do not carry
        ("tensor_size", [with_dtype("float64"), frame]),  # a real dtype, wrong for the bytes
        ("empty", [b""]),  # the emptiest multipart ZeroMQ can send
        # An empty shape whose strides overflow: torch raised RuntimeError, which used to kill
        # the actor's inbox task (the actor stayed up, deaf).
        ("tensor_header", [msgspec.msgpack.encode(["TensorMessage", 1, ["t"], [["float32", [0, 2**62, 2**62], 1]]]), b""]),
    ]


def test_garbage_is_dropped_counted_and_the_actor_keeps_working(launch):  # noqa: F811
    run = launch(ECHO_PAIR, "run.log_level=debug")  # debug: message.handled events
    run.wait_event(lambda e: e.get("event") == "run.ready")
    pid = run.role_pids()["echo-0"][0]
    inbox = Endpoints.load(run.run_dir / "endpoints.json").inboxes["echo-0"]
    expected = garbage()

    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(inbox)
    try:
        started = time.monotonic()
        for _, frames in expected:
            push.send_multipart(frames)
        # A valid message after the garbage, from the same sender (so it is read last): echo-0
        # handles it and forwards it to echo-1, which handles it too.
        push.send_multipart(Codec().encode(Echo(seq=77, reply_to="echo-1", payload=b"after")))
    finally:
        push.close()
        ctx.term()

    handled = lambda e: e.get("event") == "message.handled" and e.get("type") == "Echo"  # noqa: E731
    run.wait_event(handled, timeout=20, source="echo-0")
    run.wait_event(handled, timeout=20, source="echo-1")

    drops = [e for e in run.events("echo-0") if e.get("event") == "message.dropped"]
    assert collections.Counter(e["reason"] for e in drops) == collections.Counter(r for r, _ in expected)
    assert all(e["channel"] == "echo-0.inbox" for e in drops)

    # Still answering pings: stay past ping_timeout_s, then check it was never restarted.
    time.sleep(max(0.0, started + 2.5 - time.monotonic()))
    assert pid_alive(pid)
    assert run.role_pids()["echo-0"] == [pid]
    assert not [e for e in run.events() if e.get("event") == "role.restarting"]
    assert not [e for e in run.events("echo-0") if e.get("level") == "error"]
    assert run.stop() == 0, run.output()
    # The actor's own drop counter (what its Pongs report as num_dropped), logged at exit.
    stopped = [e for e in run.events("echo-0") if e.get("event") == "role.stopped"]
    assert [e["num_dropped"] for e in stopped] == [len(expected)]
