"""generator.sd = "adaptive" in a real launch (supervisor, generator, reward, trainer processes) on
the micro zoo: the generator profiles at start (or reads a given profile), chooses SD on/off
and the config per step, and records the share of steps per mode and predicted vs observed
speedup; the trainer's metrics carry the SD step share and acceptance length."""

from __future__ import annotations

import pytest

from respec_async import zoo
from respec_async.sd.grid import PLAIN
from respec_async.sd.profile import Profile
from respec_async.metrics import read_metrics
from tests.roles.conftest import rl_config


@pytest.fixture(scope="module")
def micro_zoo(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("zoo")
    return zoo.ensure_zoo(cache_dir, spec=zoo.QUICK_SPEC, log=lambda message: None)


def sd_events(run):
    return [e for e in run.events("generator-0") if e.get("event") == "generator.sd"]


def test_adaptive_generator_profiles_at_start_and_records_mode_shares(launch, micro_zoo):
    run = launch(rl_config(micro_zoo.target_dir, steps=2), f"model.drafter_path={micro_zoo.drafter_dir}",
                 "generator.sd=adaptive", 'generator.sd_grid=["1,1,1","2,1,2","3,2,4"]', "generator.sd_probe_interval=8")
    code = run.proc.wait(timeout=120)
    assert code == 0, run.output()
    records = read_metrics(run.run_dir / "metrics.jsonl")
    assert [r.step for r in records] == [0, 1]
    profile = Profile.load(run.run_dir / "sd_profile.json")
    assert set(profile.sd_s) == {"1,1,1", "2,1,2", "3,2,4"} and profile.batch_sizes == [1, 2, 4, 8]
    events = run.events("generator-0")
    plan = next(e for e in events if e.get("event") == "sd.plan")
    assert plan["plan"][0]["from"] == 1 and plan["plan"][-1]["to"] == 8
    final = sd_events(run)[-1]
    total = final["total_steps"]
    assert sum(total.values()) > 0 and set(total) <= {PLAIN, "1,1,1", "2,1,2", "3,2,4"}
    sd_steps = sum(n for key, n in total.items() if key != PLAIN)
    # The trainer's per-step SD share comes from the rollouts' own counts: SD ran iff it says so.
    assert (sd_steps > 0) == any(r.sd_step_share > 0 for r in records)
    if sd_steps:
        assert any(r.acceptance_length >= 1.0 for r in records)


def test_adaptive_generator_switches_mode_with_the_batch_size_from_a_given_profile(launch, micro_zoo, tmp_path):
    # A profile where SD (2,1,2) wins only at batch sizes 1-2 and plain wins above: every group
    # of the run starts at batch 6 and must end in a tail, so both modes show up. The micro
    # target barely emits EOS at T = 1; at T = 10 its sampling is near uniform (mean length ~24),
    # so row lengths spread out below the cap of 48 and a batch of 6 drains through 2 and 1.
    # A step misses it only if 3 of its 6 rows reach the cap (p ~ 0.15 each): ~5e-2 a step,
    # ~1e-4 for all three steps (the run is seeded, so a given build passes or fails alike).
    sizes = [1, 2, 4, 8]
    plain = [0.004 + 0.0005 * b for b in sizes]
    profile = Profile(batch_sizes=sizes, plain_s=plain, sd_s={"2,1,2": [0.005 + 0.003 * b for b in sizes]},
                      acceptance={"2,1,2": 2.5})
    path = profile.save(tmp_path / "profile.json")
    run = launch(rl_config(micro_zoo.target_dir, steps=3), f"model.drafter_path={micro_zoo.drafter_dir}",
                 "generator.sd=adaptive", f"generator.sd_profile={path}", "generator.sd_probe_interval=0",
                 "data.group_size=3", "data.groups_per_step=2", "generator.max_batch_size=6",
                 "sampling.temperature=10.0", "sampling.max_new_tokens=48")
    code = run.proc.wait(timeout=120)
    assert code == 0, run.output()
    assert not (run.run_dir / "sd_profile.json").exists()  # the given profile was used, not re-measured
    plan = next(e for e in run.events("generator-0") if e.get("event") == "sd.plan")
    assert [(r["from"], r["to"], r["choice"]) for r in plan["plan"]] == [(1, 2, "2,1,2"), (3, 6, PLAIN)]
    total = sd_events(run)[-1]["total_steps"]
    assert total.get(PLAIN, 0) > 0 and total.get("2,1,2", 0) > 0, total
    records = read_metrics(run.run_dir / "metrics.jsonl")
    assert any(0 < r.sd_step_share < 1 for r in records), [r.sd_step_share for r in records]


def test_respec_profile_writes_a_profile_with_its_fit(micro_zoo, tmp_path, capsys):
    from respec_async.cli import main

    config = tmp_path / "c.toml"
    config.write_text(f'[model]\npath = "{micro_zoo.target_dir}"\ndrafter_path = "{micro_zoo.drafter_dir}"\n'
                      '[generator]\nmax_batch_size = 3\n[sampling]\nmax_new_tokens = 16\n')
    out = tmp_path / "p.json"
    assert main(["profile", str(config), "--set", 'generator.sd_grid=["2,1,2","2,2,3"]', "--out", str(out),
                 "--repeats", "2", "--acceptance-prompts", "4"]) == 0
    profile = Profile.load(out)
    assert profile.batch_sizes == [1, 2, 3] and list(profile.sd_s) == ["2,1,2", "2,2,3"]
    assert profile.meta["max_new_tokens"] == 16 and profile.clock == "cpu"
    assert profile.fit["error"]["step_time"]["max"] >= 0 and profile.fit["plan"][-1]["to"] == 3
    printed = capsys.readouterr().out
    assert "fit error (relative)" in printed and f"generator.sd_profile={out}" in printed
