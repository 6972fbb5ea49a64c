"""`reward.source = "zmq://host:port"`: clients of native reward servers (`respec reward-serve`,
respec_async.rewards.server) speaking RewardRequest/RewardResponse from transport.schema."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from respec_async.config import RewardSection
from respec_async.rewards.caller import (Caller, RewardSourceError, ScoreRequest, ScoreResult, expect_list, failed,
                                         log, number)
from transport.channels import Channel, Kind
from transport.schema import RewardRequest, RewardResponse, RewardSample
from transport.security import Security

# zmq: how many 10 ms waits a send gets for a connection to form before it counts as failed.
_CONNECT_GRACE_TRIES = 25


def zmq_endpoint(url: str) -> str:
    """`zmq://host:port` -> `tcp://host:port`; `zmq://ipc:///p` and `zmq://tcp://h:p` as given."""
    rest = url.removeprefix("zmq://")
    return rest if "://" in rest else f"tcp://{rest}"


def zmq_security(cfg: RewardSection) -> Security | None:
    if cfg.zmq_insecure:
        return Security(insecure=True)
    if cfg.zmq_keys:
        return Security.load(Path(cfg.zmq_keys))
    return None  # fine for ipc; open_channel refuses tcp without it


class ZmqScorer:
    """Clients of `respec reward-serve`: one DEALER per server, a call id per request matched
    to a future by a receive task, so many requests are in flight on one socket."""

    def __init__(self, cfg: RewardSection, urls: list[str]) -> None:
        self.endpoints = [zmq_endpoint(u) for u in urls]
        self.security = zmq_security(cfg)
        if self.security is None and any(e.startswith("tcp://") for e in self.endpoints):
            raise ValueError("reward.source = zmq:// over tcp: set reward.zmq_keys (CURVE keys shared with "
                             "`respec reward-serve --keys`) or reward.zmq_insecure = true")
        self.zmq = zmq.asyncio.Context()
        self.channels: dict[str, Channel] = {}
        self.receivers: list[asyncio.Task[None]] = []
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.call_ids = itertools.count(1)
        self.caller = Caller(cfg, self.endpoints, cfg.max_concurrency)
        self.stats = self.caller.stats

    def _channel(self, endpoint: str) -> Channel:
        channel = self.channels.get(endpoint)
        if channel is None:
            # Not open_channel: IMMEDIATE must be set before connecting. With it, messages queue
            # only on a live connection, so a send to a dead server fails at once (and is retried)
            # instead of waiting out the timeout.
            socket = self.zmq.socket(zmq.DEALER)
            socket.setsockopt(zmq.IMMEDIATE, 1)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.SNDHWM, 1000)
            socket.setsockopt(zmq.RCVHWM, 1000)
            if endpoint.startswith("tcp://"):
                self.security.apply(socket, server=False)
            socket.connect(endpoint)
            channel = Channel(socket, Kind.DEALER, endpoint, name=f"reward->{endpoint}")
            self.channels[endpoint] = channel
            self.receivers.append(asyncio.create_task(self._receive(channel)))
        return channel

    async def _receive(self, channel: Channel) -> None:
        while True:
            envelope = await channel.recv()
            message = envelope.message
            future = self.pending.pop(message.call_id, None) if isinstance(message, RewardResponse) else None
            if future is None:
                log.warning("reward.unexpected_reply", server=channel.endpoint, type=type(message).__name__)
            elif not future.done():
                future.set_result(message)

    async def _request(self, endpoint: str, requests: list[ScoreRequest]) -> list[ScoreResult]:
        channel = self._channel(endpoint)
        call_id = next(self.call_ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[call_id] = future
        samples = [RewardSample(rollout_id=r.rollout_id, prompt=r.prompt_text, response=r.completion_text,
                                label=r.answer, data_source=r.data_source) for r in requests]
        try:
            frames = channel.codec.encode(RewardRequest(call_id=call_id, samples=samples))
            # A connection may be (re)forming (a new socket, a restarted server): give it a moment.
            for _ in range(_CONNECT_GRACE_TRIES):
                try:
                    await channel.socket.send_multipart(frames, flags=zmq.NOBLOCK)
                    break
                except zmq.Again:
                    await asyncio.sleep(0.01)
            else:
                raise RewardSourceError("connection", "no reward server connected")
            channel.stats.num_sent += 1
            response = await future
        finally:
            self.pending.pop(call_id, None)
        if response.error:
            raise RewardSourceError("server_error", response.error[:300])
        n = len(requests)
        rewards = expect_list(response.rewards, n, "rewards")
        correct = response.correct if len(response.correct) == n else [None] * n
        extras = response.extra if len(response.extra) == n else [{}] * n
        results = []
        for i, (reward, ok, extra) in enumerate(zip(rewards, correct, extras)):
            value = number(reward, f"rewards[{i}]")
            results.append(ScoreResult(reward=value, correct=value >= 1.0 if ok is None else ok,
                                       extra=dict(extra), source=endpoint))
        return results

    async def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        if not requests:
            return []

        async def attempt(endpoint: str) -> list[ScoreResult]:
            return await self._request(endpoint, requests)

        results, endpoint, error = await self.caller.call(attempt, [r.rollout_id for r in requests])
        return results if results is not None else failed(len(requests), endpoint, error)

    async def close(self) -> None:
        for task in self.receivers:
            task.cancel()
        await asyncio.gather(*self.receivers, return_exceptions=True)
        for channel in self.channels.values():
            channel.close()
        self.zmq.destroy(linger=0)
