"""History drafting in a real launch (supervisor, generator, reward, trainer processes): a
generator with no drafter model drafts from its own rollouts, and a SIGKILLed generator
restarts with an empty history index and completes its groups."""

from __future__ import annotations

import os
import signal

from tests.roles.conftest import rl_config
from tests.roles.test_rl_loop import assert_each_group_trained_once, finished

HISTORY_SD = ["generator.sd=static", "generator.sd_source=history", "generator.sd_num_steps=4",
              "generator.sd_num_draft_tokens=4", "data.group_size=4"]


def test_a_history_only_generator_drafts_from_its_rollouts_and_restarts_with_an_empty_index(launch,
                                                                                            random_actor_dir):
    # The random actor has no drafter: resolving or loading one would fail the run.
    run = launch(rl_config(random_actor_dir, steps=8), *HISTORY_SD, "sampling.temperature=0.5")
    run.wait_event(lambda e: e.get("event") == "train.step" and e.get("step") == 2, timeout=180)
    os.kill(run.role_pids()["generator-0"][0], signal.SIGKILL)
    records = finished(run)
    assert len(run.role_pids()["generator-0"]) == 2  # restarted once
    assert_each_group_trained_once(records, 8)
    assert records[-1].version == 8
    for r in records:
        history = r.sd_sources["history"]
        assert set(r.sd_sources) == {"history"} and history["step_share"] == 1.0, r.sd_sources
        assert history["drafted"] > 0 and history["acceptance_length"] >= 1.0
    # Siblings and earlier rollouts of the same prompt were drafted from, and drafts accepted.
    assert sum(r.sd_sources["history"]["accepted"] for r in records) > 0
