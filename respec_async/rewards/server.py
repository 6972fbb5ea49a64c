"""Native ZeroMQ reward server: turns a user reward function into a server for `zmq://` sources.

    respec reward-serve pkg.module:compute_score --bind tcp://127.0.0.1:5555 --keys reward_keys.json
    respec reward-serve /path/to/reward.py:compute_score --bind ipc:///tmp/reward.sock --batched

The function has the signature of `reward.source = "python:..."` (see respec_async.rewards), per
rollout or, with `--batched`, per request. A ROUTER socket receives `RewardRequest`s; each is
scored in a task of its own (many in flight: sync functions in a pool of `--workers` threads,
with `--timeout-s` per call), and answered with a `RewardResponse` carrying the same call id:
one reward per sample, or `error` for the whole request, which the client retries. tcp
endpoints are CURVE-encrypted and admit only the key pair's client (`--keys FILE`, created when
missing, in transport.security's format; give the same file to the run as `reward.zmq_keys`),
unless `--insecure`. On SIGINT/SIGTERM the server stops. The line `reward-serve ready on
ENDPOINT` on stdout says it is accepting requests.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import structlog
import zmq
import zmq.asyncio

from respec_async.config import RewardSection
from respec_async.rewards.caller import ScoreRequest
from respec_async.rewards.function import PythonScorer
from transport.channels import Channel, Kind, open_channel
from transport.schema import RewardRequest, RewardResponse
from transport.security import Security, start_authenticator

log = structlog.get_logger("reward_server")


class RewardServer:
    def __init__(self, scorer: PythonScorer, bind: str, security: Security | None) -> None:
        self.scorer = scorer
        self.bind = bind
        self.security = security
        self.zmq = zmq.asyncio.Context()
        self.channel: Channel | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.num_requests = 0
        self.num_errors = 0

    async def serve(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        if self.bind.startswith("tcp://") and self.security is not None:
            start_authenticator(self.zmq, self.security)
        self.channel = open_channel(self.zmq, Kind.ROUTER, self.bind, bind=True, security=self.security,
                                    hwm=10_000, name=f"reward-serve:{self.bind}")
        log.info("reward_server.ready", bind=self.bind, function=self.scorer.name, batched=self.scorer.batched)
        if ready is not None:
            ready.set()
        receive = asyncio.create_task(self._receive())
        try:
            await stop.wait()
        finally:
            receive.cancel()
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(receive, *self.tasks, return_exceptions=True)
            await self.scorer.close()
            self.channel.close()
            self.zmq.destroy(linger=0)
            log.info("reward_server.stopped", num_requests=self.num_requests, num_errors=self.num_errors)

    async def _receive(self) -> None:
        assert self.channel is not None
        while True:
            envelope = await self.channel.recv()
            if not isinstance(envelope.message, RewardRequest) or envelope.identity is None:
                log.warning("reward_server.unexpected", type=type(envelope.message).__name__)
                continue
            task = asyncio.create_task(self._answer(envelope.message, envelope.identity))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _answer(self, request: RewardRequest, identity: bytes) -> None:
        assert self.channel is not None
        self.num_requests += 1
        requests = [ScoreRequest(rollout_id=s.rollout_id, prompt_text=s.prompt, completion_text=s.response,
                                 answer=s.label, data_source=s.data_source) for s in request.samples]
        try:
            results = await self.scorer.score(requests)
            errors = [r.error for r in results if r.error]
        except Exception as exc:  # a bug here must still answer, not leave the client to time out
            results, errors = [], [f"reward server: {exc!r}"[:500]]
        if errors:
            self.num_errors += 1
            response = RewardResponse(call_id=request.call_id, error=errors[0])
        else:
            response = RewardResponse(
                call_id=request.call_id, rewards=[r.reward for r in results], correct=[r.correct for r in results],
                extra=[{k: v for k, v in r.extra.items() if isinstance(v, (int, float, str, bool))} for r in results],
            )
        try:
            await self.channel.send(response, identity=identity)
        except zmq.ZMQError as exc:  # the client went away; it will retry elsewhere
            log.warning("reward_server.reply_failed", call_id=request.call_id, error=repr(exc))


def server_security(bind: str, keys: Path | None, insecure: bool) -> Security | None:
    """The CURVE rule for tcp endpoints: a keys file (created when missing) or explicit insecure."""
    if not bind.startswith("tcp://"):
        return None
    if insecure:
        return Security(insecure=True)
    if keys is None:
        raise ValueError(f"{bind}: tcp needs --keys FILE (CURVE, created when missing) or --insecure")
    if not keys.exists():
        Security.generate().save(keys)
        log.info("reward_server.keys_generated", path=str(keys))
    return Security.load(keys)


def serve(function: str, bind: str, *, batched: bool = False, workers: int = 4, timeout_s: float = 30.0,
          max_concurrency: int = 64, keys: Path | None = None, insecure: bool = False) -> int:
    """Run the server until SIGINT/SIGTERM (what `respec reward-serve` calls)."""
    import uvloop

    from respec_async.logs import configure_logging

    configure_logging(None, role="reward-serve")
    security = server_security(bind, keys, insecure)
    # The server does not retry a failing call: the client does, maybe on another server.
    cfg = RewardSection(source=f"python:{function}", batched=batched, num_workers=workers, timeout_s=timeout_s,
                        max_retries=0, max_concurrency=max_concurrency)
    scorer = PythonScorer(cfg, function)
    server = RewardServer(scorer, bind, security)

    async def run() -> None:
        stop, ready = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        serving = asyncio.create_task(server.serve(stop, ready))
        await asyncio.wait({serving, asyncio.create_task(ready.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if ready.is_set():
            print(f"reward-serve ready on {bind}", flush=True)
        await serving  # raises what stopped it before it was ready (e.g. the address is in use)

    uvloop.run(run())
    return 0


def main(args: Any) -> int:
    try:
        return serve(args.function, args.bind, batched=args.batched, workers=args.workers, timeout_s=args.timeout_s,
                     max_concurrency=args.max_concurrency, keys=args.keys, insecure=args.insecure)
    except ValueError as exc:
        print(f"reward-serve: {exc}", file=sys.stderr)
        return 2
    except zmq.ZMQError as exc:
        print(f"reward-serve: {args.bind}: {exc}", file=sys.stderr)
        return 1
