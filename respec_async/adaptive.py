"""ReSpec's adaptive speculative-decoding server: profiler, solver and per-step scheduler.

Speculative decoding (SD) pays off at small active batch sizes and loses at large ones, and an
RL generation phase sweeps through all of them as long-tail sequences finish. Three pieces:

**Profiler** (`run_profile`, `respec profile CONFIG`). For the target + drafter on this
hardware it measures the cost of one decode step of every active sequence, plain and with each
SD config (s = draft steps, t = top-k, n = draft tokens) of a grid, at active batch sizes B =
1, 2, 4, ..., max. The modes are timed round-robin on the same live batches (B sequences
decoding with no stop token, restarted before they outgrow `context_len`), so a load spike on
a shared machine hits every mode alike; each cell is the median of `repeats` steps. Separately
it measures each config's acceptance length L_c (mean tokens emitted per verify step =
accepted drafts + 1) on real rollouts of the task (prompts from the run's data, its sampling
settings, until EOS). Step cost uses the clock named in the profile: "cpu" (this thread's CPU
time, robust on a shared machine; the process's with more than one torch thread) or "wall".

**Solver** (`SpeedupModel`). What is fitted, per mode m (plain, and each SD config):

    T_m(B) = a_m + b_m * B ** p_m          step seconds at active batch size B

with a_m, b_m >= 0 by least squares on the relative error (residuals divided by the measured
time), for each p_m on a grid from 0.25 to 2 (the best p_m is kept). a_m is the per-step
overhead (kernel launches, Python, the drafter's fixed cost), b_m * B ** p_m the work that
grows with the batch (matmuls over B rows x tokens per row; p_m < 1 where the hardware still
has idle width, > 1 where attention or caches start to thrash). Acceptance length is taken per
config and independent of B (it is a property of the drafter and the task, not the batch). The
predicted throughput speedup of config c over plain decoding at batch size B is

    S_c(B) = L_c * T_plain(B) / T_c(B)

and the best choice at B is argmax_c S_c(B) if that exceeds max(1, min_speedup), else SD off
(`generator.sd_min_speedup`, default 1: above it, a margin for the prediction's error). While
requests wait for slots (an RL generation phase before its tail), every sequence that finishes is
replaced and prefilled at the next step, and that admission cost is per step, not per token:
a mode that emits k tokens per row finishes n = B * k / (mean completion length) rows per step
(Poisson), so its step costs T_m(B) + P(n >= 1) * a_adm + n * b_adm on top, with a_adm, b_adm
measured by the profiler (a step admitting 1 and 4 requests minus the same decode without the
admission) and the mean completion length from the acceptance rollouts. SD emits more per
step and so batches admissions into fewer steps, which on this CPU (a prefill costs about one
decode step at B = 64) moves the break-even batch size up. The scheduler keeps one plan for
each case and is told which applies. The fit error
(`SpeedupModel.fit_error`): relative error of the fitted vs measured step time per mode and
of the predicted vs measured speedup per config at each profiled B (mean and max), the
leave-one-out error of the step-time fit at interior batch sizes (how well it predicts a batch
size it was not fitted on), and the regret of the fitted choice: at each profiled B, the
measured speedup of the config the fit picks over the measured best.

**Scheduler** (`AdaptiveScheduler`). Before each engine step it reads the active batch size
(and whether requests wait for slots) and returns the planned choice (tables of best choices
for B = 1..max, re-solved only when an estimate changes). Beyond the paper's offline-only profile it re-estimates acceptance online:
per config, the accepted counts of its verify steps are pooled into windows of
`window_rows` sequence-steps; each window's observed L over the profiled L gives a ratio x,
and the config's ratio r_c <- (1 - alpha) r_c + alpha x; every other config's ratio moves by
alpha * coupling toward x as well (the configs share one drafter, so a drop seen through one is
evidence for all, only weaker). Estimates are L_c = profiled L_c * r_c (never below 1). Every
`probe_interval` decode steps it runs one step with a config the plan does not use at that B
(round robin over those predicted within `probe_margin` of the best), so a config whose
estimate went stale (or a drafter that recovers after SD was switched off) is seen again. Where
the plan has SD off, a probe waits for a batch of at most `probe_max_plain_batch` rows (the
tail of a phase): the engine's drafter catches up lazily, so the first SD step after plain ones
runs the drafter over every row's backlog, cheap for a few rows, as costly as the whole
upkeep it saves at B = 64.
`report()` gives the share of steps per mode and the predicted vs observed speedup over plain
decoding, both against the profile's fitted plain step cost: a decode step at batch B that
emitted k tokens per sequence in t seconds (measured) ran at speedup k * T_plain(B) / t
(plain decoding needs T_plain(B) per token per sequence); the window's observed speedup is
the time-weighted mean of that, sum(k * T_plain(B)) / sum(t), and the predicted speedup the
time-weighted mean of the S_choice(B) the scheduler expected when it chose (1 for plain
steps). Steps that also admitted (prefilled) new requests are left out of both.

Nothing here touches roles or sockets; the generator calls `choose` and `observe` around each
`Engine.step`, and the engine switches mode and config per step without reallocating.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from respec_async.config import DEFAULT_SD_GRID
from respec_async.engine.engine import SDConfig, StepStats

PROFILE_FORMAT_VERSION = 1
DEFAULT_GRID = DEFAULT_SD_GRID  # one home: config.py
PLAIN = "plain"

Progress = Callable[[int, str], None]  # (units done since the last call, what is running)


# ---- configs and clocks ---------------------------------------------------------------------

HISTORY_PREFIX = "history:"
FULL_WIDTH = 2 ** 62  # Engine.min_packed_saving that never packs


def config_key(sd: SDConfig | None) -> str:
    if sd is None:
        return PLAIN
    prefix = HISTORY_PREFIX if sd.source == "history" else ""
    return f"{prefix}{sd.num_steps},{sd.top_k},{sd.num_draft_tokens}"


def parse_config(text: str) -> SDConfig:
    """'s,t,n' (or 's,t'; the EAGLE drafter) or 'history:s,t,n' (engine/history.py) -> SDConfig;
    ValueError naming the text when it is not a valid config."""
    source = "eagle"
    body = text
    if text.startswith(HISTORY_PREFIX):
        source, body = "history", text[len(HISTORY_PREFIX):]
    try:
        parts = [int(x) for x in body.split(",")]
        if not 1 <= len(parts) <= 3:
            raise ValueError("expected 's,t,n' or 'history:s,t,n'")
        return SDConfig(*parts, source=source)
    except ValueError as exc:
        raise ValueError(f"SD config {text!r}: {exc}") from None


def is_history(key: str) -> bool:
    return key.startswith(HISTORY_PREFIX)


def bucket_of(batch_size: int) -> int:
    """Batch-size bucket of the online history-acceptance estimates: 0 for B = 1, 1 for 2-3, ..."""
    return max(1, batch_size).bit_length() - 1


def parse_grid(items: Iterable[str]) -> list[SDConfig]:
    configs = [parse_config(item) for item in items]
    if not configs:
        raise ValueError("the SD grid is empty")
    return list(dict.fromkeys(configs))  # drop duplicates, keep order


def engine_draft_budget(configs: Iterable[SDConfig]) -> int:
    """The Engine's max_draft_tokens that fits every config (its default 64 at least)."""
    return max([64] + [max(sd.num_draft_tokens, (sd.num_steps - 1) * sd.top_k) for sd in configs])


def history_index_for(configs: Iterable[SDConfig], **kwargs):
    """A fresh HistoryIndex when any config drafts from history, else None."""
    if not any(sd.source == "history" for sd in configs):
        return None
    from respec_async.engine.history import HistoryIndex

    return HistoryIndex(**kwargs)


def shadow_length(configs: Iterable[SDConfig]) -> int:
    """The shadow chain length that scores every history chain config (0: none)."""
    return max([0] + [sd.num_steps for sd in configs if sd.source == "history" and sd.is_chain])


def profile_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... below max_batch_size, and max_batch_size itself."""
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch_size]


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


# ---- the profile ----------------------------------------------------------------------------

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


def measure_step_costs(target, drafter, configs: Sequence[SDConfig], batch_sizes: Sequence[int],
                       prompts: Sequence[list[int]], params, *, repeats: int = 10, clock: str = "cpu",
                       context_len: int = 96, seed: int = 0,
                       progress: Progress | None = None) -> tuple[list[float], dict[str, list[float]]]:
    """Median seconds of one decode step per mode (plain, then each config) and batch size.

    Every repetition steps each batch size's live batch once in every mode, the mode order
    rotating between repetitions; a batch is restarted (fresh prompts, new engine) before its
    longest sequence would pass context_len, so no sequence ever finishes and B stays B."""
    from respec_async.engine.engine import Engine, Request
    from respec_async.engine.sampling import SamplingParams

    now = make_clock(clock)
    modes: list[SDConfig | None] = [None, *configs]
    per_round = sum(1 if sd is None else sd.num_steps + 1 for sd in modes)
    endless = SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                             max_new_tokens=10 ** 9, stop_token_ids=())
    longest_prompt = max(len(p) for p in prompts)
    context_len = max(context_len, longest_prompt + 2 * per_round)
    draft_budget = engine_draft_budget(configs)
    engines: dict[int, Engine] = {}
    restarts = Counter()

    def fresh(batch_size: int) -> Engine:
        # History steps verified at full width: these rows have little history to draft from,
        # and a packed step would price a config at what drafting nothing costs. Online, where
        # rows draft less than the full chain, a step costs less than profiled, never more.
        engine = Engine(target, drafter, max_batch_size=batch_size, max_seq_len=context_len + per_round + 2,
                        seed=seed + 7919 * restarts[batch_size] + batch_size, max_draft_tokens=draft_budget,
                        history=history_index_for(configs), min_packed_saving=FULL_WIDTH)
        offset = restarts[batch_size] * batch_size
        for i in range(batch_size):
            engine.add_request(Request(i, list(prompts[(offset + i) % len(prompts)]), endless))
        engine.step(None)  # prefill
        restarts[batch_size] += 1
        return engine

    samples: dict[tuple[int, int], list[float]] = defaultdict(list)
    for rep in range(repeats + 1):  # repetition 0 warms every path up and is not kept
        for batch_size in batch_sizes:
            engine = engines.get(batch_size)
            if engine is None or int(engine.lengths[:batch_size].max()) + per_round >= context_len:
                engine = engines[batch_size] = fresh(batch_size)
            order = list(range(len(modes)))
            shift = rep % len(modes)
            for index in order[shift:] + order[:shift]:
                start = now()
                engine.step(modes[index])
                elapsed = now() - start
                assert len(engine.running) == batch_size, "a profiled sequence finished early"
                if rep:
                    samples[index, batch_size].append(elapsed)
            if progress is not None and rep:
                progress(len(modes), f"step cost, batch {batch_size}")
    plain = [statistics.median(samples[0, b]) for b in batch_sizes]
    sd = {config_key(c): [statistics.median(samples[i + 1, b]) for b in batch_sizes] for i, c in enumerate(configs)}
    return plain, sd


def measure_acceptance(target, drafter, configs: Sequence[SDConfig], prompts: Sequence[list[int]], params, *,
                       batch_size: int = 16, seed: int = 0, group_size: int = 1,
                       progress: Progress | None = None) -> dict[str, float]:
    """Mean tokens per verify step (accepted drafts + 1) of each config on rollouts of `prompts`
    with the run's sampling params, each sequence until its stop token or max_new_tokens. A
    history config samples the same number of rollouts as RL groups (the first
    len(prompts) // group_size prompts, group_size times each) from an empty index: its figure
    is a first epoch's, which the scheduler re-estimates online."""
    from respec_async.engine.engine import Engine, Request

    max_seq_len = max(len(p) for p in prompts) + params.max_new_tokens + 1
    singles = [Request(i, list(p), params) for i, p in enumerate(prompts)]
    groups = [Request(f"{i}:{j}", list(p), params) for i, p in enumerate(prompts[:max(1, len(prompts) // group_size)])
              for j in range(group_size)]
    out = {}
    lengths = []
    for sd in configs:
        requests = groups if sd.source == "history" else singles
        engine = Engine(target, drafter, max_batch_size=min(batch_size, len(requests)), max_seq_len=max_seq_len,
                        seed=seed, max_draft_tokens=engine_draft_budget([sd]), history=history_index_for([sd]))
        completions = engine.generate(requests, sd)
        verify = sum(c.num_verify_steps for c in completions)
        accepted = sum(c.num_accepted for c in completions)
        out[config_key(sd)] = (accepted + verify) / verify if verify else 1.0
        if sd.source != "history":
            lengths += [len(c.output_ids) for c in completions]
        if progress is not None:
            progress(1, f"acceptance {config_key(sd)}")
    lengths = lengths or [len(c.output_ids) for c in completions]
    out[PLAIN] = sum(lengths) / len(lengths)  # mean completion tokens, under the "plain" key
    return out


def measure_admission(target, drafter, configs: Sequence[SDConfig], prompts: Sequence[list[int]], params, *,
                      max_batch_size: int, repeats: int = 5, clock: str = "cpu", seed: int = 0) -> dict[str, float]:
    """Extra cost of a step that admits k new requests (their prefill, target and drafter), fitted
    as a + b * k from k = 1 and k = min(4, max_batch_size): each sample times a step that admits
    k prompts into an empty engine and subtracts the next step (decoding the same k rows)."""
    from respec_async.engine.engine import Engine, Request

    now = make_clock(clock)
    ks = sorted({1, min(4, max_batch_size)})
    extra: dict[int, list[float]] = defaultdict(list)
    max_seq_len = max(len(p) for p in prompts) + 8
    for rep in range(repeats + 1):
        for k in ks:
            engine = Engine(target, drafter, max_batch_size=max_batch_size, max_seq_len=max_seq_len, seed=seed,
                            max_draft_tokens=engine_draft_budget(configs), history=history_index_for(configs))
            for i in range(k):
                engine.add_request(Request(i, list(prompts[(rep * k + i) % len(prompts)]), params))
            start = now()
            engine.step(None)
            admit_s = now() - start
            start = now()
            engine.step(None)
            decode_s = now() - start
            if rep:  # the first round warms up
                extra[k].append(max(0.0, admit_s - decode_s))
    medians = {k: statistics.median(v) for k, v in extra.items()}
    if len(ks) == 1:
        return {"a": medians[1], "b": 0.0}
    b = max(0.0, (medians[ks[1]] - medians[1]) / (ks[1] - 1))
    return {"a": max(0.0, medians[1] - b), "b": b}


def run_profile(target, drafter, configs: Sequence[SDConfig], batch_sizes: Sequence[int],
                prompts: Sequence[list[int]], params, *, repeats: int = 10, num_acceptance_prompts: int = 64,
                clock: str = "cpu", context_len: int = 96, seed: int = 0, progress: Progress | None = None,
                meta: dict[str, Any] | None = None, group_size: int = 1) -> Profile:
    """Measure everything the solver needs; see the module docstring."""
    started = time.perf_counter()
    configs = list(configs)
    batch_sizes = sorted(set(batch_sizes))
    plain, sd = measure_step_costs(target, drafter, configs, batch_sizes, prompts, params, repeats=repeats,
                                   clock=clock, context_len=context_len, seed=seed, progress=progress)
    acceptance_prompts = [prompts[i % len(prompts)] for i in range(num_acceptance_prompts)]
    acceptance = measure_acceptance(target, drafter, configs, acceptance_prompts, params, seed=seed,
                                    group_size=group_size, progress=progress)
    completion_tokens = acceptance.pop(PLAIN)
    admission = measure_admission(target, drafter, configs, prompts, params, max_batch_size=max(batch_sizes),
                                  repeats=repeats, clock=clock, seed=seed)
    if progress is not None:
        progress(1, "admission cost")
    meta = dict(meta or {})
    meta.update(repeats=repeats, num_acceptance_prompts=num_acceptance_prompts, group_size=group_size,
                context_len=context_len,
                temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                max_new_tokens=params.max_new_tokens, seconds=round(time.perf_counter() - started, 2),
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    profile = Profile(batch_sizes=batch_sizes, plain_s=plain, sd_s=sd, acceptance=acceptance, clock=clock,
                      admission=admission, completion_tokens=completion_tokens, meta=meta)
    model = SpeedupModel(profile)
    profile.fit = {"model": "T_m(B) = a_m + b_m * B ** p_m per mode; S_c(B) = L_c * T_plain(B) / T_c(B)",
                   "params": model.fit_params(), "error": model.fit_error(),
                   "plan": model.plan_summary(max(batch_sizes)),
                   "plan_refilling": model.plan_summary(max(batch_sizes), refilling=True)}
    return profile


def profile_units(num_configs: int, num_batch_sizes: int, repeats: int) -> int:
    """Progress units run_profile reports in all (for a progress bar's total)."""
    return (num_configs + 1) * num_batch_sizes * repeats + num_configs + 1


# ---- the solver -----------------------------------------------------------------------------

@dataclass(frozen=True)
class CostFit:
    """Step seconds T(B) = a + b * B ** p."""

    a: float
    b: float
    p: float

    def __call__(self, batch_size: float) -> float:
        return self.a + self.b * batch_size ** self.p


_EXPONENTS = tuple(0.25 + 0.05 * i for i in range(36))  # 0.25 .. 2.0


def fit_cost(batch_sizes: Sequence[int], seconds: Sequence[float]) -> CostFit:
    """Least squares on relative residuals (a + b B^p - T) / T with a, b >= 0, best p of a grid."""
    if len(batch_sizes) == 1:
        return CostFit(seconds[0], 0.0, 1.0)
    weights = [1.0 / (t * t) for t in seconds]
    best: tuple[float, CostFit] | None = None
    for p in _EXPONENTS:
        xs = [b ** p for b in batch_sizes]
        candidates = []
        sw = sum(weights)
        swx = sum(w * x for w, x in zip(weights, xs))
        swxx = sum(w * x * x for w, x in zip(weights, xs))
        swt = sum(w * t for w, t in zip(weights, seconds))
        swxt = sum(w * x * t for w, x, t in zip(weights, xs, seconds))
        det = sw * swxx - swx * swx
        if det > 0:
            a = (swt * swxx - swx * swxt) / det
            b = (sw * swxt - swx * swt) / det
            if a >= 0 and b >= 0:
                candidates.append((a, b))
        candidates.append((swt / sw, 0.0))  # constant
        candidates.append((0.0, swxt / swxx))  # proportional
        for a, b in candidates:
            error = sum(w * (a + b * x - t) ** 2 for w, x, t in zip(weights, xs, seconds))
            if best is None or error < best[0] - 1e-15:
                best = (error, CostFit(a, b, p))
    assert best is not None
    return best[1]


def _summary(errors: list[float]) -> dict[str, float]:
    return {"mean": sum(errors) / len(errors), "max": max(errors)} if errors else {"mean": 0.0, "max": 0.0}


class SpeedupModel:
    """The fitted speedup S_c(B) of every profiled config (see the module docstring)."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.configs = {config_key(c): c for c in profile.configs}
        self.plain = fit_cost(profile.batch_sizes, profile.plain_s)
        self.cost = {key: fit_cost(profile.batch_sizes, seconds) for key, seconds in profile.sd_s.items()}

    def step_seconds(self, key: str, batch_size: float) -> float:
        return self.plain(batch_size) if key == PLAIN else self.cost[key](batch_size)

    def tokens_per_row(self, key: str, acceptance: dict[str, float] | None = None) -> float:
        return 1.0 if key == PLAIN else (acceptance or self.profile.acceptance)[key]

    def admission_seconds(self, batch_size: float, tokens_per_row: float) -> float:
        """Expected prefill cost per step while finished slots are refilled from a queue: a step
        that emits tokens_per_row per sequence finishes n = B * tokens_per_row / completion_tokens
        sequences on average, refilled next step: P(n >= 1) * a + n * b (Poisson arrivals)."""
        admission, length = self.profile.admission, self.profile.completion_tokens
        if not admission or length <= 0:
            return 0.0
        n = batch_size * tokens_per_row / length
        return (1.0 - math.exp(-n)) * admission["a"] + n * admission["b"]

    def speedup(self, key: str, batch_size: float, acceptance: dict[str, float] | None = None,
                refilling: bool = False) -> float:
        """Predicted throughput of `key` over plain decoding at this batch size; with refilling,
        each step also pays the expected admission cost of the slots its finished rows free."""
        if key == PLAIN:
            return 1.0
        length = self.tokens_per_row(key, acceptance)
        plain_s, sd_s = self.plain(batch_size), self.cost[key](batch_size)
        if refilling:
            plain_s += self.admission_seconds(batch_size, 1.0)
            sd_s += self.admission_seconds(batch_size, length)
        return length * plain_s / sd_s

    def best(self, batch_size: float, acceptance: dict[str, float] | None = None,
             refilling: bool = False, min_speedup: float = 1.0) -> tuple[str, float]:
        """(PLAIN or the best config's key, its predicted speedup) at this batch size; a config
        is chosen only if its predicted speedup exceeds min_speedup."""
        choice, value = PLAIN, 1.0
        for key in self.cost:
            s = self.speedup(key, batch_size, acceptance, refilling)
            if s > max(value, min_speedup):
                choice, value = key, s
        return choice, value

    def plan(self, max_batch_size: int, acceptance: dict[str, float] | None = None,
             refilling: bool = False, min_speedup: float = 1.0) -> list[tuple[str, float]]:
        """best(B) for B = 1..max_batch_size (index B - 1)."""
        return [self.best(b, acceptance, refilling, min_speedup) for b in range(1, max_batch_size + 1)]

    def plan_summary(self, max_batch_size: int, acceptance: dict[str, float] | None = None,
                     refilling: bool = False, min_speedup: float = 1.0) -> list[dict[str, Any]]:
        """The plan as runs of batch sizes with the same choice: [{from, to, choice, speedup}, ...]
        (speedup: predicted, at the run's first batch size)."""
        runs: list[dict[str, Any]] = []
        for b, (key, value) in enumerate(self.plan(max_batch_size, acceptance, refilling, min_speedup), start=1):
            if runs and runs[-1]["choice"] == key:
                runs[-1]["to"] = b
            else:
                runs.append({"from": b, "to": b, "choice": key, "speedup": round(value, 3)})
        return runs

    def fit_params(self) -> dict[str, dict[str, float]]:
        fits = {PLAIN: self.plain, **self.cost}
        return {key: {"a": f.a, "b": f.b, "p": round(f.p, 2)} for key, f in fits.items()}

    def measured_speedup(self, key: str, index: int) -> float:
        p = self.profile
        return p.acceptance[key] * p.plain_s[index] / p.sd_s[key][index]

    def fit_error(self) -> dict[str, Any]:
        """Relative errors of the fit against the profile's measurements (see module docstring)."""
        p = self.profile
        sizes = p.batch_sizes
        measured = {PLAIN: p.plain_s, **p.sd_s}
        step_errors = {key: [abs(self.step_seconds(key, b) - t) / t for b, t in zip(sizes, seconds)]
                       for key, seconds in measured.items()}
        speedup_errors = {key: [abs(self.speedup(key, b) - self.measured_speedup(key, i)) / self.measured_speedup(key, i)
                                for i, b in enumerate(sizes)] for key in p.sd_s}
        loo = []
        for key, seconds in measured.items():
            for i in range(1, len(sizes) - 1):
                fit = fit_cost(sizes[:i] + sizes[i + 1:], seconds[:i] + seconds[i + 1:])
                loo.append(abs(fit(sizes[i]) - seconds[i]) / seconds[i])
        regret = []
        for i, b in enumerate(sizes):
            choice, _ = self.best(b)
            measured_best = max([1.0] + [self.measured_speedup(key, i) for key in p.sd_s])
            got = 1.0 if choice == PLAIN else self.measured_speedup(choice, i)
            regret.append({"batch_size": b, "choice": choice, "measured_speedup": round(got, 4),
                           "measured_best": round(measured_best, 4), "ratio": round(got / measured_best, 4)})
        all_steps = [e for errors in step_errors.values() for e in errors]
        all_speedups = [e for errors in speedup_errors.values() for e in errors]
        return {
            "step_time": {**_summary(all_steps), "per_mode": {k: _summary(v) for k, v in step_errors.items()}},
            "speedup": {**_summary(all_speedups), "per_config": {k: _summary(v) for k, v in speedup_errors.items()}},
            "step_time_leave_one_out": _summary(loo),
            "choice_vs_measured_best": regret,
            "worst_choice_ratio": min(r["ratio"] for r in regret),
        }


def format_profile(profile: Profile, model: SpeedupModel | None = None) -> str:
    """The profile and fit as a table: measured step ms per mode and batch size with the
    measured (fitted) speedup, then the fit error and the plan."""
    model = model or SpeedupModel(profile)
    sizes = profile.batch_sizes
    lines = [f"step cost ({profile.clock} clock, ms) and speedup over plain: measured (fitted); acceptance length L",
             f"{'mode':>13} {'L':>5} | " + " | ".join(f"B={b:<16d}" for b in sizes)]
    lines.append(f"{PLAIN:>13} {1.0:5.2f} | " + " | ".join(f"{t * 1e3:6.2f}ms{'':10}" for t in profile.plain_s))
    for key, seconds in profile.sd_s.items():
        cells = [f"{t * 1e3:6.2f}ms {model.measured_speedup(key, i):4.2f}({model.speedup(key, b):4.2f})"
                 for i, (b, t) in enumerate(zip(sizes, seconds))]
        lines.append(f"{key:>13} {profile.acceptance[key]:5.2f} | " + " | ".join(cells))
    error = model.fit_error()
    lines.append(f"fit error (relative): step time mean {error['step_time']['mean']:.1%} max "
                 f"{error['step_time']['max']:.1%}; speedup mean {error['speedup']['mean']:.1%} max "
                 f"{error['speedup']['max']:.1%}; step time leave-one-out mean "
                 f"{error['step_time_leave_one_out']['mean']:.1%} max {error['step_time_leave_one_out']['max']:.1%}")
    lines.append("fitted choice at each profiled batch size, measured speedup / measured best: " + ", ".join(
        f"B={r['batch_size']} {r['choice']} {r['measured_speedup']:.2f}/{r['measured_best']:.2f}"
        for r in error["choice_vs_measured_best"]))
    lines.append("plan (predicted speedup): " + ", ".join(
        f"B {r['from']}-{r['to']}: {r['choice']} x{r['speedup']:.2f}" for r in model.plan_summary(max(sizes))))
    if profile.admission:
        lines.append(f"admission (prefill) cost per step: {profile.admission['a'] * 1e3:.2f} ms + "
                     f"{profile.admission['b'] * 1e3:.2f} ms per request; mean completion "
                     f"{profile.completion_tokens:.1f} tokens; plan while slots refill from a queue: " + ", ".join(
                         f"B {r['from']}-{r['to']}: {r['choice']} x{r['speedup']:.2f}"
                         for r in model.plan_summary(max(sizes), refilling=True)))
    return "\n".join(lines)


# ---- the scheduler --------------------------------------------------------------------------

class AdaptiveScheduler:
    """Per-step SD choice from the fitted model, with acceptance re-estimated online.

    EAGLE configs share one drafter, so an acceptance seen through one moves the other EAGLE
    configs too (`coupling`). A history config's acceptance depends on how much history exists,
    which changes with the batch size within a phase and between epochs: it is estimated per
    batch-size bucket (`bucket_of`) with a faster EMA (`history_ema`), from its own verify steps
    and, for chains, from the engine's shadow chains (StepStats.shadow_counts: free samples of
    a chain's acceptance, taken in every step whatever its mode), and a history config may be
    probed at any batch size (it needs no drafter catch-up)."""

    def __init__(self, model: SpeedupModel, max_batch_size: int, *, ema: float = 0.2, coupling: float = 0.5,
                 window_rows: int = 64, probe_interval: int = 64, probe_margin: float = 0.75,
                 probe_max_plain_batch: int = 4, min_speedup: float = 1.0, history_ema: float = 0.5,
                 shadow_window_rows: int = 16) -> None:
        self.model = model
        # History acceptance jumps (a new epoch brings a whole epoch of history): a faster EMA.
        self.history_ema = history_ema
        self.max_batch_size = max_batch_size
        self.min_speedup = min_speedup
        self.ema, self.coupling, self.window_rows = ema, coupling, window_rows
        self.probe_interval, self.probe_margin = probe_interval, probe_margin
        self.probe_max_plain_batch = probe_max_plain_batch
        self.clock = make_clock(model.profile.clock)
        self.profiled = dict(model.profile.acceptance)
        self.ratio = {key: 1.0 for key in self.profiled}
        self.bucket_ratio: dict[tuple[str, int], float] = {}  # history keys: (key, bucket) -> ratio
        # A bucket's estimate counts while at most bucket_memory updates of its config are newer.
        self.bucket_memory = 16
        self._updates: Counter[str] = Counter()
        self._bucket_updated: dict[tuple[str, int], int] = {}
        self.history_chains = {key: sd.num_steps for key, sd in model.configs.items()
                               if sd.source == "history" and sd.is_chain}
        self._window: dict[tuple[str, int, bool], list[int]] = defaultdict(lambda: [0, 0])  # [tokens, rows]
        self.shadow_window_rows = shadow_window_rows
        self._probe_turn = 0
        self._steps_since_probe = 0
        self.num_probes = 0
        self.num_resolves = 0
        self.total_steps: Counter[str] = Counter()
        self._reset_report()
        self._resolve()

    # estimates and plan
    @property
    def acceptance(self) -> dict[str, float]:
        return {key: max(1.0, self.profiled[key] * self.ratio[key]) for key in self.profiled}

    def acceptance_at(self, batch_size: int) -> dict[str, float]:
        """The estimates at this batch size (history configs: their bucket's, where seen)."""
        bucket = bucket_of(batch_size)
        out = {}
        for key in self.profiled:
            ratio = self.ratio[key]
            seen = self.bucket_ratio.get((key, bucket))
            # A bucket's own estimate only while it is recent: the history behind an old one
            # (an epoch ago, in a phase's tail) is not the history there is now.
            if seen is not None and self._updates[key] - self._bucket_updated[key, bucket] <= self.bucket_memory:
                ratio = seen
            out[key] = max(1.0, self.profiled[key] * ratio)
        return out

    def _resolve(self) -> None:
        self.estimates = self.acceptance
        # Solved lazily, per (batch size, refilling) when a step asks: a re-estimate only drops
        # the table (at B = 64 a window closes every SD step; solving all 2 x 64 entries each
        # time would cost more than the choice is worth).
        self._plan: dict[tuple[bool, int], tuple[SDConfig | None, float]] = {}
        self._estimates_at: dict[int, dict[str, float]] = {}
        self.num_resolves += 1

    def _estimates(self, batch_size: int) -> dict[str, float]:
        estimates = self._estimates_at.get(batch_size)
        if estimates is None:
            estimates = self._estimates_at[batch_size] = self.acceptance_at(batch_size)
        return estimates

    def planned(self, batch_size: int, refilling: bool = False) -> tuple[SDConfig | None, float]:
        """(the config, None = plain; its predicted speedup) the plan holds for this batch size."""
        entry = self._plan.get((refilling, batch_size))
        if entry is None:
            key, value = self.model.best(batch_size, self._estimates(batch_size), refilling, self.min_speedup)
            entry = self._plan[refilling, batch_size] = (self.model.configs.get(key), value)
        return entry

    def reset_estimates(self) -> None:
        """Back to the profiled acceptance (e.g. after a drafter whose quality is unknown)."""
        self.ratio = {key: 1.0 for key in self.profiled}
        self.bucket_ratio, self._bucket_updated = {}, {}
        self._resolve()

    def predicted_speedup(self, key: str, batch_size: int) -> float:
        return self.model.speedup(key, batch_size, self._estimates(batch_size))

    # per step
    def choose(self, batch_size: int, refilling: bool = False) -> SDConfig | None:
        """The config (None = plain) for a step of batch_size sequences; refilling: requests are
        waiting for slots, so rows that finish are replaced (and prefilled) next step."""
        if batch_size <= 0:
            return None
        index = min(batch_size, self.max_batch_size) - 1
        choice, best = self.planned(index + 1, refilling)
        self._steps_since_probe += 1
        if self.probe_interval and self._steps_since_probe >= self.probe_interval:
            # From plain decoding an EAGLE probe pays every row's drafter catch-up: only in small
            # batches. A history probe costs its verification alone.
            eagle_ok = choice is not None or batch_size <= self.probe_max_plain_batch
            probe = self._probe(index + 1, config_key(choice), best, refilling, eagle_ok)
            if probe is not None or eagle_ok:
                self._steps_since_probe = 0
            if probe is not None:
                self.num_probes += 1
                return probe
        return choice

    def _probe(self, batch_size: int, chosen: str, best: float, refilling: bool, eagle_ok: bool) -> SDConfig | None:
        keys = list(self.model.configs)
        estimates = self._estimates(batch_size)
        for offset in range(len(keys)):
            key = keys[(self._probe_turn + offset) % len(keys)]
            if key == chosen or not (eagle_ok or is_history(key)):
                continue
            if self.model.speedup(key, batch_size, estimates, refilling) >= self.probe_margin * best:
                self._probe_turn = (self._probe_turn + offset + 1) % len(keys)
                return self.model.configs[key]
        return None

    def observe(self, stats: StepStats, seconds: float | None = None) -> None:
        """Record one engine step (its StepStats, and its cost on the profile's clock)."""
        if stats.mode == "idle" or stats.num_active == 0:
            return
        key = config_key(stats.sd)
        batch_size = stats.num_active
        bucket = bucket_of(batch_size)
        self.total_steps[key] += 1
        self._steps[key] += 1
        if stats.sd is not None:
            source = self._sources[stats.sd.source]
            source["steps"] += 1
            source["rows"] += batch_size
            source["drafted"] += stats.num_drafted
            source["accepted"] += stats.num_accepted
            source["draft_s"] += stats.draft_s
            self._add_window(key, bucket if is_history(key) else -1, stats.num_accepted + batch_size, batch_size)
        if stats.shadow_counts:
            rows = sum(stats.shadow_counts)
            for chain_key, length in self.history_chains.items():
                tokens = sum((1 + min(m, length)) * n for m, n in enumerate(stats.shadow_counts))
                self._add_window(chain_key, bucket, tokens, rows, shadow=True)
        if seconds is not None and stats.num_admitted == 0:
            tokens_per_row = (stats.num_accepted + batch_size) / batch_size if stats.sd is not None else 1.0
            plain_s = tokens_per_row * self.model.plain(batch_size)
            self._plain_equiv_s += plain_s
            self._actual_s += seconds
            self._predicted_weighted += seconds * self.predicted_speedup(key, batch_size)

    def _add_window(self, key: str, bucket: int, tokens: int, rows: int, shadow: bool = False) -> None:
        # Shadows come a few rows a step: their windows are smaller, so an epoch's worth of new
        # history shows within a few dozen steps.
        window = self._window[key, bucket, shadow]
        window[0] += tokens
        window[1] += rows
        if window[1] >= (self.shadow_window_rows if shadow else self.window_rows):
            self._update(key, bucket, window[0] / window[1])
            window[0] = window[1] = 0

    def _update(self, key: str, bucket: int, observed: float) -> None:
        x = observed / self.profiled[key]
        if is_history(key):
            # Each history config is observed directly (chains through shadows too): no coupling,
            # and the other source's acceptance says nothing about this one.
            alpha = self.history_ema
            current = self.bucket_ratio.get((key, bucket))
            if current is None or self._updates[key] - self._bucket_updated[key, bucket] > self.bucket_memory:
                current = self.ratio[key]
            self.bucket_ratio[key, bucket] = (1 - alpha) * current + alpha * x
            self.ratio[key] = (1 - alpha) * self.ratio[key] + alpha * x
            self._updates[key] += 1
            self._bucket_updated[key, bucket] = self._updates[key]
        else:
            for other in self.ratio:
                if not is_history(other):
                    alpha = self.ema if other == key else self.ema * self.coupling
                    self.ratio[other] = (1 - alpha) * self.ratio[other] + alpha * x
        self._observed_acceptance[key].append(observed)
        self._resolve()

    # metrics
    def _reset_report(self) -> None:
        self._steps: Counter[str] = Counter()
        self._plain_equiv_s = self._actual_s = self._predicted_weighted = 0.0
        self._observed_acceptance: dict[str, list[float]] = defaultdict(list)
        self._sources = {source: Counter() for source in ("eagle", "history")}

    def report(self, reset: bool = True) -> dict[str, Any]:
        """Since the last report: decode steps, share per mode and per draft source (with its
        acceptance length, drafted and accepted tokens and drafting seconds per step),
        predicted and observed speedup over plain decoding; and the current acceptance
        estimates and plan."""
        steps = sum(self._steps.values())
        sources = {}
        for name, counts in self._sources.items():
            if counts["steps"]:
                sources[name] = {"share": round(counts["steps"] / steps, 4),
                                 "acceptance": round((counts["accepted"] + counts["rows"]) / counts["rows"], 3),
                                 "drafted": counts["drafted"], "accepted": counts["accepted"],
                                 "draft_s_per_step": round(counts["draft_s"] / counts["steps"], 6)}
        out = {
            "steps": steps,
            "share": {key: round(n / steps, 4) for key, n in sorted(self._steps.items())} if steps else {},
            "sources": sources,
            "predicted_speedup": round(self._predicted_weighted / self._actual_s, 4) if self._actual_s else None,
            "observed_speedup": round(self._plain_equiv_s / self._actual_s, 4) if self._actual_s else None,
            "observed_acceptance": {k: round(sum(v) / len(v), 3) for k, v in self._observed_acceptance.items()},
            "acceptance_estimate": {k: round(v, 3) for k, v in self.estimates.items()},
            "history_acceptance_by_bucket": {
                f"{key}@B{2 ** b}": round(max(1.0, self.profiled[key] * r), 3)
                for (key, b), r in sorted(self.bucket_ratio.items())
                if self._updates[key] - self._bucket_updated[key, b] <= self.bucket_memory},
            "plan": self._plan_summary(refilling=False),
            "plan_refilling": self._plan_summary(refilling=True),
            "probes": self.num_probes,
        }
        if reset:
            self._reset_report()
        return out

    def _plan_summary(self, refilling: bool) -> list[dict[str, Any]]:
        """The current plan (each batch size with its own bucket's estimates) as runs."""
        runs: list[dict[str, Any]] = []
        for b in range(1, self.max_batch_size + 1):
            sd, value = self.planned(b, refilling)
            key = config_key(sd)
            if runs and runs[-1]["choice"] == key:
                runs[-1]["to"] = b
            else:
                runs.append({"from": b, "to": b, "choice": key, "speedup": round(value, 3)})
        return runs


# ---- glue for the CLI and the generator ------------------------------------------------------

def task_prompts(config, num_prompts: int) -> list[list[int]]:
    """The first num_prompts training prompts of the run's data (token ids)."""
    from respec_async.prompts import PromptSource

    source = PromptSource(config)
    return [source.train_example(i).prompt_ids for i in range(num_prompts)]


def sampling_params(config, tokenizer):
    from respec_async.engine.sampling import SamplingParams

    s = config.sampling
    stop = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens,
                          stop_token_ids=stop)


def profile_for_config(config, target, drafter, tokenizer, *, repeats: int = 10, num_acceptance_prompts: int = 64,
                       clock: str | None = None, progress: Progress | None = None) -> Profile:
    """Profile the configured models on the run's task, sampling settings, batch sizes and grid
    (generator.sd_grid)."""
    g = config.generator
    configs = parse_grid(g.sd_grid)
    device = str(config.model.device)
    clock = clock or ("wall" if device.startswith("cuda") else "cpu")
    prompts = task_prompts(config, max(num_acceptance_prompts, g.max_batch_size))
    meta = {"target": config.model.path, "drafter": config.model.drafter_path, "device": device,
            "dtype": config.model.dtype, "max_batch_size": g.max_batch_size, "task": config.data.task,
            "num_threads": __import__("torch").get_num_threads()}
    return run_profile(target, drafter, configs, profile_batch_sizes(g.max_batch_size), prompts,
                       sampling_params(config, tokenizer), repeats=repeats,
                       num_acceptance_prompts=num_acceptance_prompts, clock=clock, seed=config.run.seed,
                       progress=progress, meta=meta, group_size=config.data.group_size)


def load_or_profile(config, target, drafter, tokenizer, run_dir: Path, log: Callable[..., None]) -> Profile:
    """The generator's profile: generator.sd_profile when set, else <run_dir>/sd_profile.json,
    measured now (a small grid run: 5 repeats, 16 acceptance prompts) unless an earlier
    generator of this run wrote it (a restart, another generator, --resume). A file lock keeps
    concurrent generators from profiling twice."""
    import fcntl

    profile, _ = generator_profile(config)
    if profile is not None:
        return profile
    path = Path(run_dir) / "sd_profile.json"
    with open(Path(run_dir) / ".sd_profile.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            log("sd.profile_reused", path=str(path))
            return Profile.load(path)
        log("sd.profiling", path=str(path), grid=list(config.generator.sd_grid))
        profile = profile_for_config(config, target, drafter, tokenizer, repeats=5, num_acceptance_prompts=16)
        profile.save(path)
        log("sd.profiled", path=str(path), seconds=profile.meta.get("seconds"))
        return profile


def profile_command(config, out: Path | None, *, repeats: int = 10, num_acceptance_prompts: int = 64,
                    clock: str | None = None) -> Path:
    """`respec profile`: resolve and load the run's target + drafter (the zoo when unset), profile
    them with a progress bar, print the table and fit, write the JSON; returns its path."""
    import copy

    import torch
    from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from respec_async.models import load_drafter, load_target, resolve_models

    config = copy.deepcopy(config)
    if config.generator.sd == "off":
        config.generator.sd = "adaptive"  # a profile needs the drafter: resolve it like an SD run
    config = resolve_models(config)
    torch.set_num_threads(config.generator.num_threads)
    target, tokenizer = load_target(config)
    drafter = load_drafter(config, target)
    configs = parse_grid(config.generator.sd_grid)
    total = profile_units(len(configs), len(profile_batch_sizes(config.generator.max_batch_size)), repeats)
    columns = (TextColumn("{task.description:<28}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with RichProgress(*columns) as bar:
        task = bar.add_task("profiling", total=total)
        profile = profile_for_config(config, target, drafter, tokenizer, repeats=repeats,
                                     num_acceptance_prompts=num_acceptance_prompts, clock=clock,
                                     progress=lambda n, what: bar.update(task, advance=n, description=what))
    print(format_profile(profile))
    if out is None:
        from respec_async.supervisor import create_run_dir

        config.run.name = f"{config.run.name}-profile"
        out = create_run_dir(config) / "sd_profile.json"
    path = profile.save(out)
    print(f"wrote {path} ({profile.meta['seconds']:.0f} s); use it with --set generator.sd=adaptive "
          f"--set generator.sd_profile={path}")
    return path


def generator_profile(config) -> tuple[Profile | None, list[SDConfig]]:
    """For an adaptive generator's setup: (the profile generator.sd_profile names, or None when
    it is to be measured at start; the SD configs the engine must fit). Errors name the key."""
    g = config.generator
    if g.sd_profile:
        try:
            profile = Profile.load(g.sd_profile)
        except (OSError, ValueError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"generator.sd_profile: cannot read the profile {g.sd_profile!r}: {exc}") from None
        return profile, profile.configs
    try:
        return None, parse_grid(g.sd_grid)
    except ValueError as exc:
        raise ValueError(f"generator.sd_grid: {exc}") from None


def scheduler_for(config, profile: Profile) -> AdaptiveScheduler:
    g = config.generator
    return AdaptiveScheduler(SpeedupModel(profile), g.max_batch_size, ema=g.sd_acceptance_ema,
                             probe_interval=g.sd_probe_interval, min_speedup=g.sd_min_speedup)


def profile_warnings(config, profile: Profile) -> list[str]:
    """What makes a profile a poor fit for this run (each a sentence naming the key)."""
    g, warnings = config.generator, []
    if max(profile.batch_sizes) < g.max_batch_size:
        warnings.append(f"the profile stops at batch size {max(profile.batch_sizes)} < generator.max_batch_size "
                        f"{g.max_batch_size}: larger batches are extrapolated from the fit")
    for key, name in (("target", "model.path"), ("drafter", "model.drafter_path")):
        measured = profile.meta.get(key)
        configured = getattr(config.model, name.split(".")[1])
        if measured and configured and Path(measured).resolve() != Path(configured).resolve():
            warnings.append(f"the profile measured {key} {measured}, the run uses {name} = {configured}")
    clock = "wall" if str(config.model.device).startswith("cuda") else "cpu"
    if profile.clock != clock:
        warnings.append(f"the profile's step costs are on the {profile.clock} clock, the run's device "
                        f"{config.model.device} would use {clock}")
    return warnings
