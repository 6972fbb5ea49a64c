"""The RL loop with real processes (supervisor, generators, reward, trainer), real sockets and
real gloo weight broadcasts, on a random tiny actor. Every assertion reads what the roles
recorded (metrics.jsonl, role logs), not the config."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys

import pytest

from respec_async.ledger import audit_run
from respec_async.metrics import read_metrics
from tests.roles.conftest import rl_config


def finished(run, timeout=240):
    """Wait for a run to end well; every group it issued has a fate in the ledger's audit."""
    code = run.proc.wait(timeout=timeout)
    assert code == 0, run.output()
    ledger = audit_run(run.run_dir)
    assert ledger is not None and ledger.finished and ledger.balanced, ledger and ledger.summary()
    assert ledger.num_in_flight == 0 and ledger.num_lost == 0
    return read_metrics(run.run_dir / "metrics.jsonl")


def assert_each_group_trained_once(records, steps, groups_per_step=3):
    trained = [g for r in records for g in r.group_ids]
    assert sorted(trained) == list(range(steps * groups_per_step)), trained


@pytest.mark.parametrize("k", [0, 2])
def test_staleness_never_exceeds_k(launch, random_actor_dir, k):
    # k = 2 also feeds every tracker that is installed, in the trainer process: the same values
    # as metrics.jsonl.
    backends = [b for b in ("tensorboard", "mlflow", "wandb") if k == 2 and importlib.util.find_spec(b) is not None]
    extra = f"[tracking]\nbackends = {backends}\n".replace("'", '"') if backends else ""
    run = launch(rl_config(random_actor_dir, steps=6, k=k, extra=extra))
    records = finished(run)
    expected = [(r.step, pytest.approx(r.reward_mean)) for r in records]
    if "tensorboard" in backends:
        from tests.runtime.test_tracking import read_scalars

        scalars = read_scalars(run.run_dir / "tracking" / "tensorboard")
        assert scalars["reward/mean"] == expected
        assert scalars["time/train_s"] == [(r.step, pytest.approx(r.train_s)) for r in records]
    if "mlflow" in backends:
        from mlflow.tracking import MlflowClient

        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # reading MLflow's file store, as the trainer wrote it
        client = MlflowClient((run.run_dir / "tracking" / "mlflow").as_uri())
        (mlflow_run,) = client.search_runs([client.get_experiment_by_name("respec-async").experiment_id])
        assert [(m.step, m.value) for m in client.get_metric_history(mlflow_run.info.run_id, "reward/mean")] == expected
    if "wandb" in backends:
        from tests.runtime.test_tracking import wandb_history

        rows = wandb_history(run.run_dir / "tracking" / "wandb")
        assert [(row["_step"], row["reward/mean"]) for row in rows] == expected
    assert [r.step for r in records] == list(range(6))
    for r in records:
        # staleness = trained version - version the rollout started under, per rollout
        assert all(0 <= int(lag) <= k for lag in r.staleness), (r.step, r.staleness)
        assert sum(r.staleness.values()) == r.num_samples == 6
    assert_each_group_trained_once(records, 6)
    # Off a terminal the console keeps one compact line per step.
    assert sum("train.step" in line for line in run.output().splitlines()) == 6
    if k == 0:
        # `respec eval RUN_DIR` (the README's before/after command) reads this run's initial
        # actor and last checkpoint and prints both accuracies and the change.
        proc = subprocess.run([sys.executable, "-m", "respec_async.cli", "eval", str(run.run_dir), "--num-prompts", "6"],
                              capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0].startswith("held-out accuracy on 6 prompts"), proc.stdout
        for label in ("initial actor", "last checkpoint", "change"):
            assert any(line.strip().startswith(label) for line in lines), (label, proc.stdout)
        assert lines[-1].startswith("prompt groups: 18 issued, 18 trained, 0 dropped, 0 in flight, 0 lost"), lines
        assert lines[-1].endswith("; balanced"), lines
        sampled = [float(line.split()[2].rstrip("%")) for line in lines if line.strip().startswith(("initial", "last"))]
        assert all(0.0 <= value <= 100.0 for value in sampled) and len(sampled) == 2


def test_two_generators_hold_the_trainers_weights_and_share_the_work(launch, random_actor_dir):
    run = launch(rl_config(random_actor_dir, steps=4, generators=2))
    records = finished(run)
    published = {e["version"]: e["checksum"] for e in run.events("trainer-0") if e.get("event") == "weights.published"}
    assert set(published) == {0, 1, 2, 3, 4}
    for name in ("generator-0", "generator-1"):
        applied = [e for e in run.events(name) if e.get("event") == "weights.applied"]
        assert applied, name
        for e in applied:
            assert e["matches"] is True and e["checksum"] == published[e["version"]], (name, e)
    per_generator = {}
    for r in records:
        for g, n in r.groups_per_generator.items():
            per_generator[g] = per_generator.get(g, 0) + n
    assert set(per_generator) == {"generator-0", "generator-1"}, per_generator


def test_sigkilled_generator_is_restarted_and_no_group_is_lost_or_trained_twice(launch, random_actor_dir):
    run = launch(rl_config(random_actor_dir, steps=10))
    run.wait_event(lambda e: e.get("event") == "train.step" and e.get("step") == 2, timeout=180)
    os.kill(run.role_pids()["generator-0"][0], signal.SIGKILL)
    records = finished(run)
    assert len(run.role_pids()["generator-0"]) == 2  # restarted once
    events = run.events("generator-0")
    second_start = [i for i, e in enumerate(events) if e.get("event") == "role.ready"][1]
    applied = [e for e in events[second_start:] if e.get("event") == "weights.applied"]
    # The restarted generator starts from the trainer's current weights, not the initial ones.
    assert applied[0]["version"] >= 3 and applied[0]["matches"] is True
    assert_each_group_trained_once(records, 10)
    assert records[-1].version == 10


def test_sigkilled_trainer_resumes_from_its_checkpoint_at_the_same_version(launch, random_actor_dir):
    run = launch(rl_config(random_actor_dir, steps=12))  # steps after the kill: margin on a fast machine
    run.wait_event(lambda e: e.get("event") == "trainer.checkpoint" and e.get("version") == 4,
                   timeout=180, source="trainer-0")
    os.kill(run.role_pids()["trainer-0"][0], signal.SIGKILL)
    resumed = run.wait_event(lambda e: e.get("event") == "trainer.resumed", timeout=120, source="trainer-0")
    events = run.events("trainer-0")
    before_kill = events[:events.index(resumed)]
    last_saved = max(e["version"] for e in before_kill if e.get("event") == "trainer.checkpoint")
    # The newest checkpoint it wrote: the last one logged, or the next (checkpoint_every = 2) when
    # the kill came between a checkpoint's rename into place and its log line.
    assert resumed["version"] in (last_saved, last_saved + 2) and last_saved >= 4, (resumed, last_saved)
    records = finished(run)
    assert records[-1].version == 12
    assert_each_group_trained_once(records, 12)


def test_sigint_mid_run_exits_130_and_says_where_the_run_stopped(launch, random_actor_dir):
    run = launch(rl_config(random_actor_dir, steps=40))
    run.wait_event(lambda e: e.get("event") == "train.step" and e.get("step") == 1, timeout=180)
    assert run.stop(signal.SIGINT) == 130
    output = run.output()
    interrupted = [e for e in run.events() if e.get("event") == "run.interrupted"]
    assert interrupted and interrupted[0]["num_steps"] == 40 and 2 <= interrupted[0]["steps_done"] < 40
    assert f"interrupted at step {interrupted[0]['steps_done']} of 40 (SIGINT)" in output
    assert "--resume" in output


@pytest.mark.parametrize("broken", ["empty_model_dir", "corrupt_weights"])
def test_a_start_up_error_a_restart_would_repeat_fails_the_run_at_once(launch, random_actor_dir, tmp_path, broken):
    import shutil
    import time
    model = tmp_path / "model"
    if broken == "empty_model_dir":
        model.mkdir()
    else:
        shutil.copytree(random_actor_dir, model)
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    started = time.monotonic()
    run = launch(rl_config(model, steps=4), "supervisor.max_restarts=5")
    code = run.proc.wait(timeout=120)
    elapsed = time.monotonic() - started
    assert code == 1, run.output()
    failed = [e for e in run.events() if e.get("event") == "run.failed"]
    assert failed and "cannot start" in failed[0]["reason"] and "not restarted" in failed[0]["reason"]
    reason = failed[0]["reason"]
    assert str(model) in reason, reason  # the file is named
    assert broken == "empty_model_dir" or "not a readable safetensors file" in reason, reason
    assert all(len(pids) == 1 for pids in run.role_pids().values())  # nothing restarted
    print(f"start-up error ({broken}) failed the run in {elapsed:.1f} s")
    # Noticed from the role's exit, not by waiting out the ping timeout (20 s in rl_config):
    # ~4 s on an idle 2-core machine, 10 s seen under CI load, so no tighter wall-clock bound.
    assert elapsed < 20, elapsed


def test_a_tcp_run_with_curve_completes_and_keeps_the_rendezvous_private(launch, random_actor_dir):
    run = launch(rl_config(random_actor_dir, steps=4) + '[transport]\nscheme = "tcp"\nhost = "127.0.0.2"\n')
    records = finished(run)  # and the ledger balanced
    assert_each_group_trained_once(records, 4)
    endpoints = (run.run_dir / "endpoints.json").read_text()
    store = run.run_dir.resolve() / "rendezvous.store"
    assert '"supervisor":"tcp://127.0.0.2:' in endpoints and f'"torch_dist":"file://{store}"' in endpoints
    # The weight groups met in a file only the run's user can open: no port, no credentials needed.
    assert store.stat().st_size > 0 and store.stat().st_mode & 0o777 == 0o600
    assert run.run_dir.stat().st_mode & 0o777 == 0o700
    assert (run.run_dir / "keys.json").exists()  # CURVE on: every ZeroMQ channel is encrypted


def test_resume_past_a_truncated_latest_checkpoint_goes_on_from_the_intact_one(launch, random_actor_dir):
    run = launch(rl_config(random_actor_dir, steps=4))  # checkpoint_every = 2: step-2, step-4
    finished(run)
    weights = run.run_dir / "checkpoints" / "step-4" / "actor" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    proc = subprocess.run([sys.executable, "-m", "respec_async.cli", "launch", "--resume", str(run.run_dir),
                           "--set", "trainer.num_steps=6"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    unusable = [e for e in run.events() if e.get("event") == "trainer.checkpoint_unusable"]
    assert unusable and unusable[0]["level"] == "warning" and unusable[0]["checkpoint"] == "step-4", unusable
    resumed = [e for e in run.events() if e.get("event") == "trainer.resumed"]
    assert [e["version"] for e in resumed] == [2] and resumed[0]["checkpoint"] == "step-2"
    records = read_metrics(run.run_dir / "metrics.jsonl")
    assert [r.step for r in records] == list(range(6)) and records[-1].version == 6
    assert_each_group_trained_once(records, 6)
    ledger = audit_run(run.run_dir)  # steps 2 and 3, trained twice on disk, count once
    assert ledger.balanced and ledger.num_trainer_starts == 2 and ledger.num_trained == 18, ledger.summary()
