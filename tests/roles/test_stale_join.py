"""A forged or stale WeightsJoin in the trainer's inbox (a token in generator-0's name that no
live process holds) used to stall the run for good: the trainer kept forming the actor group
with that token and waiting. The generator now answers a formation that is not for it by
joining again, so the trainer's next attempt succeeds and the run completes."""

from __future__ import annotations

import pytest
import zmq

from respec_async.endpoints import Endpoints
from tests.roles.conftest import rl_config
from tests.roles.test_rl_loop import assert_each_group_trained_once, finished
from transport.codec import Codec
from transport.schema import WeightsJoin

pytestmark = pytest.mark.slow


def test_a_forged_weights_join_does_not_stall_the_run(launch, random_actor_dir):
    # Steps take ~50 ms here: 40 of them keep the trainer training well after the forged join lands
    # (with 6, a fast machine finished before the join arrived and the failed formation was cut off).
    run = launch(rl_config(random_actor_dir, steps=40), "trainer.weight_sync_timeout_s=6.0")
    run.wait_event(lambda e: e.get("event") == "train.step" and e.get("step") == 1, timeout=180)
    inbox = Endpoints.load(run.run_dir / "endpoints.json").inboxes["trainer-0"]
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(inbox)
    try:
        push.send_multipart(Codec().encode(WeightsJoin(role="generator-0", group="actor", token=12345)))
    finally:
        push.close()
        ctx.term()
    records = finished(run, timeout=240)
    assert records[-1].version == 40
    assert_each_group_trained_once(records, 40)
    stale = [e for e in run.events("generator-0") if e.get("event") == "weights.stale_formation"]
    assert stale, "the forged join never reached a formation: the test did not exercise the fault"
    done = [e for e in run.events() if e.get("event") == "trainer.finished"]
    assert stale[0]["timestamp"] < done[0]["timestamp"], "the forged join landed after training ended"
    assert len(run.role_pids()["generator-0"]) == 1  # recovered without restarting anyone
    # The failed formation's retry is a warning on the supervisor's console (above the live view).
    retried = [e for e in run.events() if e.get("event") == "weights.sync_failed"]
    assert retried and retried[0]["level"] == "warning" and retried[0]["role"] == "trainer-0", retried
