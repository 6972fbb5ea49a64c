"""Experiment tracking: the trainer's step records to TensorBoard event files, read back with
TensorBoard's own reader; the config as hyperparameters; a missing package is a config error."""

from __future__ import annotations

import importlib.util

import pytest

from respec_async.config import ConfigError, config_from_dict
from respec_async.tracking import hyperparameters, open_trackers, step_scalars
from tests.runtime.test_metrics import record

needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="tensorboard not installed (pip install 'respec-async[tensorboard]')")


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_step_scalars_are_grouped_and_leave_out_sd_that_did_not_run():
    plain = step_scalars(record())
    assert plain["reward/mean"] == 0.5 and plain["time/train_s"] == 0.2 and plain["train/loss"] == 0.1
    assert not any(k.startswith(("sd/acceptance", "drafter/")) for k in plain)
    sd = step_scalars(record(acceptance_length=3.5, sd_step_share=0.4, drafter_lag=0.5,
                             sd_sources={"history": {"acceptance_length": 4.0, "step_share": 0.3}}))
    assert sd["sd/acceptance_length"] == 3.5 and sd["drafter/lag"] == 0.5
    assert sd["sd/history/acceptance_length"] == 4.0 and sd["sd/history/step_share"] == 0.3


@needs_tensorboard
def test_tensorboard_events_hold_each_step_and_the_config(tmp_path):
    config = config_from_dict({"tracking": {"backends": ["tensorboard"]}, "trainer": {"lr": 3e-4}})
    trackers = open_trackers(config, tmp_path)
    records = [record(step=i, version=i + 1, reward_mean=0.1 * i, acceptance_length=2.0 + i, sd_step_share=0.5)
               for i in range(4)]
    for r in records:
        trackers.log(r)
    trackers.close()
    scalars = read_scalars(tmp_path / "tracking" / "tensorboard")
    assert scalars["reward/mean"] == [(r.step, pytest.approx(r.reward_mean)) for r in records]
    assert scalars["sd/acceptance_length"] == [(r.step, pytest.approx(r.acceptance_length)) for r in records]
    assert set(scalars) == set(step_scalars(records[0]))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(tmp_path / "tracking" / "tensorboard"))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["trainer.lr"].number_value == pytest.approx(3e-4)
    assert hparams["tracking.backends"].string_value == "tensorboard"
    assert events.Tags()["tensors"]  # the config's TOML as text


@needs_tensorboard
def test_a_shared_tracking_dir_keeps_runs_apart(tmp_path):
    config = config_from_dict({"tracking": {"backends": ["tensorboard"], "dir": str(tmp_path / "tb")}})
    for name in ("run-a", "run-b"):
        trackers = open_trackers(config, tmp_path / name)
        trackers.log(record())
        trackers.close()
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == ["run-a", "run-b"]


def test_hyperparameters_flatten_tables_and_lists():
    flat = hyperparameters({"a": {"b": 1, "c": {"d": "x"}}, "e": [1, 2]})
    assert flat == {"a.b": 1, "a.c.d": "x", "e": "1, 2"}


def test_a_backend_whose_package_is_missing_is_a_config_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"tracking\.backends: tensorboard needs the tensorboard package: "
                                          r"pip install 'respec-async\[tensorboard\]'"):
        config_from_dict({"tracking": {"backends": ["tensorboard"]}})
    with pytest.raises(ConfigError, match=r"tracking\.backends"):
        config_from_dict({"tracking": {"backends": ["neptune"]}})


needs_mlflow = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                                  reason="mlflow not installed (pip install 'respec-async[mlflow]')")
needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                 reason="wandb not installed (pip install 'respec-async[wandb]')")


@needs_mlflow
@pytest.mark.process  # mlflow runs `uname -p` for its run's system tags
def test_mlflow_runs_hold_each_step_the_config_as_params_and_its_toml(tmp_path):
    from mlflow.tracking import MlflowClient

    config = config_from_dict({"tracking": {"backends": ["mlflow"], "project": "tests"}, "trainer": {"lr": 3e-4}})
    records = [record(step=i, version=i + 1, reward_mean=0.1 * i, acceptance_length=2.0 + i, sd_step_share=0.5)
               for i in range(4)]
    trackers = open_trackers(config, tmp_path / "run-a")
    for r in records:
        trackers.log(r)
    trackers.close()
    client = MlflowClient((tmp_path / "run-a" / "tracking" / "mlflow").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.run_name == "run-a" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "reward/mean")
    assert [(m.step, m.value) for m in history] == [(r.step, pytest.approx(r.reward_mean)) for r in records]
    assert set(run.data.metrics) == set(step_scalars(records[0]))
    assert float(run.data.params["trainer.lr"]) == pytest.approx(3e-4)
    toml = client.download_artifacts(run.info.run_id, "config.toml", str(tmp_path))
    assert "lr = 0.0003" in open(toml).read()


def wandb_history(run_dir) -> list[dict]:
    """The history rows of an offline W&B run, read from its .wandb file: LevelDB's log format
    (32 KiB blocks of records with a 7-byte header; long records split FIRST/MIDDLE/LAST) after
    a 7-byte W&B header, each record a wandb_internal Record."""
    import json

    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind in (2, 3):
            pending = (pending if kind == 3 else b"") + chunk
        elif kind == 4:
            chunks.append(pending + chunk)
    rows, kinds = [], []
    for chunk in chunks:
        item = wandb_internal_pb2.Record.FromString(chunk)
        kinds.append(item.WhichOneof("record_type"))
        if kinds[-1] == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in item.history.item})
    assert "exit" in kinds, f"the run's file is not complete ({len(data)} bytes, records {kinds})"
    return rows


@needs_wandb
@pytest.mark.process  # wandb.init starts its wandb-core service
def test_an_offline_wandb_run_holds_each_step_with_no_network(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = config_from_dict({"tracking": {"backends": ["wandb"], "project": "tests"}})
    records = [record(step=i, version=i + 1, reward_mean=0.1 * i) for i in range(3)]
    trackers = open_trackers(config, tmp_path / "run-a")
    for r in records:
        trackers.log(r)
    trackers.close()
    rows = wandb_history(tmp_path / "run-a" / "tracking" / "wandb")
    assert [(row["_step"], row["reward/mean"]) for row in rows] == [(r.step, pytest.approx(r.reward_mean))
                                                                   for r in records]
    assert set(step_scalars(records[0])) <= set(rows[0])
    assert "lr = " in (tmp_path / "run-a" / "tracking" / "wandb" / "config.toml").read_text()
