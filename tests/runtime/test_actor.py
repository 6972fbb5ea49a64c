"""The actor runtime in-process, over real sockets: typed dispatch, pings answered while a
handler computes, handler errors contained, bounded mailbox."""

from __future__ import annotations

import asyncio
import threading
import time

import torch
import zmq.asyncio

from respec_async.actor import Actor, RoleContext, handles
from respec_async.config import Config, RolesSection
from respec_async.endpoints import assign_endpoints
from transport.channels import Kind, open_channel
from transport.schema import Echo, Ping, Pong, Ready, Shutdown
from transport.security import Security


def busy_compute(seconds: float) -> int:
    """Real CPU work (matmuls) for about `seconds`; holds the GIL only in short bursts."""
    a = torch.randn(256, 256)
    n = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        a = torch.tanh(a @ a)
        n += 1
    return n


class ComputeActor(Actor):
    block_loop = False

    async def setup(self) -> None:
        self.seen: list[int] = []

    @handles
    async def on_echo(self, message: Echo) -> None:
        if message.payload == b"fail":
            raise RuntimeError("handler bug")
        if message.payload == b"compute":
            if self.block_loop:
                busy_compute(2.0)  # the anti-pattern: freezes the loop
            else:
                await self.run_blocking(busy_compute, 2.0)
        self.seen.append(message.seq)


def make_ctx(tmp_path) -> RoleContext:
    config = Config(roles=RolesSection(generator=0, reward=0, trainer=0, echo=1))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return RoleContext(config, run_dir, "echo-0", assign_endpoints(config, run_dir), Security(insecure=True))


def start_in_thread(actor_class, ctx) -> tuple[threading.Thread, list]:
    """Run the actor on its own event loop in a thread, as a role process would, so the test's
    loop measures the actor's responsiveness from outside."""
    box: list = []

    async def run() -> int:
        actor = actor_class(ctx)
        box.append(actor)
        return await actor.run()

    thread = threading.Thread(target=lambda: box.append(asyncio.run(run())), daemon=True)
    thread.start()
    return thread, box


async def drive(tmp_path, actor_class) -> tuple[list[float], ComputeActor]:
    ctx = make_ctx(tmp_path)
    zctx = zmq.asyncio.Context()
    control = open_channel(zctx, Kind.ROUTER, ctx.endpoints.supervisor, bind=True)
    thread, box = start_in_thread(actor_class, ctx)
    ready = await asyncio.wait_for(control.recv(), 30)
    assert isinstance(ready.message, Ready) and ready.identity == b"echo-0"
    inbox = open_channel(zctx, Kind.PUSH, ctx.endpoints.inboxes["echo-0"], bind=False)
    await inbox.send(Echo(seq=1, payload=b"compute"))
    await asyncio.sleep(0.2)  # let the handler start
    latencies = []
    for seq in range(8):
        sent = time.perf_counter()
        await control.send(Ping(seq=seq, sent_at=time.time()), b"echo-0")
        while True:
            reply = await asyncio.wait_for(control.recv(), 30)
            if isinstance(reply.message, Pong) and reply.message.seq == seq:
                break
        latencies.append(time.perf_counter() - sent)
        await asyncio.sleep(0.1)
    await inbox.send(Echo(seq=2, payload=b"fail"))
    await inbox.send(Echo(seq=3))
    actor = box[0]
    deadline = time.monotonic() + 10
    while 3 not in actor.seen and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await control.send(Shutdown(reason="test"), b"echo-0")
    await asyncio.to_thread(thread.join, 30)
    assert box[1] == 0  # exit code
    zctx.destroy(linger=0)
    return latencies, actor


def test_pings_are_answered_while_a_handler_computes(tmp_path):
    latencies, actor = asyncio.run(drive(tmp_path, ComputeActor))
    # The first pings overlap the 2 s compute: each must still come back quickly.
    assert max(latencies[:6]) < 0.5, latencies
    assert actor.seen == [1, 3]  # the failing message did not stop dispatch
    assert actor.num_handler_errors == 1


def test_a_handler_that_blocks_the_loop_delays_pings(tmp_path):
    """The counter-check: without run_blocking the same work does freeze the loop, so the
    test above measures what it claims."""

    class Blocking(ComputeActor):
        block_loop = True

    latencies, _ = asyncio.run(drive(tmp_path, Blocking))
    assert max(latencies) > 1.0, latencies


def test_mailbox_is_bounded(tmp_path):
    class Tiny(ComputeActor):
        mailbox_size = 2

    ctx = make_ctx(tmp_path)
    actor = Tiny(ctx)
    assert actor.mailbox.maxsize == 2


def test_a_setup_that_fails_halfway_releases_what_it_registered_last_first(tmp_path):
    """at_teardown: sync and async callbacks run in reverse order of registration when the role
    stops, after a failed setup too, and nothing registered after the failure point runs."""
    released: list[str] = []

    class HalfSetUp(Actor):
        async def setup(self) -> None:
            self.at_teardown(lambda: released.append("metrics"))

            async def close_scorer() -> None:
                await asyncio.sleep(0)
                released.append("scorer")

            self.at_teardown(close_scorer)
            raise RuntimeError("the model did not load")
            self.at_teardown(lambda: released.append("never"))  # noqa: unreachable on purpose

    async def run() -> int:
        ctx = make_ctx(tmp_path)
        zctx = zmq.asyncio.Context()
        control = open_channel(zctx, Kind.ROUTER, ctx.endpoints.supervisor, bind=True)
        try:
            return await asyncio.wait_for(HalfSetUp(ctx).run(), 30)
        finally:
            control.close()
            zctx.destroy(linger=0)

    assert asyncio.run(run()) == 1
    assert released == ["scorer", "metrics"]
