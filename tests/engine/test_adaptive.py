"""The adaptive SD server: solver (fit, fit error, argmax choice), scheduler (switching with the
batch size, online acceptance re-estimation, probes, metrics) and the profiler on a real engine."""

from __future__ import annotations

import json

import pytest
import torch

from respec_async.profiling import profile_warnings
from respec_async.sd.grid import PLAIN, config_key, engine_draft_budget, parse_grid
from respec_async.sd.measure import measure_step_costs, profile_batch_sizes, profile_units, run_profile
from respec_async.sd.profile import Profile
from respec_async.sd.scheduler import AdaptiveScheduler
from respec_async.sd.solver import CostFit, SpeedupModel, fit_cost
from respec_async.config import ConfigError, config_from_dict
from respec_async.engine.engine import Engine
from respec_async.engine.requests import Request, SDConfig, StepStats
from respec_async.engine.history import HistoryIndex
from respec_async.engine.sampling import SamplingParams
from tests.engine.test_engine import tiny_models

SIZES = [1, 2, 4, 8, 16, 32, 64]
# Step costs (ms) a + b * B: SD has more fixed cost per step and more work per row, so it wins
# at small B (acceptance pays for the overhead) and loses at large B.
PLAIN_COST = CostFit(4.0, 0.15, 1.0)
COSTS = {"4,1,4": CostFit(9.0, 0.80, 1.0), "2,1,2": CostFit(6.5, 0.40, 1.0)}
ACCEPTANCE = {"4,1,4": 3.2, "2,1,2": 2.2}


def synthetic_profile(noise: dict[tuple[str, int], float] | None = None, acceptance=None) -> Profile:
    noise = noise or {}

    def seconds(key, fit):
        return [fit(b) * 1e-3 * (1 + noise.get((key, b), 0.0)) for b in SIZES]

    return Profile(batch_sizes=SIZES, plain_s=seconds(PLAIN, PLAIN_COST),
                   sd_s={key: seconds(key, fit) for key, fit in COSTS.items()},
                   acceptance=dict(acceptance or ACCEPTANCE))


def step(sd: SDConfig | None, batch_size: int, accepted_per_row: float = 0.0, admitted: int = 0) -> StepStats:
    num_accepted = round(accepted_per_row * batch_size) if sd is not None else 0
    return StepStats("sd" if sd is not None else "plain", sd, batch_size, admitted, batch_size + num_accepted, 0.0,
                     num_accepted)


def test_fit_recovers_an_exact_cost_curve_and_reports_zero_error():
    fit = fit_cost(SIZES, [PLAIN_COST(b) for b in SIZES])
    assert fit.p == pytest.approx(1.0) and fit.a == pytest.approx(4.0) and fit.b == pytest.approx(0.15)
    curved = [2.0 + 0.5 * b ** 0.5 for b in SIZES]  # sublinear growth: p is fitted too
    fit = fit_cost(SIZES, curved)
    assert fit.p == pytest.approx(0.5) and max(abs(fit(b) - t) / t for b, t in zip(SIZES, curved)) < 1e-9
    error = SpeedupModel(synthetic_profile()).fit_error()
    assert error["step_time"]["max"] < 1e-9 and error["speedup"]["max"] < 1e-9
    assert error["step_time_leave_one_out"]["max"] < 1e-9
    assert error["worst_choice_ratio"] == pytest.approx(1.0)


def test_fit_error_is_the_relative_error_against_the_measurements():
    noisy = synthetic_profile({("4,1,4", 8): 0.30, (PLAIN, 2): -0.20})
    model = SpeedupModel(noisy)
    error = model.fit_error()
    measured = noisy.sd_s["4,1,4"][SIZES.index(8)]
    by_hand = abs(model.step_seconds("4,1,4", 8) - measured) / measured
    assert error["step_time"]["per_mode"]["4,1,4"]["max"] == pytest.approx(by_hand)
    assert 0.05 < by_hand < 0.35
    assert error["step_time"]["max"] >= by_hand and error["speedup"]["mean"] > 0
    # The fit smooths the outlier: its prediction sits between the noisy point and the clean curve.
    assert COSTS["4,1,4"](8) * 1e-3 < model.step_seconds("4,1,4", 8) < measured


def test_solver_picks_the_argmax_of_predicted_speedup_and_plain_where_sd_loses():
    model = SpeedupModel(synthetic_profile())
    plan = model.plan(64)
    seen = set()
    for b in range(1, 65):
        by_hand = {key: ACCEPTANCE[key] * PLAIN_COST(b) / COSTS[key](b) for key in COSTS}
        best = max(by_hand, key=by_hand.get)
        expected = best if by_hand[best] > 1.0 else PLAIN
        assert plan[b - 1][0] == expected, (b, by_hand)
        assert plan[b - 1][1] == pytest.approx(max(1.0, by_hand[best]))
        seen.add(expected)
    assert seen == {"4,1,4", "2,1,2", PLAIN}  # the synthetic costs make every option win somewhere
    assert plan[0][0] == "4,1,4" and plan[-1][0] == PLAIN
    summary = model.plan_summary(64)
    assert [r["choice"] for r in summary] == ["4,1,4", "2,1,2", PLAIN]
    assert summary[0]["from"] == 1 and summary[-1]["to"] == 64


def test_admission_cost_while_slots_refill_favours_sd_at_large_batch_sizes():
    # A prefill costs 10 ms per admitting step; rollouts are 40 tokens long. Plain decoding at
    # B = 64 finishes 1.6 rows per step and pays it in 80% of its steps; the 2-step chain emits
    # 2.2x the tokens per step, so it pays the same cost per step for 2.2x the tokens.
    profile = synthetic_profile()
    profile.admission, profile.completion_tokens = {"a": 0.010, "b": 0.0}, 40.0
    model = SpeedupModel(profile)
    assert model.plan(64)[-1][0] == PLAIN
    choice, speedup = model.best(64, refilling=True)
    n_plain, n_sd = 64 / 40, 64 * 2.2 / 40
    by_hand = 2.2 * (PLAIN_COST(64) + 10 * (1 - torch.exp(torch.tensor(-n_plain)).item())) / (
        COSTS["2,1,2"](64) + 10 * (1 - torch.exp(torch.tensor(-n_sd)).item()))
    assert choice == "2,1,2" and speedup == pytest.approx(by_hand, rel=1e-5) and by_hand > 1
    scheduler = AdaptiveScheduler(model, 64, probe_interval=0)
    assert scheduler.choose(64) is None and scheduler.choose(64, refilling=True) == SDConfig(2, 1, 2)
    # Without a measured admission cost the two plans agree.
    assert SpeedupModel(synthetic_profile()).plan(64, refilling=True) == SpeedupModel(synthetic_profile()).plan(64)


def test_scheduler_switches_with_the_active_batch_size():
    scheduler = AdaptiveScheduler(SpeedupModel(synthetic_profile()), 64, probe_interval=0)
    assert scheduler.choose(1) == SDConfig(4, 1, 4)
    assert scheduler.choose(12) == SDConfig(2, 1, 2)
    assert scheduler.choose(64) is None
    assert scheduler.choose(500) is None  # beyond the plan: its last entry
    assert scheduler.choose(0) is None


def test_min_speedup_keeps_sd_off_where_its_predicted_gain_is_within_the_margin():
    model = SpeedupModel(synthetic_profile())
    plan = model.plan(64)
    margin = 1.2
    assert any(key != PLAIN and value <= margin for key, value in plan)  # some gains are marginal
    scheduler = AdaptiveScheduler(model, 64, probe_interval=0, min_speedup=margin)
    for batch_size, (key, value) in enumerate(plan, start=1):
        assert scheduler.choose(batch_size) == (model.configs[key] if value > margin else None)
    assert scheduler.choose(1) == SDConfig(4, 1, 4)  # a clear gain stays
    assert all(run["choice"] == PLAIN or run["speedup"] > margin for run in scheduler.report()["plan"])
    with pytest.raises(ConfigError, match=r"generator\.sd_min_speedup"):
        config_from_dict({"generator": {"sd_min_speedup": 0.9}})


def test_online_acceptance_drop_moves_the_choice_and_recovery_moves_it_back():
    scheduler = AdaptiveScheduler(SpeedupModel(synthetic_profile()), 64, ema=0.3, window_rows=8, probe_interval=0)
    chain4 = SDConfig(4, 1, 4)
    assert scheduler.choose(2) == chain4
    # The live drafter now accepts almost nothing through the 4-step chain.
    for _ in range(40):
        scheduler.observe(step(chain4, 2, accepted_per_row=0.0), 0.01)
    assert scheduler.acceptance["4,1,4"] < 1.3
    # The drop also lowers the other config's estimate (shared drafter), only more slowly.
    assert 1.0 <= scheduler.acceptance["2,1,2"] < ACCEPTANCE["2,1,2"]
    assert scheduler.acceptance["2,1,2"] / ACCEPTANCE["2,1,2"] > scheduler.acceptance["4,1,4"] / ACCEPTANCE["4,1,4"]
    assert scheduler.choose(2) != chain4
    assert scheduler.report()["observed_acceptance"]["4,1,4"] == pytest.approx(1.0)
    # Good acceptance through the short chain brings the estimates back up.
    chain2 = SDConfig(2, 1, 2)
    for _ in range(40):
        scheduler.observe(step(chain2, 2, accepted_per_row=ACCEPTANCE["2,1,2"] - 1), 0.01)
    assert scheduler.choose(2) in (chain2, chain4)
    scheduler.reset_estimates()
    assert scheduler.acceptance == ACCEPTANCE and scheduler.choose(2) == chain4


def test_probes_try_an_unplanned_config_every_interval():
    scheduler = AdaptiveScheduler(SpeedupModel(synthetic_profile()), 64, probe_interval=5, probe_margin=0.5)
    choices = [scheduler.choose(1) for _ in range(20)]
    probes = [i for i, c in enumerate(choices) if c != SDConfig(4, 1, 4)]
    assert probes == [4, 9, 14, 19] and all(choices[i] == SDConfig(2, 1, 2) for i in probes)
    assert scheduler.num_probes == 4
    # A config predicted far below the best is not worth a probe.
    strict = AdaptiveScheduler(SpeedupModel(synthetic_profile()), 64, probe_interval=5, probe_margin=1.0)
    assert all(strict.choose(1) == SDConfig(4, 1, 4) for _ in range(20))



def test_a_probe_from_plain_decoding_waits_for_a_small_batch():
    """Where the plan has SD off, a probe would catch every row's drafter up: it waits until at
    most probe_max_plain_batch rows are active, then runs at once."""
    scheduler = AdaptiveScheduler(SpeedupModel(synthetic_profile()), 64, probe_interval=5, probe_margin=0.1,
                                  probe_max_plain_batch=4)
    assert [scheduler.choose(64) for _ in range(20)] == [None] * 20  # plan: plain at 64, no probe
    assert scheduler.num_probes == 0
    assert scheduler.choose(40) is None  # still plain territory: the probe keeps waiting
    probe = scheduler.choose(3)  # the tail: the pending probe runs (a config other than the plan's)
    assert probe is not None and probe != scheduler.planned(3)[0] and scheduler.num_probes == 1


def test_report_gives_mode_shares_and_predicted_vs_observed_speedup():
    model = SpeedupModel(synthetic_profile())
    scheduler = AdaptiveScheduler(model, 64, probe_interval=0, window_rows=10 ** 6)
    chain4 = SDConfig(4, 1, 4)
    plain_s = model.plain(64)
    for _ in range(3):  # plain at B=64, exactly as fast as the profile says
        scheduler.observe(step(None, 64), plain_s)
    # SD at B=5: emits 1 + 1.2 tokens per row (the profile said 3.2) in the profiled time.
    sd_s = model.step_seconds("4,1,4", 5)
    scheduler.observe(step(chain4, 5, accepted_per_row=1.2), sd_s)
    scheduler.observe(step(None, 8, admitted=2), 1.0)  # a prefill step: counted, not timed
    report = scheduler.report()
    assert report["steps"] == 5
    assert report["share"] == {PLAIN: 0.8, "4,1,4": 0.2}
    plain_equiv = 3 * plain_s + 2.2 * model.plain(5)
    assert report["observed_speedup"] == pytest.approx(plain_equiv / (3 * plain_s + sd_s), rel=1e-3)
    predicted = (3 * plain_s * 1.0 + sd_s * model.speedup("4,1,4", 5)) / (3 * plain_s + sd_s)
    assert report["predicted_speedup"] == pytest.approx(predicted, rel=1e-3)
    assert report["observed_speedup"] < report["predicted_speedup"]  # fewer tokens than predicted
    assert scheduler.report()["steps"] == 0  # the window resets
    assert sum(scheduler.total_steps.values()) == 5


def test_profile_json_round_trips_and_rejects_a_malformed_file(tmp_path):
    profile = synthetic_profile()
    path = profile.save(tmp_path / "p.json")
    loaded = Profile.load(path)
    assert loaded == profile and loaded.configs == [SDConfig(4, 1, 4), SDConfig(2, 1, 2)]
    blob = json.loads(path.read_text())
    blob["plain_s"] = blob["plain_s"][:-1]
    path.write_text(json.dumps(blob))
    with pytest.raises(ValueError, match="one step time per batch size"):
        Profile.load(path)


def test_grid_parsing_batch_sizes_and_engine_budget():
    assert parse_grid(["3,1,3", "4,2,8", "3,1,3", "2,1"]) == [SDConfig(3, 1, 3), SDConfig(4, 2, 8), SDConfig(2, 1, 2)]
    with pytest.raises(ValueError, match="'3,2,99'"):
        parse_grid(["3,2,99"])
    assert profile_batch_sizes(64) == SIZES and profile_batch_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
    assert profile_batch_sizes(1) == [1]
    assert engine_draft_budget([SDConfig(5, 8, 32)]) == 64 and engine_draft_budget([SDConfig(9, 16, 80)]) == 128
    assert config_key(None) == PLAIN and config_key(SDConfig(3, 2, 4)) == "3,2,4"


def test_profiler_measures_every_cell_on_a_real_engine_and_the_scheduler_drives_it():
    target, drafter = tiny_models()
    configs = [SDConfig(2, 1, 2), SDConfig(2, 2, 3)]
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    params = SamplingParams(temperature=1.0, max_new_tokens=12, stop_token_ids=(0,))
    done = []
    profile = run_profile(target, drafter, configs, [1, 2, 4], prompts, params, repeats=2, num_acceptance_prompts=4,
                          context_len=40, progress=lambda n, what: done.append(n))
    assert sum(done) == profile_units(len(configs), 3, 2)
    assert profile.batch_sizes == [1, 2, 4] and set(profile.sd_s) == {"2,1,2", "2,2,3"}
    assert all(t > 0 for t in profile.plain_s) and all(t > 0 for v in profile.sd_s.values() for t in v)
    assert all(1.0 <= a <= 3.0 for a in profile.acceptance.values())
    assert 1 <= profile.completion_tokens <= 12 and profile.admission["a"] >= 0 and profile.admission["b"] >= 0
    assert profile.fit["error"]["step_time"]["mean"] >= 0 and profile.fit["plan"][0]["from"] == 1
    # The scheduler's choices drive one engine through a whole generation, switching freely.
    scheduler = AdaptiveScheduler(SpeedupModel(profile), 4, probe_interval=2, probe_margin=0.0)
    engine = Engine(target, drafter, max_batch_size=4, max_seq_len=64, max_draft_tokens=engine_draft_budget(configs))
    from respec_async.engine.requests import Request
    for i, p in enumerate(prompts * 2):
        engine.add_request(Request(i, p, params))
    while engine.has_unfinished:
        engine.step(scheduler.choose(engine.num_active))
        scheduler.observe(engine.step_stats[-1], 0.001)
    report = scheduler.report()
    assert report["steps"] == sum(scheduler.total_steps.values()) > 0
    assert len(report["share"]) >= 2 and sum(report["share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert torch.is_tensor(engine.lengths)


def test_profile_warnings_name_what_does_not_match_the_run():
    from respec_async.config import load_config

    profile = synthetic_profile()
    profile.meta = {"target": "/models/a", "drafter": "/models/d"}
    config = load_config("configs/tiny.toml", ["generator.sd=adaptive", "model.path=/models/a",
                                               "model.drafter_path=/models/d"])
    assert profile_warnings(config, profile) == []
    config.generator.max_batch_size, config.model.path = 128, "/models/b"
    warnings = profile_warnings(config, profile)
    assert len(warnings) == 2 and "generator.max_batch_size 128" in warnings[0] and "model.path" in warnings[1]


def history_profile(history_acceptance: float = 1.2) -> Profile:
    """The synthetic profile plus a history chain whose step costs about a third more than
    plain and whose profiled (first-epoch) acceptance is low."""
    profile = synthetic_profile()
    profile.sd_s["history:8,1,8"] = [PLAIN_COST(b) * 1.35e-3 for b in SIZES]
    profile.acceptance["history:8,1,8"] = history_acceptance
    return profile


def test_history_configs_parse_key_and_validate():
    sd = parse_grid(["history:8,1,8"])[0]
    assert sd == SDConfig(8, 1, 8, "history") and config_key(sd) == "history:8,1,8" and not sd.uses_drafter
    assert config_key(SDConfig(3, 1, 3)) == "3,1,3"
    assert engine_draft_budget([SDConfig(64, 1, 64, "history")]) == 64
    with pytest.raises(ValueError, match="history:0,1,1"):
        parse_grid(["history:0,1,1"])
    config = config_from_dict({"generator": {"sd": "adaptive", "sd_grid": ["3,1,3", "history:8,1,8"]}})
    assert config.generator.sd_grid == ["3,1,3", "history:8,1,8"]
    with pytest.raises(ConfigError, match=r"generator\.sd_grid"):
        config_from_dict({"generator": {"sd_grid": ["histroy:8,1,8"]}})
    with pytest.raises(ConfigError, match=r"generator\.sd_source"):
        config_from_dict({"generator": {"sd": "static", "sd_source": "ngram"}})
    with pytest.raises(ConfigError, match="roles.drafter_learner.*history only"):
        config_from_dict({"roles": {"drafter_learner": 1},
                          "generator": {"sd": "static", "sd_source": "history"}})


def test_history_acceptance_is_estimated_per_batch_size_bucket_apart_from_eagle():
    scheduler = AdaptiveScheduler(SpeedupModel(history_profile()), 64, ema=0.5, window_rows=8, probe_interval=0)
    chain = SDConfig(8, 1, 8, "history")
    assert scheduler.choose(2) != chain  # at the profiled 1.2 history loses everywhere
    eagle_before = {k: v for k, v in scheduler.acceptance.items() if not k.startswith("history")}
    for _ in range(40):  # at B = 2 history now accepts 5 drafts a step (a second epoch)
        scheduler.observe(step(chain, 2, accepted_per_row=5.0), 0.01)
    assert scheduler.acceptance_at(2)["history:8,1,8"] == pytest.approx(6.0, rel=0.01)
    assert scheduler.choose(2) == chain
    # History says nothing about the drafter: EAGLE's estimates did not move.
    assert {k: v for k, v in scheduler.acceptance.items() if not k.startswith("history")} == eagle_before
    # A bucket that then sees history fail goes back to plain or EAGLE there, the others keep it.
    for _ in range(6):
        scheduler.observe(step(chain, 40, accepted_per_row=0.0), 0.01)
    assert scheduler.acceptance_at(40)["history:8,1,8"] < 1.1 and scheduler.choose(2) == chain
    assert "history:8,1,8@B2" in scheduler.report(reset=False)["history_acceptance_by_bucket"]
    # Until the B = 2 estimate is too old (bucket_memory newer updates): then the overall one counts.
    for _ in range(scheduler.bucket_memory):
        scheduler.observe(step(chain, 40, accepted_per_row=0.0), 0.01)
    assert scheduler.acceptance_at(2)["history:8,1,8"] == pytest.approx(scheduler.acceptance["history:8,1,8"])
    assert scheduler.choose(2) != chain
    assert "history:8,1,8@B2" not in scheduler.report()["history_acceptance_by_bucket"]


def test_shadow_chains_of_plain_steps_estimate_history_acceptance():
    """A plain step's shadow comparisons (per draft position: tests and matches) update every
    history chain's estimate, capped at its length: the plan moves to history without a probe."""
    profile = history_profile()
    profile.sd_s["history:4,1,4"] = [PLAIN_COST(b) * 1.2e-3 for b in SIZES]
    profile.acceptance["history:4,1,4"] = 1.2
    scheduler = AdaptiveScheduler(SpeedupModel(profile), 64, ema=0.5, window_rows=8, probe_interval=0,
                                  shadow_window_rows=8)
    assert scheduler.choose(4) is None or not scheduler.choose(4).source == "history"
    for _ in range(20):
        stats = step(None, 4)
        stats.shadow_tests, stats.shadow_hits = [4] * 8, [4] * 8  # every draft of 8 positions matched
        scheduler.observe(stats, 0.01)
    estimates = scheduler.acceptance_at(4)
    assert estimates["history:8,1,8"] == pytest.approx(9.0, rel=0.01)
    assert estimates["history:4,1,4"] == pytest.approx(5.0, rel=0.01)  # min(8, 4) + 1
    assert scheduler.choose(4) == SDConfig(8, 1, 8, "history")
    assert scheduler.num_probes == 0


def test_shadow_estimate_is_the_product_of_per_position_match_rates():
    """1 + sum_k prod_{j<k} p_j, with positions tested too rarely taking the deepest measured
    rate: first-position tests alone (shadows still pending) already give an estimate."""
    scheduler = AdaptiveScheduler(SpeedupModel(history_profile()), 64, probe_interval=0, history_ema=1.0,
                                  shadow_window_rows=16, shadow_min_tests=4)
    stats = step(None, 64)
    stats.shadow_tests, stats.shadow_hits = [16, 8, 2], [8, 4, 2]  # p = 0.5, 0.5; position 2 too rare
    scheduler.observe(stats, 0.01)
    expected = 1 + sum(0.5 ** k for k in range(1, 9))
    assert scheduler.acceptance_at(64)["history:8,1,8"] == pytest.approx(expected, rel=1e-6)
    # A window closes on its first position's tests: 15 of them move nothing yet.
    quiet = AdaptiveScheduler(SpeedupModel(history_profile()), 64, probe_interval=0, history_ema=1.0)
    before = quiet.acceptance_at(64)["history:8,1,8"]
    stats.shadow_tests, stats.shadow_hits = [15, 15], [15, 15]
    quiet.observe(stats, 0.01)
    assert quiet.acceptance_at(64)["history:8,1,8"] == before


def test_shadow_counts_from_the_index_are_an_unbiased_acceptance_estimate():
    """Rows sampling i.i.d. tokens from a small alphabet against a history that holds one
    continuation: a draft matches with probability 1/V at each position, so the chain's
    expected acceptance is 1 + sum_k V^-k; the index's per-position counts, pending and
    finished shadows together, must give it (seeded; 5-sigma band, false alarm < 1e-6)."""
    import random
    from respec_async.engine.history import HistoryIndex

    vocab, length, rows = 2, 8, 3000
    rng = random.Random(0)
    index = HistoryIndex(min_match=2, match_depth=4)
    tests, hits = [0] * (length + 1), [0] * (length + 1)
    for row in range(rows):
        # Its own prompt, whose one earlier rollout starts with a marker only it holds: the
        # row's marker matches there alone, with 100 tokens after it (full-length chains).
        prompt, marker = [9, 9, row + 10], [20, 21, 22, 23, 24]
        earlier = index.open(prompt)
        index.extend(earlier, marker + [rng.randrange(vocab) for _ in range(100)])
        index.close(earlier)
        cursor = index.open(prompt)
        index.extend(cursor, marker)
        index.shadow_chains([cursor], length)
        for _ in range(rng.randrange(1, 12)):  # the row ends at a random point: censoring
            index.extend(cursor, [rng.randrange(vocab)])
        index.close(cursor)
        t, h = index.take_shadow_counts()
        for j, (n, m) in enumerate(zip(t, h)):
            tests[j] += n
            hits[j] += m
    assert tests[0] == rows and tests[length] == 0
    for j in range(5):  # deeper positions are reached by ~rows / 2^j shadows
        assert abs(hits[j] / tests[j] - 1 / vocab) < 5 * (0.25 / tests[j]) ** 0.5, j


def test_a_history_probe_runs_from_plain_decoding_at_any_batch_size():
    """A history probe needs no drafter catch-up, so unlike an EAGLE one it does not wait for a
    small batch."""
    scheduler = AdaptiveScheduler(SpeedupModel(history_profile()), 64, probe_interval=5,
                                  probe_margin=0.1, probe_max_plain_batch=4)
    assert scheduler.planned(64)[0] is None
    choices = [scheduler.choose(64) for _ in range(10)]
    probes = [c for c in choices if c is not None]
    assert probes and all(c.source == "history" for c in probes) and scheduler.num_probes == len(probes)


def test_profiled_history_steps_are_verified_at_full_width(monkeypatch):
    """A packed history step costs what its rows drafted; the profile's rows draft little, so it
    must price every history step at full width (num_real never passed), or online steps whose
    rows draft whole chains would cost more than the plan assumed."""
    from respec_async.engine.model import Transformer
    target, _ = tiny_models()
    widths = []
    forward = Transformer.forward

    def spy(self, input_ids, *args, num_real=None, **kwargs):
        widths.append(num_real)
        return forward(self, input_ids, *args, num_real=num_real, **kwargs)

    monkeypatch.setattr(Transformer, "forward", spy)
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    plain, sd = measure_step_costs(target, None, [SDConfig(8, 1, 8, "history")], [16], [[1, 2, 3], [4, 5, 6, 7]],
                                   params, repeats=2, context_len=40)
    assert len(widths) > 3 and all(w is None for w in widths) and sd["history:8,1,8"][0] > 0
    # The same engine unprofiled does pack such a step: the check above can fail.
    engine = Engine(target, None, max_batch_size=16, max_seq_len=40, history=HistoryIndex())
    for i in range(16):
        engine.add_request(Request(i, [1 + i % 5, 2, 3], params))
    widths.clear()
    engine.step(None)
    engine.step(SDConfig(8, 1, 8, "history"))
    assert any(w is not None for w in widths)


def costly_history_profile() -> Profile:
    """Plain and a history chain with the 4,1,4 cost curve: it pays at B = 1, not at 64."""
    costs = {"history:4,1,4": COSTS["4,1,4"]}
    return Profile(batch_sizes=SIZES, plain_s=[PLAIN_COST(b) * 1e-3 for b in SIZES],
                   sd_s={key: [fit(b) * 1e-3 for b in SIZES] for key, fit in costs.items()},
                   acceptance={"history:4,1,4": 3.2})


def test_observed_step_costs_move_the_plan_and_a_uniform_slowdown_does_not():
    model = SpeedupModel(costly_history_profile())
    history = model.configs["history:4,1,4"]
    scheduler = AdaptiveScheduler(model, 64, cost_window_steps=4)
    assert scheduler.planned(64)[0] is None and scheduler.planned(1)[0] == history
    # Every mode runs 2x slower than profiled (a busy machine): no choice changes.
    for _ in range(40):
        scheduler.observe(step(None, 64), 2 * model.step_seconds(PLAIN, 64))
        scheduler.observe(step(history, 64, 2.2), 2 * model.step_seconds("history:4,1,4", 64))
    assert scheduler.planned(64)[0] is None and scheduler.planned(1)[0] == history
    assert scheduler.cost_ratio[PLAIN, 6] == pytest.approx(2.0, rel=0.02)
    # History steps at B = 64 cost a third of their full-width price (packed): history pays there
    # (predicted 0.72x before: 3.2 * 13.6 ms / 60.2 ms), and nowhere else changes.
    for _ in range(100):
        scheduler.observe(step(None, 64), model.step_seconds(PLAIN, 64))
        scheduler.observe(step(history, 64, 2.2), model.step_seconds("history:4,1,4", 64) / 3)
    choice, speedup = scheduler.planned(64)
    assert choice == history and speedup == pytest.approx(3 * 3.2 * 13.6 / 60.2, rel=0.05)
    assert scheduler.planned(16)[0] is None  # another bucket: still the profiled costs
    # A step that admitted counts net of the profiled admission cost (none here: not counted).
    before = dict(scheduler.cost_ratio)
    for _ in range(20):
        scheduler.observe(step(history, 64, 2.2, admitted=3), 10 * model.step_seconds("history:4,1,4", 64))
    assert scheduler.cost_ratio == before
    scheduler.model.profile.admission = {"a": 0.002, "b": 0.001}
    for _ in range(100):
        scheduler.observe(step(history, 64, 2.2, admitted=3), model.step_seconds("history:4,1,4", 64) + 0.005)
    assert scheduler.cost_ratio["history:4,1,4", 6] == pytest.approx(1.0, rel=0.01)
    assert "history:4,1,4@B64" in scheduler.report()["cost_ratio"]


def four_chain_chosen(**kwargs):
    """Two history chains priced at full width (the 8-chain 1.25x the 4-chain); only the
    4-chain has run, at a third of its price (packed): the scheduler has chosen it."""
    profile = costly_history_profile()
    profile.sd_s["history:8,1,8"] = [COSTS["4,1,4"](b) * 1.25e-3 for b in SIZES]
    profile.acceptance["history:8,1,8"] = 3.2
    model = SpeedupModel(profile)
    short, long = model.configs["history:4,1,4"], model.configs["history:8,1,8"]
    scheduler = AdaptiveScheduler(model, 64, cost_window_steps=4, probe_interval=0, history_ema=1.0,
                                  shadow_window_rows=16, **kwargs)
    for _ in range(40):
        scheduler.observe(step(None, 64), model.step_seconds(PLAIN, 64))
        scheduler.observe(step(short, 64, 2.2), model.step_seconds("history:4,1,4", 64) / 3)
    assert scheduler.choose(64) == short
    return scheduler, model, short, long


def shadows(scheduler, model, tests: int, hits: int) -> None:
    stats = step(None, 64)
    stats.shadow_tests, stats.shadow_hits = [tests] * 8, [hits] * 8
    scheduler.observe(stats, model.step_seconds(PLAIN, 64))


def test_a_history_chain_not_run_takes_the_packed_cost_of_one_that_ran():
    """The 8-chain, which accepts more, must get the 4-chain's packed saving and take over, or
    the first chain chosen would stay whatever the estimates say."""
    scheduler, model, short, long = four_chain_chosen()
    shadows(scheduler, model, 20, 19)  # a draft matches 0.95 of the time (acceptance 4.7 vs 7.3)
    assert scheduler._cost_scale(64)["history:8,1,8"] == pytest.approx(scheduler._cost_scale(64)["history:4,1,4"])
    assert scheduler.choose(64) == long


def test_a_longer_history_chain_takes_over_on_a_lead_within_the_general_margin():
    """Both chains are priced from the same shadow estimate, so a lead of a few percent for
    the 8-chain is not noise between them: it must switch under chain_switch_margin (3%)
    although the lead is inside switch_margin (10%), which keeps the 4-chain."""
    for margin, expected in ((0.03, "history:8,1,8"), (0.1, "history:4,1,4")):
        scheduler, model, short, long = four_chain_chosen(chain_switch_margin=margin)
        shadows(scheduler, model, 50, 41)  # a draft matches 0.82 of the time
        lead = scheduler.predicted_speedup("history:8,1,8", 64) / scheduler.predicted_speedup("history:4,1,4", 64)
        assert 1.03 < lead < 1.1
        assert scheduler.choose(64) == model.configs[expected]


def test_a_near_tie_between_sd_configs_does_not_flip_the_choice():
    """Two configs predicted within switch_margin of each other: the last choice stays when
    noise moves the other slightly ahead; a clear lead switches."""
    scheduler = AdaptiveScheduler(SpeedupModel(synthetic_profile()), 64, ema=1.0, coupling=0.0, window_rows=2,
                                  probe_interval=0, switch_margin=0.1)
    first = scheduler.choose(2)
    other = SDConfig(2, 1, 2) if first == SDConfig(4, 1, 4) else SDConfig(4, 1, 4)
    base = scheduler.predicted_speedup(config_key(first), 2)
    assert scheduler.predicted_speedup(config_key(other), 2) == pytest.approx(base, rel=0.05)  # a near tie
    key = config_key(other)  # (EAGLE acceptance is one estimate for all batch sizes: observed at 50 rows)
    scheduler.observe(step(other, 50, accepted_per_row=ACCEPTANCE[key] * 1.04 - 1), 0.01)
    assert scheduler.predicted_speedup(key, 2) > base and scheduler.choose(2) == first
    scheduler.observe(step(other, 50, accepted_per_row=ACCEPTANCE[key] * 1.25 - 1), 0.01)
    assert scheduler.choose(2) == other
    without = AdaptiveScheduler(SpeedupModel(synthetic_profile()), 64, ema=1.0, coupling=0.0, window_rows=2,
                                probe_interval=0, switch_margin=0.0)
    without.choose(2)
    without.observe(step(other, 50, accepted_per_row=ACCEPTANCE[key] * 1.04 - 1), 0.01)
    assert without.choose(2) == other


def test_plain_steps_slower_than_profiled_do_not_favour_eagle():
    """The online cost ratio corrects history configs relative to plain decoding; EAGLE keeps the
    profile's comparison with plain (an overhead every mode pays must not tip it)."""
    model = SpeedupModel(synthetic_profile())
    scheduler = AdaptiveScheduler(model, 64, cost_window_steps=4)
    before = [scheduler.planned(b)[0] for b in (1, 8, 64)]
    for _ in range(60):
        scheduler.observe(step(None, 64), 1.3 * model.step_seconds(PLAIN, 64))
    assert scheduler.cost_ratio[PLAIN, 6] == pytest.approx(1.3, rel=0.01)
    assert [scheduler.planned(b)[0] for b in (1, 8, 64)] == before and before[-1] is None
