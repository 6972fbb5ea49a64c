"""Diagnostic role: answers Echo messages, and (echo-0, when asked) drives a round of echoes.

Used by `respec launch` connectivity checks, by the transport tests (a live actor to throw
garbage at) and by the supervisor tests (a role to kill). Not part of the RL loop.
"""

from __future__ import annotations

import asyncio
import time

from respec_async.actor import Actor, handles
from transport.schema import Echo


class EchoActor(Actor):
    async def setup(self) -> None:
        self.replies: asyncio.Queue[Echo] = asyncio.Queue()
        self.num_rounds = self.ctx.config.echo.num_rounds

    @handles
    async def on_echo(self, message: Echo) -> None:
        if message.reply_to:
            await self.send(message.reply_to, Echo(seq=message.seq, payload=message.payload))
        else:
            await self.replies.put(message)

    async def main(self) -> None:
        if self.num_rounds == 0 or self.ctx.index != 0:
            await self.stopped.wait()
            return
        peers = [n for n in self.ctx.endpoints.inboxes if n.startswith("echo-") and n != self.name] or [self.name]
        rtts = []
        for seq in range(self.num_rounds):
            peer = peers[seq % len(peers)]
            started = time.perf_counter()
            await self.send(peer, Echo(seq=seq, reply_to=self.name, payload=b"x" * 64))
            reply = await asyncio.wait_for(self.replies.get(), timeout=30)
            assert reply.seq == seq, f"echo reply out of order: {reply.seq} != {seq}"
            rtts.append(time.perf_counter() - started)
        mean_ms = 1000 * sum(rtts) / len(rtts)
        self.log.info("echo.done", num_rounds=len(rtts), mean_rtt_ms=round(mean_ms, 3))
        await self.notify("echo.done", num_rounds=len(rtts), num_peers=len(peers), mean_rtt_ms=round(mean_ms, 3))
