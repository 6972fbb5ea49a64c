"""A profile: what the profiler measured (step cost per mode and batch size, acceptance per
config, admission cost) and the clock it used; JSON on disk (`respec profile` writes one)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from respec_async.engine.requests import SDConfig
from respec_async.sd.grid import parse_config

PROFILE_FORMAT_VERSION = 1


def make_clock(kind: str) -> Callable[[], float]:
    """Seconds on the named clock. "cpu": the calling thread's CPU time when torch computes on
    that thread alone (one intra-op thread), else the process's; "wall": perf_counter, after a
    CUDA synchronize when a GPU is in use."""
    if kind == "wall":
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            def wall() -> float:
                torch.cuda.synchronize()
                return time.perf_counter()
            return wall
        return time.perf_counter
    if kind == "cpu":
        import torch

        return time.thread_time if torch.get_num_threads() == 1 else time.process_time
    raise ValueError(f"unknown clock {kind!r} (cpu or wall)")


@dataclass
class Profile:
    """Measured step costs and acceptance lengths (what `respec profile` writes as JSON)."""

    batch_sizes: list[int]
    plain_s: list[float]  # median seconds of a plain decode step, per batch size
    sd_s: dict[str, list[float]]  # config key "s,t,n" -> median seconds of an SD step, per batch size
    acceptance: dict[str, float]  # config key -> mean tokens per verify step on the task's rollouts
    clock: str = "cpu"
    # Refilling slots: extra seconds of a step that admits (prefills) k new requests, a + b * k,
    # and the mean completion length (tokens) of the task's rollouts; {} / 0 = not measured.
    admission: dict[str, float] = field(default_factory=dict)
    completion_tokens: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)  # models, sampling, repeats, machine, time taken
    fit: dict[str, Any] = field(default_factory=dict)  # the solver's fit error and plan, for reading

    @property
    def configs(self) -> list[SDConfig]:
        return [parse_config(key) for key in self.sd_s]

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": PROFILE_FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, blob: dict[str, Any]) -> "Profile":
        blob = dict(blob)
        version = blob.pop("format_version", None)
        if version != PROFILE_FORMAT_VERSION:
            raise ValueError(f"profile format_version {version!r}, expected {PROFILE_FORMAT_VERSION}")
        profile = cls(**blob)
        n = len(profile.batch_sizes)
        if n == 0 or len(profile.plain_s) != n or any(len(v) != n for v in profile.sd_s.values()):
            raise ValueError("profile: every mode needs one step time per batch size")
        if set(profile.acceptance) != set(profile.sd_s):
            raise ValueError("profile: acceptance and step times name different configs")
        profile.configs  # noqa: B018  (validates the keys)
        return profile

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        return cls.from_dict(json.loads(Path(path).read_text()))
