"""Native ZeroMQ reward servers: `respec reward-serve` started as a real subprocess and scored
through `reward.source = "zmq://..."` (ipc, and tcp with CURVE or explicit insecure); a server
killed mid-run and restarted; a function that hangs server-side; and a fake server in the test
that answers garbage or the wrong number of rewards."""

from __future__ import annotations

import asyncio
import threading

import pytest
import zmq

from respec_async.endpoints import free_tcp_port
from respec_async.rewards import make_scorer
from tests.rewards.conftest import expected_rewards, make_requests, run, section, short_ipc
from transport.codec import Codec
from transport.schema import RewardRequest, RewardResponse

pytestmark = pytest.mark.process


def score_groups(cfg, num_groups, group_size, during=None):
    async def go():
        scorer = make_scorer(cfg)
        try:
            work = asyncio.gather(*(scorer.score(make_requests(group_size, g)) for g in range(num_groups)))
            if during is not None:
                await during()
            return await work, scorer.stats
        finally:
            await scorer.close()
    return run(go())


def rewards(groups):
    return [[r.reward for r in g] for g in groups]


def test_reward_serve_over_ipc_scores_many_requests_in_flight_and_keeps_extra_keys(reward_file, reward_serve, tmp_path):
    endpoint = short_ipc(tmp_path, "serve")
    server = reward_serve(f"{reward_file}:compute_score", endpoint, "--workers", "2")
    groups, stats = score_groups(section(f"zmq://{endpoint}", max_concurrency=16), 32, 4)
    assert rewards(groups) == [expected_rewards(4)] * 32
    assert groups[0][0].extra == {"length": 2} and groups[0][0].correct is True
    assert stats.num_calls == 32 and stats.num_retries == 0
    assert server.stop() == 0  # SIGTERM: a clean exit


def test_reward_serve_on_tcp_needs_curve_keys_or_explicit_insecure(reward_file, reward_serve, tmp_path):
    keys = tmp_path / "reward_keys.json"
    port = free_tcp_port("127.0.0.1")
    reward_serve(f"{reward_file}:batched_score", f"tcp://127.0.0.1:{port}", "--batched", "--keys", str(keys))
    assert keys.exists() and (keys.stat().st_mode & 0o777) == 0o600
    groups, stats = score_groups(section(f"zmq://127.0.0.1:{port}", zmq_keys=str(keys)), 4, 3)
    assert rewards(groups) == [expected_rewards(3)] * 4 and stats.num_retries == 0
    with pytest.raises(ValueError, match="zmq_keys"):
        make_scorer(section(f"zmq://127.0.0.1:{port}"))
    # A client without the server's keys never gets through the CURVE handshake.
    groups, stats = score_groups(section(f"zmq://127.0.0.1:{port}", zmq_insecure=True, timeout_s=0.3,
                                         max_retries=1), 1, 2)
    assert all(r.error for r in groups[0]) and stats.num_failed_calls == 1


def test_reward_serve_killed_mid_run_and_restarted_loses_no_rollout(reward_file, reward_serve, tmp_path):
    endpoint = short_ipc(tmp_path, "restart")
    server = reward_serve(f"{reward_file}:async_score", endpoint)
    restarted = threading.Event()

    async def outage():
        await asyncio.sleep(0.2)
        server.kill()
        # Restart from a thread: the loop keeps scoring (and failing, and retrying) meanwhile.
        await asyncio.to_thread(lambda: (server.start(), restarted.set()))

    cfg = section(f"zmq://{endpoint}", max_retries=30, timeout_s=0.5, max_concurrency=4, retry_backoff_s=0.1,
                  retry_backoff_max_s=1.0)
    groups, stats = score_groups(cfg, 200, 2, during=outage)
    assert restarted.is_set()
    assert rewards(groups) == [expected_rewards(2)] * 200
    assert stats.num_failed_calls == 0 and stats.num_retries >= 1
    assert set(stats.errors_by_kind) <= {"connection", "timeout"}
    assert stats.num_retries == sum(stats.errors_by_kind.values())


def test_a_call_that_hangs_in_the_server_is_a_server_error_retried_by_the_client(reward_file, reward_serve, tmp_path):
    endpoint = short_ipc(tmp_path, "hang")
    reward_serve(f"{reward_file}:hangs_on_hang", endpoint, "--timeout-s", "0.2")
    requests = make_requests(2)
    requests[0] = type(requests[0])(**{**requests[0].__dict__, "completion_text": "hang"})

    async def go():
        scorer = make_scorer(section(f"zmq://{endpoint}", max_retries=1))
        try:
            return await scorer.score(requests), await scorer.score(make_requests(2, 1)), scorer.stats
        finally:
            await scorer.close()

    hung, fine, stats = run(go())
    assert all("server_error" in r.error and "timeout" in r.error for r in hung)
    assert [r.reward for r in fine] == [1.0, 0.0]
    assert stats.errors_by_kind == {"server_error": 2} and stats.num_failed_calls == 1


class FakeServer:
    """A ROUTER in a thread that answers each request with what `answer(request)` returns:
    frames (garbage) or a RewardResponse."""

    def __init__(self, endpoint, answer):
        self.endpoint, self.answer = endpoint, answer
        self.num_requests = 0
        self.stopping = threading.Event()
        self.bound = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        self.bound.wait(5)

    def _serve(self):
        # The socket lives and dies in this thread: zmq sockets are not thread-safe.
        ctx = zmq.Context()
        socket = ctx.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.bind(self.endpoint)
        self.bound.set()
        codec = Codec()
        while not self.stopping.is_set():
            if not socket.poll(50):
                continue
            identity, *frames = socket.recv_multipart()
            request = codec.decode(frames)
            assert isinstance(request, RewardRequest)
            self.num_requests += 1
            reply = self.answer(self.num_requests, request)
            socket.send_multipart([identity, *(reply if isinstance(reply, list) else codec.encode(reply))])
        socket.close()
        ctx.term()

    def close(self):
        self.stopping.set()
        self.thread.join(5)


@pytest.mark.parametrize("fault", ["garbage", "wrong_length", "nan"])
def test_garbage_wrong_lengths_and_nan_from_a_server_are_its_errors(tmp_path, fault):
    def answer(n, request):
        k = len(request.samples)
        if n > 2:  # two faults, then good answers
            return RewardResponse(call_id=request.call_id, rewards=expected_rewards(k))
        if fault == "garbage":
            return [b"\x00garbage", b"more"]
        if fault == "wrong_length":
            return RewardResponse(call_id=request.call_id, rewards=[1.0] * (k + 1))
        return RewardResponse(call_id=request.call_id, rewards=[float("nan")] * k)

    endpoint = short_ipc(tmp_path, f"fake-{fault}")
    server = FakeServer(endpoint, answer)
    try:
        groups, stats = score_groups(section(f"zmq://{endpoint}", timeout_s=0.3, max_concurrency=1), 1, 3)
    finally:
        server.close()
    assert rewards(groups) == [expected_rewards(3)] and server.num_requests == 3
    kind = "timeout" if fault == "garbage" else "bad_response"  # garbage is dropped; the call times out
    assert stats.errors_by_kind == {kind: 2} and stats.num_retries == 2 and stats.num_failed_calls == 0
