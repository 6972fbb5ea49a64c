"""The profiler: decode step cost of plain decoding and of every SD config of a grid at active
batch sizes 1, 2, 4, ..., max (modes timed round-robin on the same live batches), each
config's acceptance length on real rollouts of the task, and the admission (prefill) cost
(respec_async/sd/__init__.py has the whole picture)."""

from __future__ import annotations

import statistics
import time
from collections import Counter, defaultdict
from typing import Any, Callable, Sequence

from respec_async.engine.requests import SDConfig
from respec_async.sd.grid import FULL_WIDTH, PLAIN, config_key, engine_draft_budget, history_index_for
from respec_async.sd.profile import Profile, make_clock
from respec_async.sd.solver import SpeedupModel

Progress = Callable[[int, str], None]  # (units done since the last call, what is running)


def profile_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... below max_batch_size, and max_batch_size itself."""
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch_size]


def measure_step_costs(target, drafter, configs: Sequence[SDConfig], batch_sizes: Sequence[int],
                       prompts: Sequence[list[int]], params, *, repeats: int = 10, clock: str = "cpu",
                       context_len: int = 96, seed: int = 0,
                       progress: Progress | None = None) -> tuple[list[float], dict[str, list[float]]]:
    """Median seconds of one decode step per mode (plain, then each config) and batch size.

    Every repetition steps each batch size's live batch once in every mode, the mode order
    rotating between repetitions; a batch is restarted (fresh prompts, new engine) before its
    longest sequence would pass context_len, so no sequence ever finishes and B stays B."""
    from respec_async.engine.engine import Engine
    from respec_async.engine.requests import Request
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
                assert len(engine.slots.running) == batch_size, "a profiled sequence finished early"
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
    from respec_async.engine.engine import Engine
    from respec_async.engine.requests import Request

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
    from respec_async.engine.engine import Engine
    from respec_async.engine.requests import Request

    now = make_clock(clock)
    ks = sorted({1, min(4, max_batch_size)})
    extra: dict[int, list[float]] = defaultdict(list)
    max_seq_len = max(len(p) for p in prompts) + 8
    for rep in range(repeats + 1):
        for k in ks:
            engine = Engine(target, drafter, max_batch_size=max_batch_size, max_seq_len=max_seq_len, seed=seed,
                            max_draft_tokens=engine_draft_budget(configs), history=history_index_for(configs),
                            share_prompts=False)  # the cost of a prefill per request
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
