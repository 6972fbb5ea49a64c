"""The per-step scheduler: the planned SD choice for the active batch size, with acceptance
re-estimated online and probes of unplanned configs (respec_async/sd/__init__.py)."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from respec_async.engine.requests import SDConfig, StepStats
from respec_async.sd.grid import PLAIN, bucket_of, config_key, is_history
from respec_async.sd.profile import make_clock
from respec_async.sd.solver import SpeedupModel, plan_runs



def prefill_equivalents(stats: StepStats) -> int:
    """Admissions a step paid as full prefills: the prefilled ones, and one for the one-token
    forward of the samples that took a sibling's prompt (the profile prefills every request)."""
    if stats.num_prefilled is None:
        return stats.num_admitted
    return stats.num_prefilled + (stats.num_admitted > stats.num_prefilled)

class AdaptiveScheduler:
    """Per-step SD choice from the fitted model, with acceptance re-estimated online.

    EAGLE configs share one drafter, so an acceptance seen through one moves the other EAGLE
    configs too (`coupling`). A history config's acceptance depends on how much history exists,
    which changes with the batch size within a phase and between epochs: it is estimated per
    batch-size bucket (`bucket_of`) with a faster EMA (`history_ema`), from its own verify steps
    and, for chains, from the engine's shadow chains (StepStats.shadow_tests/hits: free samples
    of a chain's acceptance, taken in every step whatever its mode), and a history config may be
    probed at any batch size (it needs no drafter catch-up).

    History configs' step costs are re-estimated online too, per bucket, relative to plain
    decoding's (`cost_ema`, over windows of `cost_window_steps` steps, net of the profiled
    admission cost of the rows a step admitted): the profile prices a history step at full
    width, but a packed step costs what its rows drafted, less as history grows. EAGLE
    configs keep their profiled cost: an EAGLE step after plain ones also pays the drafter's
    catch-up, which is not the config's cost."""

    def __init__(self, model: SpeedupModel, max_batch_size: int, *, ema: float = 0.2, coupling: float = 0.5,
                 window_rows: int = 64, probe_interval: int = 64, probe_margin: float = 0.75,
                 probe_max_plain_batch: int = 4, min_speedup: float = 1.0, history_ema: float = 0.5,
                 shadow_window_rows: int = 16, shadow_min_tests: int = 4, cost_ema: float = 0.3,
                 cost_window_steps: int = 8, switch_margin: float = 0.1,
                 chain_switch_margin: float = 0.03) -> None:
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
        self._window: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])  # [tokens, rows]
        self.shadow_window_rows = shadow_window_rows
        self.shadow_min_tests = shadow_min_tests
        self._shadow_window: dict[int, list[list[int]]] = defaultdict(list)  # bucket -> [[tests, hits] per position]
        self.cost_ema, self.cost_window_steps = cost_ema, cost_window_steps
        self.cost_ratio: dict[tuple[str, int], float] = {}  # (plain or history key, bucket) -> observed / fitted
        self._cost_window: dict[tuple[str, int], list] = defaultdict(lambda: [0.0, 0.0, 0])  # [seconds, fitted, steps]
        self.switch_margin = switch_margin
        # Between two history chains a smaller margin: both are priced from one per-position
        # estimate (the shadows), so their noise is shared and only the deep positions differ.
        self.chain_switch_margin = chain_switch_margin
        self._last_choice: dict[tuple[bool, int], str] = {}  # (refilling, B) -> the SD config chosen last
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
        self._cost_scale_at: dict[int, dict[str, float]] = {}
        self.num_resolves += 1

    def _estimates(self, batch_size: int) -> dict[str, float]:
        estimates = self._estimates_at.get(batch_size)
        if estimates is None:
            estimates = self._estimates_at[batch_size] = self.acceptance_at(batch_size)
        return estimates

    def _cost_scale(self, batch_size: int) -> dict[str, float]:
        """History configs' observed cost over fitted, relative to plain decoding's at this
        bucket (any bucket's where not seen here): what is common to every step (a slower
        machine, the index upkeep, shadow chains) cancels, and plain and EAGLE keep the
        profile's costs, so the comparison between them is the profile's."""
        scale = self._cost_scale_at.get(batch_size)
        if scale is None:
            bucket = bucket_of(batch_size)
            plain = self.cost_ratio.get((PLAIN, bucket))
            if plain is None:
                seen = [r for (key, _), r in self.cost_ratio.items() if key == PLAIN]
                plain = sum(seen) / len(seen) if seen else 1.0
            scale = self._cost_scale_at[batch_size] = {
                key: r / plain for (key, b), r in self.cost_ratio.items() if b == bucket and key != PLAIN}
            # A history chain not run here takes the ones that ran: packing saves alike on
            # every chain (trees are verified at full width), and one left at its full-width
            # price would never be chosen over a chain that ran (hysteresis then keeps the
            # first chain whatever its length).
            seen = [r for key, r in scale.items() if key in self.history_chains]
            if seen:
                for key in self.history_chains:
                    scale.setdefault(key, sum(seen) / len(seen))
        return scale

    def planned(self, batch_size: int, refilling: bool = False) -> tuple[SDConfig | None, float]:
        """(the config, None = plain; its predicted speedup) the plan holds for this batch size."""
        entry = self._plan.get((refilling, batch_size))
        if entry is None:
            estimates, scale = self._estimates(batch_size), self._cost_scale(batch_size)
            key, value = self.model.best(batch_size, estimates, refilling, self.min_speedup, scale)
            # Hysteresis between SD configs: the last choice at this batch size stays while it is
            # predicted within switch_margin of the best. Two history chains fed by the same
            # noisy estimates otherwise alternate, and each switch lands on whichever happens to
            # be overestimated.
            last = self._last_choice.get((refilling, batch_size))
            if last is not None and last != key and key != PLAIN:
                kept = self.model.speedup(last, batch_size, estimates, refilling, scale)
                chains = last in self.history_chains and key in self.history_chains
                margin = self.chain_switch_margin if chains else self.switch_margin
                if kept * (1 + margin) >= value and kept > self.min_speedup:
                    key, value = last, kept
            entry = self._plan[refilling, batch_size] = (self.model.configs.get(key), value)
        return entry

    def reset_estimates(self) -> None:
        """Back to the profiled acceptance (e.g. after a drafter whose quality is unknown)."""
        self.ratio = {key: 1.0 for key in self.profiled}
        self.bucket_ratio, self._bucket_updated = {}, {}
        self._last_choice = {}
        self._resolve()

    def predicted_speedup(self, key: str, batch_size: int) -> float:
        return self.model.speedup(key, batch_size, self._estimates(batch_size), cost_scale=self._cost_scale(batch_size))

    # per step
    def choose(self, batch_size: int, refilling: bool = False) -> SDConfig | None:
        """The config (None = plain) for a step of batch_size sequences; refilling: requests are
        waiting for slots, so rows that finish are replaced (and prefilled) next step."""
        if batch_size <= 0:
            return None
        index = min(batch_size, self.max_batch_size) - 1
        choice, best = self.planned(index + 1, refilling)
        if choice is not None:  # what hysteresis keeps: choices steps ran, not plans a report read
            self._last_choice[refilling, index + 1] = config_key(choice)
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
            if self.model.speedup(key, batch_size, estimates, refilling,
                                  self._cost_scale(batch_size)) >= self.probe_margin * best:
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
        if stats.shadow_tests and self.history_chains:
            self._add_shadows(bucket, stats.shadow_tests, stats.shadow_hits)
        if seconds is not None and (stats.sd is None or (is_history(key) and key in self.model.cost)):
            # A step that admitted counts net of the profiled admission cost: while a phase
            # refills its slots (most of its steps at full batch) nearly every step admits.
            admission_s = self.model.admission_cost(prefill_equivalents(stats))
            fitted = self.model.step_seconds(key, batch_size)
            if admission_s is not None and seconds - admission_s > 0.25 * fitted:
                self._add_cost(key, bucket, seconds - admission_s, fitted)
        if seconds is not None and stats.num_admitted == 0:
            tokens_per_row = (stats.num_accepted + batch_size) / batch_size if stats.sd is not None else 1.0
            plain_s = tokens_per_row * self.model.plain(batch_size)
            self._plain_equiv_s += plain_s
            self._actual_s += seconds
            self._predicted_weighted += seconds * self.predicted_speedup(key, batch_size)

    def _add_window(self, key: str, bucket: int, tokens: int, rows: int) -> None:
        window = self._window[key, bucket]
        window[0] += tokens
        window[1] += rows
        if window[1] >= self.window_rows:
            self._update(key, bucket, window[0] / window[1])
            window[0] = window[1] = 0

    def _add_shadows(self, bucket: int, tests: list[int], hits: list[int]) -> None:
        """Shadow comparisons per draft position; when a window's first position has seen
        shadow_window_rows tests, each history chain's acceptance is 1 + sum over k <= length
        of the chance that its first k drafts match, the product of the per-position match
        rates (a Kaplan-Meier estimate: a shadow still pending, or cut by its row's end, counts
        at the positions it reached). Positions the window has too few tests of take the
        deepest well-measured position's rate: a chain that got that far tends to go on."""
        window = self._shadow_window[bucket]
        for j, (n, h) in enumerate(zip(tests, hits)):
            while len(window) <= j:
                window.append([0, 0])
            window[j][0] += n
            window[j][1] += h
        if window[0][0] < self.shadow_window_rows:
            return
        rates = []
        for n, h in window:
            if n < self.shadow_min_tests:
                break
            rates.append(h / n)
        del self._shadow_window[bucket]
        if not rates:  # (shadow_min_tests above the window: nothing measured well enough)
            return
        for key, length in self.history_chains.items():
            acceptance, survive = 1.0, 1.0
            for k in range(length):
                survive *= rates[min(k, len(rates) - 1)]
                acceptance += survive
            self._update(key, bucket, acceptance)

    def _add_cost(self, key: str, bucket: int, seconds: float, fitted: float) -> None:
        window = self._cost_window[key, bucket]
        window[0] += seconds
        window[1] += fitted
        window[2] += 1
        if window[2] >= self.cost_window_steps:
            x = window[0] / window[1]
            current = self.cost_ratio.get((key, bucket), 1.0)
            self.cost_ratio[key, bucket] = (1 - self.cost_ema) * current + self.cost_ema * x
            window[0] = window[1] = window[2] = 0
            self._resolve()

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
            "cost_ratio": {f"{key}@B{2 ** b}": round(r, 3) for (key, b), r in sorted(self.cost_ratio.items())},
            "plan": self._plan_summary(refilling=False),
            "plan_refilling": self._plan_summary(refilling=True),
            "probes": self.num_probes,
        }
        if reset:
            self._reset_report()
        return out

    def _plan_summary(self, refilling: bool) -> list[dict[str, Any]]:
        """The current plan (each batch size with its own bucket's estimates) as runs."""
        return plan_runs((config_key(sd), value) for sd, value in
                         (self.planned(b, refilling) for b in range(1, self.max_batch_size + 1)))
