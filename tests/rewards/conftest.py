"""Real reward sources on loopback for the scorer tests: a file of reward functions, an aiohttp
reward server (OpenRLHF batch schema and per-sample) that injects faults on demand, and
`respec reward-serve` as a real subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web

from respec_async.config import RewardSection
from respec_async.endpoints import free_tcp_port
from respec_async.rewards import ScoreRequest

REWARD_FUNCTIONS = '''
import asyncio, math, time

calls = {"flaky": 0}

def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": float(solution_str.strip() == ground_truth), "length": len(solution_str)}

def plain_float(data_source, solution_str, ground_truth, extra_info=None):
    return 1.0 if solution_str.strip() == ground_truth else 0.0

def batched_score(data_sources, solution_strs, ground_truths, extra_infos):
    assert isinstance(solution_strs, list) and all("rollout_id" in e for e in extra_infos)
    return [float(s.strip() == g) for s, g in zip(solution_strs, ground_truths)]

async def async_score(data_source, solution_str, ground_truth, extra_info=None):
    await asyncio.sleep(0.01)
    return float(solution_str.strip() == ground_truth)

def hangs_on_hang(data_source, solution_str, ground_truth, extra_info=None):
    if solution_str == "hang":
        time.sleep(3.0)
    return float(solution_str.strip() == ground_truth)

def fails_twice(data_source, solution_str, ground_truth, extra_info=None):
    calls["flaky"] += 1
    if calls["flaky"] <= 2:
        raise RuntimeError("flaky reward backend")
    return 1.0

def fails_on_boom(data_source, solution_str, ground_truth, extra_info=None):
    if solution_str == "boom":
        raise RuntimeError("reward backend exploded")
    return float(solution_str.strip() == ground_truth)

def returns_nan(data_source, solution_str, ground_truth, extra_info=None):
    return math.nan

def returns_string(data_source, solution_str, ground_truth, extra_info=None):
    return "1.0"

def batched_wrong_length(data_sources, solution_strs, ground_truths, extra_infos):
    return [1.0] * (len(solution_strs) + 1)
'''


@pytest.fixture
def reward_file(tmp_path) -> Path:
    path = tmp_path / "my_reward.py"
    path.write_text(REWARD_FUNCTIONS)
    return path


def make_requests(n: int, group_id: int = 0, answer: str = "42") -> list[ScoreRequest]:
    """Even samples answer right (reward 1), odd ones wrong (reward 0)."""
    return [ScoreRequest(rollout_id=f"{group_id}:0:{i}", prompt_text=f"q{group_id}=",
                         completion_text=answer if i % 2 == 0 else "7", answer=answer, data_source="test")
            for i in range(n)]


def expected_rewards(n: int) -> list[float]:
    return [1.0 if i % 2 == 0 else 0.0 for i in range(n)]


def section(source: str, **fields) -> RewardSection:
    """Tests retry fast: short timeouts and backoff."""
    defaults = dict(timeout_s=1.0, max_retries=3, retry_backoff_s=0.01, retry_backoff_max_s=0.05)
    return RewardSection(source=source, **{**defaults, **fields})


class HttpRewardServer:
    """An aiohttp reward server on 127.0.0.1: POST /batch speaks OpenRLHF's schema
    ({"query", "prompts", "labels"} -> {"rewards", "scores", "extra_logs"}), POST /sample the
    per-sample one ({"prompt", "response", "label"} -> {"reward"}). Each request first takes the
    next fault from `faults`, if any: timeout, 500, garbage, wrong_length, nan, string."""

    def __init__(self, token: str = "") -> None:
        self.faults: list[str] = []
        self.choose_fault = None  # optional: body -> fault name or None, instead of `faults`
        self.prompts_seen: list[str] = []
        self.token = token
        self.num_requests = 0
        self.num_in_flight = 0
        self.max_in_flight = 0
        self.delay_s = 0.0
        self.port = free_tcp_port("127.0.0.1")  # fixed, so a restarted server is at the same URL
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/batch", self._batch)
        app.router.add_post("/sample", self._sample)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _fault(self, request: web.Request, body: dict, n: int) -> web.Response | None:
        self.num_requests += 1
        self.prompts_seen.extend(body.get("prompts", [body.get("prompt")]))
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.Response(status=401, text="unauthorized")
        if self.choose_fault is not None:
            fault = self.choose_fault(body)
        else:
            fault = self.faults.pop(0) if self.faults else None
        if fault == "timeout":
            await asyncio.sleep(5.0)
        if fault == "500":
            return web.Response(status=500, text="internal error")
        if fault == "garbage":
            return web.Response(text="<html>not json")
        if fault == "wrong_length":
            return web.json_response({"rewards": [1.0] * (n + 1)})
        if fault == "nan":
            return web.Response(text='{"rewards": [' + ", ".join(["NaN"] * n) + "]}",
                                content_type="application/json")
        if fault == "string":
            return web.json_response({"rewards": ["1.0"] * n})
        return None

    async def _answer(self, request: web.Request, handler) -> web.Response:
        self.num_in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.num_in_flight)
        try:
            body = await request.json()
            n = len(body["query"]) if "query" in body else 1
            fault = await self._fault(request, body, n)
            if fault is not None:
                return fault
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            return web.json_response(handler(body))
        finally:
            self.num_in_flight -= 1

    async def _batch(self, request: web.Request) -> web.Response:
        def score(body):
            responses = [q[len(p):] for q, p in zip(body["query"], body["prompts"])]
            rewards = [float(r.strip() == label) for r, label in zip(responses, body["labels"])]
            return {"rewards": rewards, "scores": rewards, "extra_logs": {"length": [len(r) for r in responses]}}
        return await self._answer(request, score)

    async def _sample(self, request: web.Request) -> web.Response:
        return await self._answer(request, lambda b: {"reward": float(b["response"].strip() == b["label"])})


class ServerThread:
    """Runs an HttpRewardServer on an event loop of its own, in a thread, for tests whose own
    thread is busy waiting on a launched run."""

    def __init__(self, server: HttpRewardServer) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro_fn) -> None:
        asyncio.run_coroutine_threadsafe(coro_fn(), self.loop).result(30)

    def start(self) -> None:
        self.call(self.server.start)

    def stop(self) -> None:
        self.call(self.server.stop)

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class RewardServeProcess:
    """`respec reward-serve` as a real subprocess; start() waits for its ready line."""

    def __init__(self, function: str, bind: str, *args: str) -> None:
        self.function, self.bind, self.args = function, bind, args
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 90.0) -> None:
        cmd = [sys.executable, "-m", "respec_async.cli", "reward-serve", self.function, "--bind", self.bind,
               *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("reward-serve ready"):
                return
            if not line and self.proc.poll() is not None:
                raise AssertionError(f"reward-serve exited {self.proc.returncode}: {self.proc.stderr.read()}")
        raise AssertionError("reward-serve not ready in time")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@pytest.fixture
def reward_serve():
    started: list[RewardServeProcess] = []

    def start(function: str, bind: str, *args: str) -> RewardServeProcess:
        server = RewardServeProcess(function, bind, *args)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.kill()


def short_ipc(tmp_path: Path, name: str) -> str:
    """An ipc endpoint with a path short enough for a unix socket."""
    path = Path(f"/tmp/rw-{os.getpid()}-{abs(hash(str(tmp_path))) % 10**8}-{name}")
    return f"ipc://{path}"


def run(coro):
    return asyncio.run(coro)

