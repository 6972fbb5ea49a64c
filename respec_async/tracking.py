"""Experiment tracking: the trainer's per-step records (the same as metrics.jsonl) to the trackers
named in `[tracking] backends`, with the resolved config as hyperparameters.

    [tracking]
    backends = ["tensorboard"]      # and/or "wandb", "mlflow": pip install 'respec-async[wandb]' ...
    # dir = ""                      # "" = <run dir>/tracking/<backend>
    # wandb_mode = "offline"        # no network; `wandb sync <dir>` uploads later
    # mlflow_uri = ""               # "" = a file store under the tracking dir

    tensorboard --logdir runs/       # every run's curves side by side
    MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri <run dir>/tracking/mlflow

Metrics are grouped by what they describe (`reward/`, `rollout/`, `train/`, `time/`, `sd/`,
`drafter/`, `data/`), SD per draft source under `sd/<source>/`. Nothing here runs unless a
backend is configured, and a configured backend whose package is missing is a config error
(config.TRACKING_BACKENDS).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Protocol

import msgspec

from respec_async.config import Config, config_to_dict, config_to_toml

# StepRecord field -> its name in the trackers. Fields not listed (ids, per-generator counts) are
# bookkeeping, kept in metrics.jsonl only.
GROUPS = {
    "reward_mean": "reward/mean", "accuracy": "reward/accuracy",
    "response_len_mean": "rollout/response_len_mean", "response_len_max": "rollout/response_len_max",
    "num_samples": "rollout/num_samples", "num_tokens": "rollout/num_tokens",
    "tokens_per_s": "rollout/tokens_per_s", "staleness_max": "rollout/staleness_max",
    "generation_s": "time/generation_s", "wait_s": "time/wait_s", "train_s": "time/train_s", "sync_s": "time/sync_s",
    "loss": "train/loss", "clip_fraction": "train/clip_fraction", "is_weight_mean": "train/is_weight_mean",
    "kl": "train/kl",
    "acceptance_length": "sd/acceptance_length", "sd_step_share": "sd/step_share",
    "drafter_lag": "drafter/lag",
    "num_reissued": "data/num_reissued", "num_returned": "data/num_returned",
    "num_duplicates": "data/num_duplicates", "num_reward_errors": "data/num_reward_errors",
    "num_uninformative": "data/num_uninformative", "num_filtered": "data/num_filtered",
    "filtered_share": "data/filtered_share",
}


def step_scalars(record: msgspec.Struct) -> dict[str, float]:
    """The record's metrics under their tracker names; SD metrics not measured (no SD step, no
    drafter) are left out rather than logged as 0."""
    values = msgspec.to_builtins(record)
    out = {name: float(values[field]) for field, name in GROUPS.items() if field in values}
    if not values.get("sd_step_share"):
        out.pop("sd/acceptance_length", None)
    if values.get("drafter_lag", -1.0) < 0:
        out.pop("drafter/lag", None)
    for source, stats in values.get("sd_sources", {}).items():
        for key, value in stats.items():
            out[f"sd/{source}/{key}"] = float(value)
    return out


def hyperparameters(config_dict: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config flattened to dotted keys; lists as text (trackers take scalars only)."""
    out: dict[str, Any] = {}
    for key, value in config_dict.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(hyperparameters(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = ", ".join(map(str, value))
        else:
            out[name] = value
    return out


class Tracker(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """Event files under `log_dir`: scalars per step, the config through the hparams plugin (the
    HPARAMS tab) and as text (the TEXT tab, the whole TOML)."""

    def __init__(self, log_dir: Path, config_dict: dict[str, Any], config_toml: str) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(log_dir))
        params = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                  for k, v in hyperparameters(config_dict).items()}
        for summary in hparams(params, {"reward/mean": 0.0}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```toml\n" + config_toml + "\n```", 0)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run (offline by default: files under `log_dir`, synced later with
    `wandb sync`); the config flattened as its config, the TOML saved with the run."""

    def __init__(self, log_dir: Path, name: str, config: Config) -> None:
        import wandb

        log_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=config.tracking.project, name=name, dir=str(log_dir),
                              mode=config.tracking.wandb_mode, config=hyperparameters(config_to_dict(config)),
                              reinit="create_new")
        (log_dir / "config.toml").write_text(config_to_toml(config))
        self.run.save(str(log_dir / "config.toml"), base_path=str(log_dir), policy="now")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        import wandb

        self.run.finish()
        # finish() can return before wandb-core has written the run's file to its end; teardown
        # waits for the service to exit (this process holds no other run).
        wandb.teardown()


class MLflowTracker:
    """An MLflow run in experiment `tracking.project`: the config as params (dotted keys), the
    TOML as an artifact. Without `tracking.mlflow_uri` it writes a file store under `log_dir`
    (MLflow keeps that backend in maintenance mode; a server or database URI is its future)."""

    def __init__(self, log_dir: Path, name: str, config: Config) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = config.tracking.mlflow_uri
        if not uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = log_dir.resolve().as_uri()
        self.client = MlflowClient(uri)
        experiment = self.client.get_experiment_by_name(config.tracking.project)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(config.tracking.project))
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
        params = hyperparameters(config_to_dict(config))
        names = sorted(params)
        for i in range(0, len(names), 100):  # MLflow takes at most 100 params a call
            self.client.log_batch(self.run_id, params=[Param(k, str(params[k])[:6000]) for k in names[i:i + 100]])
        self.client.log_text(self.run_id, config_to_toml(config), "config.toml")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, step) for name, value in scalars.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Trackers:
    """Every configured tracker; the trainer calls `log(record)` once per step."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log(self, record: msgspec.Struct) -> None:
        if self.trackers:
            scalars = step_scalars(record)
            for tracker in self.trackers:
                tracker.log(record.step, scalars)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def open_trackers(config: Config, run_dir: Path) -> Trackers:
    """The trackers `config.tracking` names, writing under tracking.dir or <run_dir>/tracking."""
    root = Path(config.tracking.dir) if config.tracking.dir else Path(run_dir) / "tracking"
    trackers: list[Tracker] = []
    run_name = Path(run_dir).name
    for name in config.tracking.backends:
        # One subdirectory per run under a shared dir, so `tensorboard --logdir` shows them apart.
        log_dir = root / name / run_name if config.tracking.dir else root / name
        if name == "tensorboard":
            log_dir = root / run_name if config.tracking.dir else log_dir
            trackers.append(TensorBoardTracker(log_dir, config_to_dict(config), config_to_toml(config)))
        elif name == "wandb":
            trackers.append(WandbTracker(log_dir, run_name, config))
        elif name == "mlflow":
            # One store for every run of a shared dir: the experiment holds them side by side.
            trackers.append(MLflowTracker(root / name if config.tracking.dir else log_dir, run_name, config))
    return Trackers(trackers)
