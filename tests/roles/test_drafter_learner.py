"""The drafter learner: its weighting and loss (in process), and real multi-process runs with
static speculative decoding where it distills the drafter online and pushes it to the
generators. Assertions read what the roles recorded (metrics files, role logs)."""

from __future__ import annotations

import math
import os
import re
import signal

import pytest
import torch

from respec_async import zoo
from respec_async.algorithms.distill import unrolled_distill_loss
from respec_async.config import config_from_dict
from respec_async.drafter_learning import (
    DrafterCheckpointError,
    DrafterLearner,
    drafter_checkpoints_dir,
    encode_batch,
    latest_drafter_checkpoint,
)
from respec_async.engine.drafter import Eagle3Drafter
from respec_async.models import load_drafter, load_target
from tests.roles.test_rl_loop import finished
from transport.weights import weights_checksum


@pytest.fixture(scope="module")
def quick_zoo(tmp_path_factory) -> zoo.ZooPaths:
    return zoo.ensure_zoo(tmp_path_factory.mktemp("zoo"), spec=zoo.QUICK_SPEC, log=lambda message: None)


def learner_config(paths: zoo.ZooPaths, **drafter):
    return config_from_dict({
        "roles": {"drafter_learner": 1}, "generator": {"sd": "static", "sd_num_steps": 3, "sd_num_draft_tokens": 3},
        "model": {"path": str(paths.target_dir), "drafter_path": str(paths.drafter_dir)},
        "run": {"final_eval": False}, "drafter": {"batch_size": 4, "unroll_steps": 3, **drafter},
    })


def make_learner(paths: zoo.ZooPaths, **drafter) -> DrafterLearner:
    config = learner_config(paths, **drafter)
    torch.manual_seed(0)
    target, tokenizer = load_target(config)
    return DrafterLearner(config, target, load_drafter(config, target), tokenizer.pad_token_id)


def fill(learner: DrafterLearner, rewards: list[float]) -> None:
    prompt = [1, 5, 6, 7]
    completions = [[8 + (i % 5), 9, 10 + i % 3, 11] for i in range(len(rewards))]
    learner.add_group(prompt, completions, rewards, group_id=0, policy_versions=[0] * len(rewards))


# --- config ----------------------------------------------------------------------------------


def test_drafter_section_is_validated_and_the_learner_needs_sd():
    from respec_async.config import ConfigError

    config = config_from_dict({"roles": {"drafter_learner": 1}, "generator": {"sd": "static"}})
    assert config.drafter.update_interval == 1 and config.drafter.weighting == "reward"
    assert config.drafter.checkpoint_every == 10
    with pytest.raises(ConfigError, match=r"drafter\.checkpoint_every"):
        config_from_dict({"drafter": {"checkpoint_every": -1}})
    with pytest.raises(ConfigError, match=r"drafter\.nice"):
        config_from_dict({"drafter": {"nice": 20}})
    with pytest.raises(ConfigError, match=r"drafter\.weighting"):
        config_from_dict({"drafter": {"weighting": "softmax"}})
    with pytest.raises(ConfigError, match=r"drafter\.w_min"):
        config_from_dict({"drafter": {"w_min": 1.5}})
    with pytest.raises(ConfigError, match=r"generator\.sd_relaxed_threshold_acc"):
        config_from_dict({"generator": {"sd_relaxed_threshold_acc": 0.0}})
    with pytest.raises(ConfigError, match=r"roles\.drafter_learner.*generator\.sd"):
        config_from_dict({"roles": {"drafter_learner": 1}})


# --- weighting and loss ------------------------------------------------------------------


def test_reward_weighting_normalises_within_the_batch_clips_to_w_min_and_is_one_when_off(quick_zoo):
    learner = make_learner(quick_zoo, weighting="reward", w_min=0.2)
    weights = learner.sample_weights([0.0, 0.5, 1.0, 0.1, 2.0])
    # min-max: (r - 0) / (2 - 0), then clipped to [0.2, 1]
    assert torch.allclose(weights, torch.tensor([0.2, 0.25, 0.5, 0.2, 1.0]))
    assert float(weights.max()) == 1.0 and float(weights.min()) == pytest.approx(0.2)
    # Normalised within the batch: shifting or scaling every reward changes nothing.
    assert torch.allclose(learner.sample_weights([10.0, 10.5, 11.0, 10.1, 12.0]), weights)
    assert torch.allclose(learner.sample_weights([0.0, 5.0, 10.0, 1.0, 20.0]), weights)
    # All rewards equal: nothing to rank, plain KD (not a scaled-down batch).
    assert torch.equal(learner.sample_weights([0.3, 0.3, 0.3]), torch.ones(3))
    off = make_learner(quick_zoo, weighting="none")
    assert torch.equal(off.sample_weights([0.0, 0.5, 1.0, 0.1, 2.0]), torch.ones(5))


def test_weighted_loss_with_all_weights_one_is_plain_kd(quick_zoo):
    learner = make_learner(quick_zoo)
    fill(learner, [1.0, 1.0, 1.0, 1.0])
    input_ids, loss_mask = encode_batch(list(learner.buffer.samples), learner.pad_id)
    weights = learner.sample_weights([s.reward for s in learner.buffer.samples])
    assert torch.equal(weights, torch.ones(4))
    with torch.no_grad():
        out = learner.target(input_ids, hidden_layers=tuple(learner.drafter.config.feature_layers))
        weighted, _ = unrolled_distill_loss(learner.drafter, out.hidden, input_ids, out.logits, loss_mask,
                                            sample_weights=weights, num_steps=3)
        plain, _ = unrolled_distill_loss(learner.drafter, out.hidden, input_ids, out.logits, loss_mask, num_steps=3)
    assert torch.equal(weighted, plain)
    # The mask covers exactly the positions that predict completion tokens.
    assert loss_mask.sum() == sum(len(s.token_ids) - s.prompt_len for s in learner.buffer.samples)


def test_learner_waits_on_an_empty_buffer_and_trains_on_degenerate_rewards(quick_zoo):
    learner = make_learner(quick_zoo, replay_ratio=1.0)
    assert not learner.can_train()  # empty buffer: nothing to do, no error
    fill(learner, [0.0] * 6)  # all-equal rewards: weights degenerate to 1
    learner.load_actor(3, learner.target.state_dict())
    before = {k: v.clone() for k, v in learner.drafter.state_dict().items()}
    stats = learner.train_step()
    assert stats.weight_min == stats.weight_max == 1.0 and math.isfinite(stats.loss)
    assert learner.drafter_version == 3 and learner.num_steps == 1
    assert any(not torch.equal(before[k], v) for k, v in learner.drafter.state_dict().items())
    learner.train_step()
    assert not learner.can_train()  # replay_ratio 1: 8 samples drawn >= 6 received
    version, state = learner.snapshot()
    assert version == 3 and set(state) == set(before)


def count_steps_until_idle(learner: DrafterLearner) -> int:
    steps = 0
    while learner.can_train():
        learner.train_step()
        steps += 1
    return steps


def test_a_learner_paced_by_sd_use_trains_in_proportion_to_speculative_decode_steps(quick_zoo):
    """pace_floor < 1: each rollout counts by its share of speculative decode steps, at least
    pace_floor; the default (1) counts every rollout fully whatever the generators did."""
    prompt, completions = [1, 5, 6, 7], [[8, 9, 10, 11]] * 8
    learners = {}
    for name, floor, shares in [("unpaced", 1.0, [0.0] * 8), ("all-sd", 0.1, [1.0] * 8),
                                ("mostly-plain", 0.1, [0.25] * 8), ("no-sd", 0.1, [0.0] * 8)]:
        learner = learners[name] = make_learner(quick_zoo, replay_ratio=2.0, pace_floor=floor, batch_size=2)
        learner.load_actor(1, learner.target.state_dict())
        learner.add_group(prompt, completions, [0.0] * 8, group_id=0, policy_versions=[0] * 8, sd_shares=shares)
    # budget = 8 rollouts x replay_ratio 2 x max(floor, share); 2 samples per step
    assert count_steps_until_idle(learners["unpaced"]) == 8
    assert count_steps_until_idle(learners["all-sd"]) == 8
    assert count_steps_until_idle(learners["mostly-plain"]) == 2
    assert count_steps_until_idle(learners["no-sd"]) == 1  # 1.6 samples of budget: one step, then it waits
    with pytest.raises(Exception, match=r"drafter\.pace_floor"):
        learner_config(quick_zoo, pace_floor=1.5)


def test_history_steps_do_not_count_as_use_of_the_drafter():
    """A rollout whose speculative steps all drafted from the rollout history used the drafter
    on none of them: the learner's pace must not rise with history SD."""
    import torch

    from respec_async.drafter_learning import drafter_step_share
    from transport.schema import Rollout

    def rollout(verify, history_verify, decode):
        return Rollout(0, [1, 2], torch.zeros(2), 0, 0, "stop", num_verify_steps=verify,
                       num_history_verify_steps=history_verify, num_decode_steps=decode)

    assert drafter_step_share(rollout(8, 8, 10)) == 0.0
    assert drafter_step_share(rollout(8, 2, 10)) == 0.6
    assert drafter_step_share(rollout(0, 0, 0)) == 0.0


# --- checkpoints -----------------------------------------------------------------------------


def assert_same_learner_state(a: DrafterLearner, b: DrafterLearner) -> None:
    for name, tensor in a.drafter.state_dict().items():
        other = b.drafter.state_dict()[name]
        assert other.dtype == tensor.dtype and torch.equal(other, tensor), name
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"] and sa["state"].keys() == sb["state"].keys()
    for index, moments in sa["state"].items():
        for key, value in moments.items():
            assert torch.equal(sb["state"][index][key], value), (index, key)
    assert (a.num_steps, a.drafter_version) == (b.num_steps, b.drafter_version)


def test_a_drafter_checkpoint_round_trips_bit_for_bit_and_training_goes_on_as_if_uninterrupted(quick_zoo, tmp_path):
    rewards = [0.0, 1.0, 0.5, 0.2]  # batch_size 4 = the buffer: every draw is the whole buffer, in order
    uninterrupted = make_learner(quick_zoo)
    fill(uninterrupted, rewards)
    actor = uninterrupted.target.state_dict()
    uninterrupted.load_actor(3, actor)
    uninterrupted.train_step()
    uninterrupted.train_step()
    path = uninterrupted.save_checkpoint(tmp_path / "drafter_checkpoints")
    assert path.name == "step-2" and latest_drafter_checkpoint(tmp_path) == path

    resumed = make_learner(quick_zoo)  # starts from the offline drafter, like a restarted role
    assert not torch.equal(resumed.drafter.fc.weight, uninterrupted.drafter.fc.weight)
    resumed.load_checkpoint(path)
    assert_same_learner_state(uninterrupted, resumed)
    assert (resumed.num_steps, resumed.drafter_version) == (2, 3)
    # The checkpoint's drafter is a drafter directory like the offline one.
    loaded = Eagle3Drafter.load_pretrained(path / "drafter", resumed.target.embed_tokens)
    assert torch.equal(loaded.lm_head.weight, uninterrupted.drafter.lm_head.weight)

    # One more step on the same data and actor: the same update as the learner never stopped
    # (the Adam moments and step count came back, not only the weights).
    fill(resumed, rewards)
    resumed.load_actor(3, actor)
    uninterrupted.train_step()
    resumed.train_step()
    assert_same_learner_state(uninterrupted, resumed)


def test_only_the_newest_two_complete_drafter_checkpoints_are_kept_and_the_latest_is_resumed(quick_zoo, tmp_path):
    learner = make_learner(quick_zoo)
    directory = drafter_checkpoints_dir(tmp_path)
    for step in (1, 12, 3):
        learner.num_steps = step
        learner.save_checkpoint(directory)
    (directory / "step-40").mkdir()  # no counters file: not a (complete) checkpoint
    assert sorted(p.name for p in directory.iterdir()) == ["step-12", "step-3", "step-40"]
    assert latest_drafter_checkpoint(tmp_path) == directory / "step-12"
    # A truncated newest one is passed over, with the file named: the previous one resumes.
    weights = directory / "step-12" / "drafter" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    warned = []
    assert latest_drafter_checkpoint(tmp_path, lambda p, why: warned.append((p, why))) == directory / "step-3"
    assert warned == [(directory / "step-12", warned[0][1])] and str(weights) in warned[0][1]


def test_a_checkpoint_of_another_drafter_fails_naming_the_path_and_the_mismatch(quick_zoo, tmp_path):
    learner = make_learner(quick_zoo)
    vocab = learner.drafter.config.vocab_size
    other = Eagle3Drafter.from_target(learner.target, draft_vocab_ids=torch.arange(vocab // 2))
    path = DrafterLearner(learner.config, learner.target, other, learner.pad_id).save_checkpoint(tmp_path)
    before = weights_checksum(learner.drafter.state_dict())
    with pytest.raises(DrafterCheckpointError, match=re.escape(str(path)) + r".*does not match.*draft_vocab_size = "
                       + f"{vocab // 2}" + r" \(the run's drafter: " + f"{vocab}"):
        learner.load_checkpoint(path)
    assert weights_checksum(learner.drafter.state_dict()) == before and learner.num_steps == 0
    (path / "drafter" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DrafterCheckpointError, match=re.escape(str(path)) + " cannot be read"):
        learner.load_checkpoint(path)


# --- real runs -------------------------------------------------------------------------------


def rl_config(paths: zoo.ZooPaths, *, steps: int, learner: int, weighting: str = "reward", sd: str = "static",
              generators: int = 1, groups: int = 3, group_size: int = 2, max_new_tokens: int = 16,
              max_seq_len: int = 64, extra: str = "") -> str:
    return f"""
[run]
final_eval = false
seed = 0
[roles]
generator = {generators}
reward = 1
trainer = 1
drafter_learner = {learner}
[supervisor]
live_status = false
ping_interval_s = 0.5
ping_timeout_s = 30.0
shutdown_grace_s = 5.0
[model]
path = "{paths.target_dir}"
drafter_path = "{paths.drafter_dir}"
[sampling]
max_new_tokens = {max_new_tokens}
[data]
group_size = {group_size}
groups_per_step = {groups}
[generator]
max_batch_size = 16
max_seq_len = {max_seq_len}
sd = "{sd}"
sd_num_steps = 3
sd_num_draft_tokens = 3
[trainer]
num_steps = {steps}
max_staleness = 1
checkpoint_every = 0
weight_sync_timeout_s = 30.0
[drafter]
update_interval = 2
batch_size = 4
weighting = "{weighting}"
{extra}
"""


def test_learner_run_publishes_every_interval_and_generators_apply_the_learners_drafter(launch, quick_zoo):
    steps = 8
    run = launch(rl_config(quick_zoo, steps=steps, learner=1, generators=2))
    records = finished(run)
    assert [r.step for r in records] == list(range(steps))
    published = {e["version"]: e["checksum"] for e in run.events("drafter_learner-0")
                 if e.get("event") == "weights.published" and e.get("group") == "drafter"}
    versions = sorted(published)
    # update_interval = 2: a new drafter once the actor is 2 versions past the last one.
    assert len(versions) >= 2 and versions[0] >= 2, versions
    assert all(b - a >= 2 for a, b in zip(versions, versions[1:])), versions
    for name in ("generator-0", "generator-1"):
        applied = [e for e in run.events(name) if e.get("event") == "drafter.applied"]
        assert applied, name
        for e in applied:
            # What the generator's engine holds after the swap is bit-identical to what was sent.
            assert e["matches"] is True and e["checksum"] == published[e["version"]], (name, e)
    # A generator swaps in the newest drafter it holds at a step boundary: one that arrives while
    # a newer one is on its way may be skipped, but the swaps go on, in order, through the run.
    # The last two drafters can come after a generator's last group (typically [2, 4, 6] of
    # 2-8 here; [2, 4] once on a loaded CI machine), so the check stops one short of them.
    applied = [e["version"] for e in run.events("generator-0") if e.get("event") == "drafter.applied"]
    assert applied == sorted(set(applied)) and len(applied) >= 2 and applied[-1] >= versions[-3], (applied, versions)
    # The learner trained on every actor version it saw and followed the trainer's broadcasts.
    learner = [line for line in (run.run_dir / "drafter_learner-0.metrics.jsonl").read_text().splitlines() if line]
    assert any('"kind":"step"' in line for line in learner) and any('"kind":"publish"' in line for line in learner)
    # Rollouts say which drafter drafted them; the lag is reported per step.
    assert all(r.drafter_lag >= 0 for r in records) and all(r.acceptance_length > 1 for r in records)
    assert max(r.drafter_lag for r in records) <= 2 + 2  # interval + staleness (k = 1) + one in flight


def shipped_zoo() -> zoo.ZooPaths | None:
    targets = sorted(zoo.SHIPPED_DIR.glob("target-*/model.safetensors"))
    drafters = sorted(zoo.SHIPPED_DIR.glob("zoo-*/drafter/model.safetensors"))
    if not targets or not drafters:
        return None
    return zoo.ZooPaths(targets[0].parent, drafters[0].parent, targets[0].parent / "tokenizer.json")


def test_exact_sd_reward_curves_agree_for_no_sd_plain_kd_and_reward_weighted_kd(launch):
    """ReSpec Gap 3 with exact acceptance (the default): SD samples the target's distribution
    whatever the drafter, so no SD, SD with a plain-KD learner and SD with a reward-weighted
    learner give the same reward curve up to sampling noise.

    Same seed, so the three runs see the same prompts in the same order. Rewards are 0/1. For
    matched prompts, the difference of two runs' mean rewards over n rollouts each has variance
    <= 2 p(1-p)/n (per-prompt Bernoulli variances average to at most the pooled p(1-p)), so
    |diff| <= 3.5 * sqrt(2 p(1-p)/n) has a false-alarm rate below 4.7e-4 per comparison and
    below 1e-3 for the two comparisons (Bonferroni), plus the small extra spread from the three
    policies drifting apart over 3 optimizer steps at lr 1e-4. It catches a reward shift of
    about 0.13 or more (n = 192: 3 steps x 8 prompts x 8 samples)."""
    paths = shipped_zoo()
    if paths is None:
        pytest.skip("the trained zoo is not shipped in respec_async/zoo/shipped")
    steps, groups, group_size = 3, 8, 8
    # Completions cut at 64 tokens (about a fifth of them) score 0 alike in every variant: the
    # comparison stays exact and generation is cheaper.
    common = dict(steps=steps, groups=groups, group_size=group_size, max_new_tokens=64, max_seq_len=128)
    configs = {
        "no_sd": rl_config(paths, learner=0, sd="off", **common),
        "plain_kd": rl_config(paths, learner=1, weighting="none", **common),
        # drafter.nice too: the learner's pace must not matter to the rewards either.
        "weighted_kd": rl_config(paths, learner=1, weighting="reward", extra="nice = 5", **common),
    }
    rewards = {}
    for name, toml in configs.items():  # one after the other: 2 cores do not start 11 processes at once
        run = launch(toml, own_root=True)
        records = finished(run, timeout=300)
        assert len(records) == steps
        if name == "weighted_kd":  # the thread that trains ran at the lower priority
            ready = [e for e in run.events("drafter_learner-0") if e.get("event") == "drafter_learner.ready"]
            assert ready and ready[0]["nice"] == os.nice(0) + 5
        rewards[name] = [r.reward_mean for r in records]
        if name != "no_sd":
            assert all(r.acceptance_length > 1 for r in records), name  # SD really ran
    n = steps * groups * group_size
    mean = {name: sum(values) / len(values) for name, values in rewards.items()}
    pooled = sum(mean.values()) / 3
    tolerance = 3.5 * math.sqrt(2 * max(pooled * (1 - pooled), 0.05 * 0.95) / n)
    for name in ("plain_kd", "weighted_kd"):
        assert abs(mean[name] - mean["no_sd"]) <= tolerance, (name, mean, tolerance, rewards)


def test_a_killed_drafter_learner_is_restarted_from_its_checkpoint_and_the_run_and_the_drafter_pushes_go_on(
        launch, quick_zoo):
    steps = 10
    # update_interval = 2, checkpoint_every = 2: every publish writes a checkpoint before it is announced.
    run = launch(rl_config(quick_zoo, steps=steps, learner=1, extra="checkpoint_every = 2").replace(
        "weight_sync_timeout_s = 30.0", "weight_sync_timeout_s = 10.0"))
    run.wait_event(lambda e: e.get("event") == "drafter.published", timeout=120)
    os.kill(run.role_pids()["drafter_learner-0"][0], signal.SIGKILL)
    records = finished(run, timeout=300)
    assert [r.step for r in records] == list(range(steps))
    assert len(run.role_pids()["drafter_learner-0"]) == 2  # restarted once
    events = run.events("drafter_learner-0")
    second_start = [i for i, e in enumerate(events) if e.get("event") == "role.ready"][1]

    def published(part):
        return [e for e in part if e.get("event") == "weights.published" and e.get("group") == "drafter"]

    def checksums(part):
        return {e["checksum"] for e in published(part)}

    # The restarted learner went on from the checkpoint of its first life, not from the offline
    # drafter, and first gave the generators that drafter: bit for bit the one its first life
    # published at that version.
    resumed = [e for e in events if e.get("event") == "drafter_learner.resumed"]
    assert len(resumed) == 1 and events.index(resumed[0]) < second_start, resumed
    assert resumed[0]["version"] > 0 and resumed[0]["step"] > 0, resumed
    before = {e["version"]: e["checksum"] for e in published(events[:second_start])}
    first_after = published(events[second_start:])[0]
    assert first_after["version"] == resumed[0]["version"], (first_after, resumed)
    assert first_after["checksum"] == before[resumed[0]["version"]], (first_after, before)
    config = learner_config(quick_zoo)
    target, _ = load_target(config)
    assert first_after["checksum"] != weights_checksum(load_drafter(config, target).state_dict())[:12]
    saved = [e for e in events if e.get("event") == "drafter.checkpoint"]
    kept = sorted(p.name for p in drafter_checkpoints_dir(run.run_dir).iterdir())
    assert len(saved) > 2 and kept == sorted(os.path.basename(e["path"]) for e in saved[-2:]), (saved, kept)

    after = checksums(events[second_start:])
    assert after, "the restarted learner never published"
    applied = [e for e in run.events("generator-0") if e.get("event") == "drafter.applied"]
    # Every drafter the generator swapped in is one the learner sent, bit for bit, including
    # drafters of the restarted learner. The kill can land after a broadcast but before its
    # `weights.published`, so what was sent is read from `weights.sending`.
    sent = {e["checksum"] for e in events if e.get("event") == "weights.sending" and e.get("group") == "drafter"}
    assert checksums(events) <= sent, (checksums(events), sent)
    assert all(e["matches"] and e["checksum"] in sent for e in applied), (applied, sent)
    assert any(e["checksum"] in after for e in applied), (applied, after)
