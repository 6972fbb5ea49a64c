"""Per-step training metrics: computed from the scored batch, appended to `metrics.jsonl` in the
run directory, and shortened to one console line per step.

Fields (one record per optimizer step): reward and accuracy, response lengths, generation
throughput, the staleness histogram of the batch (trained version minus the version each
rollout started under), SD acceptance length and the share of SD steps, and where the time
went (trainer waiting for data, training, weight sync; generators generating).
"""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any

import msgspec

from respec_async.algorithms.grpo import LossStats
from transport.schema import ScoredGroup


class StepRecord(msgspec.Struct, kw_only=True):
    step: int
    version: int  # policy version after this step
    time: float  # unix time the record was written
    reward_mean: float
    accuracy: float
    response_len_mean: float
    response_len_max: int
    num_samples: int
    num_tokens: int
    tokens_per_s: float  # completion tokens of the batch / summed generation time of its groups
    staleness: dict[str, int]  # versions behind -> number of rollouts
    staleness_max: int
    acceptance_length: float  # mean tokens emitted per SD verify step (0 when SD never ran)
    sd_step_share: float  # share of decode steps that used SD
    wait_s: float
    train_s: float
    sync_s: float
    generation_s: float  # mean wall time of a group on its generator
    loss: float
    clip_fraction: float
    is_weight_mean: float
    kl: float
    group_ids: list[int] = []  # the prompt groups trained on (each exactly once per run)
    groups_per_generator: dict[str, int] = {}
    num_reissued: int = 0
    num_returned: int = 0
    num_duplicates: int = 0
    num_reward_errors: int = 0
    # Mean (policy version - drafter version) of the batch's SD rollouts when they finished: how
    # many actor versions the drafter that drafted them lagged behind (-1: no SD).
    drafter_lag: float = -1.0
    # Per draft source ("eagle", "history"), where it ran: acceptance_length, step_share (of
    # decode steps), drafted and accepted tokens.
    sd_sources: dict[str, dict[str, float]] = {}
    # Groups of the batch whose rewards are all equal (no GRPO signal), and with dynamic
    # sampling (trainer.dynamic_sampling) the groups drawn for this step and dropped for that
    # reason: consumed, never trained, never issued again. filtered_share = dropped / drawn.
    num_uninformative: int = 0
    num_filtered: int = 0
    filtered_share: float = 0.0
    filtered_group_ids: list[int] = []

    def console_fields(self) -> dict[str, Any]:
        return {
            "step": self.step, "reward": round(self.reward_mean, 3), "acc": round(self.accuracy, 3),
            "len": round(self.response_len_mean, 1), "tok_s": round(self.tokens_per_s),
            "stale_max": self.staleness_max,
            # Only where SD ran: 0.0 read as "SD accepts nothing" (issue 16).
            **({"sd": round(self.sd_step_share, 3), "accept_len": round(self.acceptance_length, 2)}
               if self.acceptance_length > 0 else {}),
            "wait_s": round(self.wait_s, 2), "train_s": round(self.train_s, 2),
            **({"filtered": round(self.filtered_share, 2)} if self.num_filtered else {}),
        }


def step_metrics(*, step: int, version: int, batch: list[ScoredGroup], loss: LossStats, wait_s: float,
                 train_s: float, sync_s: float, num_reissued: int = 0, num_returned: int = 0,
                 num_duplicates: int = 0, filtered_group_ids: list[int] = ()) -> StepRecord:
    rewards = [r for g in batch for r in g.rewards]
    correct = [c for g in batch for c in g.correct]
    lengths = [len(r.completion_ids) for g in batch for r in g.rollouts]
    staleness = collections.Counter(step - r.min_policy_version for g in batch for r in g.rollouts)
    generation_s = sum(g.generation_s for g in batch)
    num_tokens = sum(lengths)
    verify_steps = sum(r.num_verify_steps for g in batch for r in g.rollouts)
    decode_steps = sum(r.num_decode_steps for g in batch for r in g.rollouts)
    accepted = sum(r.num_accepted for g in batch for r in g.rollouts)
    lags = [r.max_policy_version - r.drafter_version for g in batch for r in g.rollouts if r.drafter_version >= 0]
    history = [sum(getattr(r, f"num_history_{k}") for g in batch for r in g.rollouts)
               for k in ("verify_steps", "drafted", "accepted")]
    sd_sources = {}
    for source, (steps, drafted, taken) in (("eagle", (verify_steps - history[0], None, accepted - history[2])),
                                            ("history", history)):
        if steps > 0:
            if drafted is None:
                drafted = sum(r.num_drafted for g in batch for r in g.rollouts) - history[1]
            sd_sources[source] = {"acceptance_length": round((taken + steps) / steps, 3),
                                  "step_share": round(steps / decode_steps, 4) if decode_steps else 0.0,
                                  "drafted": drafted, "accepted": taken}
    return StepRecord(
        step=step, version=version, time=time.time(),
        reward_mean=sum(rewards) / max(len(rewards), 1),
        accuracy=sum(correct) / max(len(correct), 1),
        response_len_mean=num_tokens / max(len(lengths), 1),
        response_len_max=max(lengths, default=0),
        num_samples=len(lengths), num_tokens=num_tokens,
        tokens_per_s=num_tokens / generation_s if generation_s > 0 else 0.0,
        staleness={str(k): v for k, v in sorted(staleness.items())},
        staleness_max=max(staleness, default=0),
        # Each verify step emits its accepted drafts plus one token from the target.
        acceptance_length=(accepted + verify_steps) / verify_steps if verify_steps else 0.0,
        sd_step_share=verify_steps / decode_steps if decode_steps else 0.0,
        wait_s=wait_s, train_s=train_s, sync_s=sync_s,
        generation_s=generation_s / max(len(batch), 1),
        loss=loss.loss, clip_fraction=loss.clip_fraction, is_weight_mean=loss.is_weight_mean, kl=loss.kl,
        group_ids=[g.group.group_id for g in batch],
        groups_per_generator=dict(collections.Counter(g.generator for g in batch)),
        num_reissued=num_reissued, num_returned=num_returned, num_duplicates=num_duplicates,
        num_reward_errors=sum(g.num_reward_errors for g in batch),
        drafter_lag=sum(lags) / len(lags) if lags else -1.0,
        sd_sources=sd_sources,
        num_uninformative=sum(not informative(g.rewards) for g in batch),
        num_filtered=len(filtered_group_ids),
        filtered_share=len(filtered_group_ids) / (len(filtered_group_ids) + len(batch)) if batch else 0.0,
        filtered_group_ids=sorted(filtered_group_ids),
    )


def moving_average(values: list[float], window: int) -> list[float]:
    """The trailing mean over up to `window` values at each position (plots of noisy curves)."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def informative(rewards: list[float]) -> bool:
    """A group carries GRPO signal when its rewards are not all equal."""
    return bool(rewards) and max(rewards) - min(rewards) > 1e-9


class MetricsWriter:
    """Appends one JSON line per record, flushed, so a killed writer leaves a readable file."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        cut_off = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        self.file = open(path, "ab")
        if cut_off:  # a killed predecessor's last line: end it, or the first new record joins it
            self.file.write(b"\n")
        self.encoder = msgspec.json.Encoder()

    def write(self, record: msgspec.Struct) -> None:
        self.file.write(self.encoder.encode(record) + b"\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_metrics(path: Path) -> list[StepRecord]:
    """All step records; on a resumed run the latest record per step wins. A line a killed
    trainer cut off (MetricsWriter ends it before writing on) is skipped."""
    by_step: dict[int, StepRecord] = {}
    for line in Path(path).read_bytes().splitlines():
        try:
            record = msgspec.json.decode(line, type=StepRecord) if line.strip() else None
        except msgspec.DecodeError:
            continue
        if record is not None:
            by_step[record.step] = record
    return [by_step[s] for s in sorted(by_step)]
