"""Channels over real sockets: tensors of every wire dtype cross a PUSH/PULL pair bit-exactly
over ipc and tcp loopback, garbage is counted and dropped, and a full queue makes `send` wait."""

from __future__ import annotations

import asyncio

import pytest
import torch
import zmq
import zmq.asyncio

from respec_async.endpoints import free_tcp_port
from tests.transport.test_codec import special_tensors
from tests.transport.wire import tensor_bytes
from transport.channels import Kind, open_channel
from transport.codec import DTYPES, Codec
from transport.schema import Pong, TensorMessage
from transport.security import Security


def endpoint(scheme: str, tmp_path) -> str:
    return f"ipc://{tmp_path}/t.sock" if scheme == "ipc" else f"tcp://127.0.0.1:{free_tcp_port('127.0.0.1')}"


@pytest.mark.parametrize("scheme", ["ipc", "tcp"])
def test_every_wire_dtype_crosses_a_socket_bit_exactly(scheme, tmp_path):
    sent = {name: special_tensors(dtype) for name, dtype in DTYPES.items()}

    async def main():
        ctx = zmq.asyncio.Context()
        ep, security = endpoint(scheme, tmp_path), Security(insecure=True)
        pull = open_channel(ctx, Kind.PULL, ep, bind=True, security=security)
        push = open_channel(ctx, Kind.PUSH, ep, bind=False, security=security)
        try:
            for seq, (name, items) in enumerate(sent.items()):
                await push.send(TensorMessage(seq=seq, names=[name] * len(items), tensors=items))
            return [(await asyncio.wait_for(pull.recv(), 10)).message for _ in sent]
        finally:
            ctx.destroy(linger=0)

    received = asyncio.run(main())
    for message, (name, items) in zip(received, sent.items(), strict=True):
        assert message.names[0] == name
        for got, want in zip(message.tensors, items, strict=True):
            assert got.dtype == want.dtype and got.shape == want.shape
            assert tensor_bytes(got) == tensor_bytes(want), f"{name}{list(want.shape)} differs"


def test_garbage_is_counted_and_dropped_and_the_next_message_arrives(tmp_path):
    async def main():
        ctx = zmq.asyncio.Context()
        ep = endpoint("ipc", tmp_path)
        pull = open_channel(ctx, Kind.PULL, ep, bind=True)
        raw = ctx.socket(zmq.PUSH)
        raw.connect(ep)
        try:
            # One sender, so the order holds (PULL fair-queues between senders).
            await raw.send_multipart([b"\xc1junk"])
            await raw.send_multipart([b""])
            await raw.send_multipart(Codec().encode(Pong(seq=1, role="r", state="running")))
            envelope = await asyncio.wait_for(pull.recv(), 10)
            return envelope.message, pull.stats
        finally:
            ctx.destroy(linger=0)

    message, stats = asyncio.run(main())
    assert message == Pong(seq=1, role="r", state="running")
    assert stats.num_dropped == 2 and stats.num_received == 1
    assert stats.dropped_by_reason == {"malformed": 1, "empty": 1}


def test_send_waits_when_the_consumer_does_not_read(tmp_path):
    hwm, chunk = 4, torch.zeros(64 * 1024, dtype=torch.uint8)  # 64 KiB per message

    async def main():
        ctx = zmq.asyncio.Context()
        ep = endpoint("ipc", tmp_path)
        pull = open_channel(ctx, Kind.PULL, ep, bind=True, hwm=hwm)
        push = open_channel(ctx, Kind.PUSH, ep, bind=False, hwm=hwm)
        try:
            await push.send(TensorMessage(seq=-1, names=["c"], tensors=[chunk]))
            await asyncio.wait_for(pull.recv(), 10)  # connected
            num_accepted = 0
            while num_accepted < 2000:
                try:
                    await asyncio.wait_for(push.send(TensorMessage(seq=num_accepted, names=["c"], tensors=[chunk])), 1.0)
                except TimeoutError:
                    break
                num_accepted += 1
            blocked = asyncio.create_task(push.send(TensorMessage(seq=10**6, names=["c"], tensors=[chunk])))
            await asyncio.sleep(0.5)
            still_blocked = not blocked.done()
            # Once the consumer reads, the waiting sender goes on.
            for _ in range(num_accepted + 1):
                await asyncio.wait_for(pull.recv(), 10)
            await asyncio.wait_for(blocked, 10)
            return num_accepted, still_blocked
        finally:
            ctx.destroy(linger=0)

    num_accepted, still_blocked = asyncio.run(main())
    # Bounded: the two HWMs plus what the kernel's socket buffers hold (a few MiB), not 2000 x 64 KiB.
    # (7 on Linux ipc with hwm = 4.)
    assert 1 <= num_accepted < 200, f"{num_accepted} messages of 64 KiB accepted without a reader"
    assert still_blocked
