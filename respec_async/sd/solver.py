"""The solver: per mode m, T_m(B) = a_m + b_m * B ** p_m fitted to the profiled step costs, and
the predicted speedup S_c(B) = L_c * T_plain(B) / T_c(B) of each SD config over plain decoding,
with the admission cost of a refilling phase (respec_async/sd/__init__.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from respec_async.sd.grid import PLAIN, config_key
from respec_async.sd.profile import Profile


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

    def admission_cost(self, num_admitted: int) -> float | None:
        """The profiled cost of admitting (prefilling) num_admitted requests in one step; None
        when the profile did not measure it."""
        if num_admitted == 0:
            return 0.0
        admission = self.profile.admission
        return admission["a"] + num_admitted * admission["b"] if admission else None

    def speedup(self, key: str, batch_size: float, acceptance: dict[str, float] | None = None,
                refilling: bool = False, cost_scale: dict[str, float] | None = None) -> float:
        """Predicted throughput of `key` over plain decoding at this batch size; with refilling,
        each step also pays the expected admission cost of the slots its finished rows free.
        cost_scale: observed over fitted step cost per mode (PLAIN included), 1 where absent."""
        if key == PLAIN:
            return 1.0
        length = self.tokens_per_row(key, acceptance)
        plain_s, sd_s = self.plain(batch_size), self.cost[key](batch_size)
        if cost_scale:
            plain_s *= cost_scale.get(PLAIN, 1.0)
            sd_s *= cost_scale.get(key, 1.0)
        if refilling:
            plain_s += self.admission_seconds(batch_size, 1.0)
            sd_s += self.admission_seconds(batch_size, length)
        return length * plain_s / sd_s

    def best(self, batch_size: float, acceptance: dict[str, float] | None = None,
             refilling: bool = False, min_speedup: float = 1.0,
             cost_scale: dict[str, float] | None = None) -> tuple[str, float]:
        """(PLAIN or the best config's key, its predicted speedup) at this batch size; a config
        is chosen only if its predicted speedup exceeds min_speedup."""
        choice, value = PLAIN, 1.0
        for key in self.cost:
            s = self.speedup(key, batch_size, acceptance, refilling, cost_scale)
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
        return plan_runs(self.plan(max_batch_size, acceptance, refilling, min_speedup))

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


def plan_runs(choices: Iterable[tuple[str, float]]) -> list[dict[str, Any]]:
    """(key, predicted speedup) for B = 1, 2, ... as runs of batch sizes with the same choice:
    [{from, to, choice, speedup}, ...] (speedup at the run's first batch size)."""
    runs: list[dict[str, Any]] = []
    for b, (key, value) in enumerate(choices, start=1):
        if runs and runs[-1]["choice"] == key:
            runs[-1]["to"] = b
        else:
            runs.append({"from": b, "to": b, "choice": key, "speedup": round(value, 3)})
    return runs


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
