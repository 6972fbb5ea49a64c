"""Reward sources behind one interface: `await scorer.score(requests) -> results`.

`make_scorer(config)` picks the source from `reward.source`:

- `builtin`: the rule reward of each sample's task (zoo arithmetic, or math final-answer match).
- `python:pkg.module:fn` or `python:/path/to/file.py:fn`: a user function with verl's signature,
  `fn(data_source, solution_str, ground_truth, extra_info=None) -> float | dict` (a dict's
  `score` is the reward; its other keys are logged). With `reward.batched = true` it takes
  lists, `fn(data_sources, solution_strs, ground_truths, extra_infos) -> list`, once per group.
  Sync functions run in a thread pool (`reward.num_workers`), async ones on the event loop.
- `http://host:port/path`: a reward server. `reward.http_format = "batch"` speaks OpenRLHF's
  remote-reward schema: POST `{"query": [prompt + response], "prompts": [...], "labels": [...]}`
  -> `{"rewards": [...]}` (optional `scores`, `extra_logs`), one request per group; `"sample"`
  posts `{"prompt", "response", "label"}` per rollout -> a number or `{"reward": ...}`.
- `zmq://host:port` (or `zmq://ipc:///path`): a native server, `respec reward-serve`
  (respec_async.reward_server), speaking RewardRequest/RewardResponse from transport.schema.

Several http or zmq URLs, comma-separated, shard the load round robin. Every call to a source
has the same rules: at most `max_concurrency` in flight, `timeout_s` per call, `max_retries`
retries with exponential backoff and jitter, each retry on the next URL. A wrong number of
rewards, NaN, a string, non-JSON: all are errors of that call, retried like a timeout. When the
retries are exhausted the call's rollouts come back with `ScoreResult.error` set (reward 0):
`score` never raises for a failing source; the reward role applies `reward.on_error`.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import itertools
import math
import os
import random
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgspec
import structlog
import zmq
import zmq.asyncio

from respec_async.config import Config, RewardSection, source_kind, source_urls
from transport.channels import Channel, Kind
from transport.schema import RewardRequest, RewardResponse, RewardSample
from transport.security import Security

T = TypeVar("T")
log = structlog.get_logger("reward")

# Threads beyond num_workers, for calls abandoned after a timeout that keep running (a thread
# cannot be killed); they keep the pool serving while a stuck call finishes, if ever.
_SPARE_THREADS = 32
# zmq: how many 10 ms waits a send gets for a connection to form before it counts as failed.
_CONNECT_GRACE_TRIES = 25


@dataclass(frozen=True)
class ScoreRequest:
    rollout_id: str  # "group_id:attempt:sample_index"
    prompt_text: str
    completion_text: str
    answer: str
    data_source: str


@dataclass
class ScoreResult:
    reward: float
    correct: bool
    extra: dict[str, Any] = field(default_factory=dict)
    error: str = ""  # set when scoring failed after every retry; the reward is then 0 and unearned
    source: str = ""  # the function or server that scored it (or failed to)


class Scorer(Protocol):
    stats: ScorerStats

    async def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]: ...

    async def close(self) -> None: ...


class RewardSourceError(Exception):
    """One failed call to a reward source; `kind` labels the metric (timeout, connection,
    http_500, bad_response, server_error, exception)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


class ScorerStats(msgspec.Struct):
    num_calls: int = 0  # calls to the source (a batch or one rollout), retries not counted
    num_attempts: int = 0  # tries, retries included
    num_retries: int = 0
    num_failed_calls: int = 0  # calls that failed after every retry
    num_failed_rollouts: int = 0  # rollouts returned with an error
    errors_by_kind: dict[str, int] = {}  # every failed try, by kind


def _backoff_s(cfg: RewardSection, retry: int) -> float:
    """Exponential backoff with jitter: uniform(0.5, 1) x min(base x 2^retry, cap)."""
    return min(cfg.retry_backoff_s * 2**retry, cfg.retry_backoff_max_s) * random.uniform(0.5, 1.0)


class Caller:
    """One call to a reward source under the shared rules: a concurrency slot, the per-try
    timeout, retries with backoff (each on the next target), and the counting and logging."""

    def __init__(self, cfg: RewardSection, targets: list[str], num_slots: int) -> None:
        self.cfg = cfg
        self.targets = targets
        self.slots = asyncio.Semaphore(num_slots)
        self.stats = ScorerStats()
        self._round_robin = itertools.count()

    async def call(self, attempt: Callable[[str], Awaitable[T]], rollout_ids: list[str]) -> tuple[T | None, str, str]:
        """Returns (value, target, "") on success, or (None, last target, error) once retries
        are exhausted."""
        first = next(self._round_robin)
        self.stats.num_calls += 1
        error = RewardSourceError("exception", "no attempt made")
        target = self.targets[first % len(self.targets)]
        for n in range(self.cfg.max_retries + 1):
            target = self.targets[(first + n) % len(self.targets)]
            if n:
                self.stats.num_retries += 1
                await asyncio.sleep(_backoff_s(self.cfg, n - 1))
            self.stats.num_attempts += 1
            try:
                async with self.slots:
                    return await asyncio.wait_for(attempt(target), self.cfg.timeout_s), target, ""
            except RewardSourceError as exc:
                error = exc
            except TimeoutError:
                error = RewardSourceError("timeout", f"no answer within {self.cfg.timeout_s}s")
            except Exception as exc:  # a user function's own exception, or a client library's
                error = RewardSourceError("exception", repr(exc)[:300])
            kinds = self.stats.errors_by_kind
            kinds[error.kind] = kinds.get(error.kind, 0) + 1
            log.warning("reward.try_failed", server=target, error=str(error)[:300], kind=error.kind, attempt=n,
                        rollout_ids=rollout_ids[:8], num_rollouts=len(rollout_ids))
        self.stats.num_failed_calls += 1
        self.stats.num_failed_rollouts += len(rollout_ids)
        return None, target, str(error)[:500]


# --- turning what a source returned into results --------------------------------------------


def _number(value: Any, what: str) -> float:
    # bool is an int; a string (even "1.0"), None, NaN or inf is a bad answer.
    if not isinstance(value, (int, float)):
        raise RewardSourceError("bad_response", f"{what} is {type(value).__name__} {str(value)[:80]!r}, not a number")
    reward = float(value)
    if not math.isfinite(reward):
        raise RewardSourceError("bad_response", f"{what} is {reward}")
    return reward


def to_result(value: Any, source: str, what: str = "reward", key: str = "score") -> ScoreResult:
    """A number, or a dict with `key` (verl's "score"; "reward" for per-sample HTTP; the other
    of the two if `key` is missing), into a result; a dict's other scalar keys become `extra`
    (logged), its `acc` (if any) says correct."""
    extra: dict[str, Any] = {}
    if isinstance(value, dict):
        if key not in value:
            key = "reward" if key == "score" else "score"
        if key not in value:
            raise RewardSourceError("bad_response", f"{what} is a dict without 'score' or 'reward': {sorted(value)[:8]}")
        extra = {k: v for k, v in value.items() if k != key and isinstance(v, (int, float, str, bool))}
        value = value[key]
    reward = _number(value, what)
    correct = bool(extra["acc"]) if "acc" in extra else reward >= 1.0
    return ScoreResult(reward=reward, correct=correct, extra=extra, source=source)


def _expect_list(value: Any, n: int, what: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise RewardSourceError("bad_response", f"{what} is {type(value).__name__}, not a list")
    if len(value) != n:
        raise RewardSourceError("bad_response", f"{what} has {len(value)} values for {n} rollouts")
    return list(value)


def _failed(n: int, source: str, error: str) -> list[ScoreResult]:
    return [ScoreResult(reward=0.0, correct=False, error=error, source=source) for _ in range(n)]


# --- builtin ------------------------------------------------------------------------------


class BuiltinScorer:
    """The task's own rule reward; cheap, so it runs inline on the event loop."""

    def __init__(self) -> None:
        self.stats = ScorerStats()

    async def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        from respec_async.prompts import rule_reward  # imported here: it pulls in the tokenizer

        results = []
        self.stats.num_calls += 1
        for r in requests:
            try:
                reward = rule_reward(r.data_source, r.completion_text, r.answer)
            except ValueError as exc:  # a data source without a rule: retrying cannot help
                self.stats.num_failed_rollouts += 1
                results.append(ScoreResult(reward=0.0, correct=False, error=str(exc), source="builtin"))
                continue
            results.append(ScoreResult(reward=reward, correct=reward >= 1.0, source="builtin"))
        return results

    async def close(self) -> None:
        pass


# --- python functions ---------------------------------------------------------------------


def load_function(spec: str) -> Callable[..., Any]:
    """`pkg.module:fn` or `/path/to/file.py:fn` -> the function."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(f"reward function {spec!r}: expected pkg.module:function or /path/file.py:function")
    if target.endswith(".py") or "/" in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"reward function {spec!r}: no such file {path}")
        module_name = f"respec_user_reward_{abs(hash(str(path)))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ValueError(f"reward function {spec!r}: cannot import {target}: {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {target} has no function {name!r}")
    return fn


class PythonScorer:
    """A user function, per rollout or batched per group; sync functions in a thread pool of
    `num_workers` (a call abandoned after its timeout frees its slot; its thread finishes
    aside), async ones on the loop with `max_concurrency` calls in flight."""

    def __init__(self, cfg: RewardSection, spec: str, fn: Callable[..., Any] | None = None) -> None:
        self.fn = fn if fn is not None else load_function(spec)
        self.name = f"python:{spec}"
        self.batched = cfg.batched
        self.is_async = inspect.iscoroutinefunction(self.fn)
        self.executor = None if self.is_async else ThreadPoolExecutor(
            cfg.num_workers + _SPARE_THREADS, thread_name_prefix="reward-fn")
        self.caller = Caller(cfg, [self.name], cfg.max_concurrency if self.is_async else cfg.num_workers)
        self.stats = self.caller.stats

    async def _invoke(self, *args: Any) -> Any:
        if self.is_async:
            return await self.fn(*args)
        assert self.executor is not None
        return await asyncio.wrap_future(self.executor.submit(self.fn, *args))

    @staticmethod
    def _extra_info(r: ScoreRequest) -> dict[str, Any]:
        return {"rollout_id": r.rollout_id, "prompt": r.prompt_text}

    async def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        if not requests:
            return []
        if self.batched:
            return await self._score_batch(requests)
        return list(await asyncio.gather(*(self._score_one(r) for r in requests)))

    async def _score_one(self, r: ScoreRequest) -> ScoreResult:
        async def attempt(_: str) -> ScoreResult:
            value = await self._invoke(r.data_source, r.completion_text, r.answer, self._extra_info(r))
            return to_result(value, self.name)

        result, _, error = await self.caller.call(attempt, [r.rollout_id])
        return result if result is not None else _failed(1, self.name, error)[0]

    async def _score_batch(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        async def attempt(_: str) -> list[ScoreResult]:
            values = await self._invoke([r.data_source for r in requests], [r.completion_text for r in requests],
                                        [r.answer for r in requests], [self._extra_info(r) for r in requests])
            values = _expect_list(values, len(requests), "the function's result")
            return [to_result(v, self.name, f"result[{i}]") for i, v in enumerate(values)]

        results, _, error = await self.caller.call(attempt, [r.rollout_id for r in requests])
        return results if results is not None else _failed(len(requests), self.name, error)

    async def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)


# --- HTTP reward servers ------------------------------------------------------------------


class HttpScorer:
    """OpenRLHF-style remote reward servers over HTTP (aiohttp), batched per group or per sample."""

    def __init__(self, cfg: RewardSection, urls: list[str]) -> None:
        try:
            import aiohttp
        except ImportError:
            raise ValueError("reward.source = http://...: needs aiohttp (pip install aiohttp)") from None
        self.aiohttp = aiohttp
        self.format = cfg.http_format
        self.headers = {"Content-Type": "application/json"}
        if cfg.token_env:
            token = os.environ.get(cfg.token_env)
            if not token:
                raise ValueError(f"reward.token_env: environment variable {cfg.token_env!r} is not set")
            self.headers["Authorization"] = f"Bearer {token}"
        self.caller = Caller(cfg, urls, cfg.max_concurrency)
        self.stats = self.caller.stats
        self.session: Any = None

    async def _post(self, url: str, payload: dict[str, Any]) -> Any:
        if self.session is None:
            # The concurrency slots bound the requests; the connector must not queue them again.
            connector = self.aiohttp.TCPConnector(limit=0)
            self.session = self.aiohttp.ClientSession(connector=connector, headers=self.headers)
        try:
            async with self.session.post(url, data=msgspec.json.encode(payload)) as response:
                body = await response.read()
                status = response.status
        except self.aiohttp.ClientError as exc:
            raise RewardSourceError("connection", repr(exc)[:300]) from None
        if status != 200:
            raise RewardSourceError(f"http_{status}", body[:200].decode(errors="replace"))
        try:
            return msgspec.json.decode(body)
        except msgspec.DecodeError:
            raise RewardSourceError("bad_response", f"not JSON: {body[:80]!r}") from None

    async def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        if not requests:
            return []
        if self.format == "sample":
            return list(await asyncio.gather(*(self._score_one(r) for r in requests)))
        return await self._score_batch(requests)

    async def _score_batch(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        n = len(requests)
        payload = {
            "query": [r.prompt_text + r.completion_text for r in requests],
            "prompts": [r.prompt_text for r in requests],
            "labels": [r.answer for r in requests],
        }

        async def attempt(url: str) -> list[ScoreResult]:
            body = await self._post(url, payload)
            if not isinstance(body, dict) or "rewards" not in body:
                raise RewardSourceError("bad_response", f"no 'rewards' in {str(body)[:80]!r}")
            rewards = _expect_list(body["rewards"], n, "rewards")
            results = [to_result(v, url, f"rewards[{i}]") for i, v in enumerate(rewards)]
            if body.get("scores") is not None:
                for result, score in zip(results, _expect_list(body["scores"], n, "scores")):
                    result.extra["score"] = score
            logs = body.get("extra_logs") or {}
            if isinstance(logs, dict):
                for key, values in logs.items():
                    if isinstance(values, list) and len(values) == n:
                        for result, v in zip(results, values):
                            result.extra[key] = v
            return results

        results, url, error = await self.caller.call(attempt, [r.rollout_id for r in requests])
        return results if results is not None else _failed(n, url, error)

    async def _score_one(self, r: ScoreRequest) -> ScoreResult:
        payload = {"prompt": r.prompt_text, "response": r.completion_text, "label": r.answer}

        async def attempt(url: str) -> ScoreResult:
            return to_result(await self._post(url, payload), url, key="reward")

        result, url, error = await self.caller.call(attempt, [r.rollout_id])
        return result if result is not None else _failed(1, url, error)[0]

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


# --- native ZeroMQ reward servers ---------------------------------------------------------


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
        rewards = _expect_list(response.rewards, n, "rewards")
        correct = response.correct if len(response.correct) == n else [None] * n
        extras = response.extra if len(response.extra) == n else [{}] * n
        results = []
        for i, (reward, ok, extra) in enumerate(zip(rewards, correct, extras)):
            value = _number(reward, f"rewards[{i}]")
            results.append(ScoreResult(reward=value, correct=value >= 1.0 if ok is None else ok,
                                       extra=dict(extra), source=endpoint))
        return results

    async def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        if not requests:
            return []

        async def attempt(endpoint: str) -> list[ScoreResult]:
            return await self._request(endpoint, requests)

        results, endpoint, error = await self.caller.call(attempt, [r.rollout_id for r in requests])
        return results if results is not None else _failed(len(requests), endpoint, error)

    async def close(self) -> None:
        for task in self.receivers:
            task.cancel()
        await asyncio.gather(*self.receivers, return_exceptions=True)
        for channel in self.channels.values():
            channel.close()
        self.zmq.destroy(linger=0)


def make_scorer(config: Config | RewardSection) -> Scorer:
    cfg = config.reward if isinstance(config, Config) else config
    kind = source_kind(cfg.source)
    if kind == "builtin":
        return BuiltinScorer()
    if kind == "python":
        return PythonScorer(cfg, cfg.source.strip().removeprefix("python:"))
    if kind == "http":
        return HttpScorer(cfg, source_urls(cfg.source))
    return ZmqScorer(cfg, source_urls(cfg.source))
