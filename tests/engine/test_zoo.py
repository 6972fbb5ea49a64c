"""The tiny model zoo: a micro zoo (--quick) trains in seconds, is cached by its stamp, saved
atomically, and reloads through the engine's loaders and transformers."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from respec_async import zoo
from respec_async.zoo import cache, command, training
from respec_async.tasks import arithmetic
from respec_async.engine.checkpoint import load_pretrained
from respec_async.engine.drafter import Eagle3Drafter
from respec_async.engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def quick_zoo(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("zoo")
    assert command.main(["--quick", "--out", str(cache_dir)]) == 0
    return cache_dir


def test_quick_zoo_reloads_target_tokenizer_and_drafter(quick_zoo):
    paths = zoo.ensure_zoo(quick_zoo, spec=zoo.QUICK_SPEC)
    tokenizer = Tokenizer.from_dir(paths.target_dir)
    assert paths.tokenizer_path.is_file() and tokenizer.vocab_size == 3 + len(arithmetic.ALPHABET)
    target = load_pretrained(paths.target_dir)
    drafter = Eagle3Drafter.load_pretrained(paths.drafter_dir, target.embed_tokens)
    ids = torch.tensor([zoo.encode_prompt(tokenizer, "12+34=") + tokenizer.encode("2+4+0=6;")])
    output = target(ids, hidden_layers=drafter.config.feature_layers)
    assert output.logits.shape == (1, ids.shape[1], tokenizer.vocab_size)
    draft_logits, _ = drafter(ids[:, 1:], torch.cat(output.hidden, -1)[:, :-1])
    assert draft_logits.shape == (1, ids.shape[1] - 1, tokenizer.vocab_size)


def test_stamp_records_the_spec_and_the_measured_numbers(quick_zoo):
    stamp = zoo.read_stamp(zoo.ensure_zoo(quick_zoo, spec=zoo.QUICK_SPEC))
    assert stamp["key"] == zoo.QUICK_SPEC.key()
    metrics = stamp["metrics"]
    assert metrics["spec"] == dataclasses.asdict(zoo.QUICK_SPEC)
    assert metrics["target"]["num_parameters"] > 0 and metrics["target"]["num_steps"] == zoo.QUICK_SPEC.target_max_steps
    assert len(metrics["drafter"]["top1_agreement_per_step"]) == zoo.QUICK_SPEC.drafter_unroll_steps
    assert 0.0 <= metrics["generation"]["accuracy_t1"] <= 1.0
    assert metrics["generation"]["acceptance_length"] >= 1.0


def forbid_training(monkeypatch, *names):
    def fail(*args, **kwargs):
        raise AssertionError("a cached stage should have been reused")

    for name in names:
        monkeypatch.setattr(training, name, fail)


def test_a_matching_zoo_is_reused_without_training(quick_zoo, monkeypatch):
    forbid_training(monkeypatch, "train_target_stage", "train_drafter_stage")
    messages = []
    zoo.ensure_zoo(quick_zoo, spec=zoo.QUICK_SPEC, log=messages.append)
    assert any("using cached" in m for m in messages)


def test_a_drafter_hyperparameter_change_retrains_only_the_drafter(quick_zoo, monkeypatch):
    spec = dataclasses.replace(zoo.QUICK_SPEC, drafter_steps=2)
    assert spec.target_key() == zoo.QUICK_SPEC.target_key() and spec.key() != zoo.QUICK_SPEC.key()
    forbid_training(monkeypatch, "train_target_stage")
    paths = zoo.ensure_zoo(quick_zoo, spec=spec, log=lambda message: None)
    assert paths.target_dir == zoo.ensure_zoo(quick_zoo, spec=zoo.QUICK_SPEC).target_dir
    assert zoo.read_stamp(paths)["metrics"]["drafter"]["num_steps"] == 2


def test_a_different_target_spec_or_a_stale_stamp_does_not_match(quick_zoo, tmp_path):
    assert dataclasses.replace(zoo.QUICK_SPEC, seed=1).target_key() != zoo.QUICK_SPEC.target_key()
    assert zoo.is_complete(quick_zoo, zoo.QUICK_SPEC)
    copy = tmp_path / "copy"
    shutil.copytree(quick_zoo, copy)
    target_root, _ = cache._stage_dirs(copy, zoo.QUICK_SPEC)
    stamp = json.loads((target_root / zoo.STAMP_NAME).read_text())
    stamp["key"] = "older"
    (target_root / zoo.STAMP_NAME).write_text(json.dumps(stamp))
    assert not zoo.is_complete(copy, zoo.QUICK_SPEC)


def test_a_failed_training_leaves_no_partial_zoo(tmp_path, monkeypatch):
    def crash(out_dir, spec, log):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(training, "train_target_stage", crash)
    with pytest.raises(RuntimeError, match="interrupted"):
        zoo.ensure_zoo(tmp_path, spec=zoo.QUICK_SPEC, log=lambda message: None)
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]


def test_cache_dir_defaults_to_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("RESPEC_ZOO_DIR", str(tmp_path))
    assert zoo.default_cache_dir() == tmp_path
    monkeypatch.delenv("RESPEC_ZOO_DIR")
    assert zoo.default_cache_dir().parts[-3:] == (".cache", "respec_async", "zoo")


def test_transformers_loads_the_zoo_target_with_the_same_logits(quick_zoo):
    transformers = pytest.importorskip("transformers")
    paths = zoo.ensure_zoo(quick_zoo, spec=zoo.QUICK_SPEC)
    reference = transformers.AutoModelForCausalLM.from_pretrained(paths.target_dir).eval()
    target = load_pretrained(paths.target_dir)
    ids = torch.tensor([[1, 5, 6, 13, 7, 8, 14]])
    with torch.no_grad():
        assert torch.allclose(reference(ids).logits, target(ids).logits, atol=1e-4)


def test_target_only_trains_no_drafter_and_a_later_call_adds_it(tmp_path, monkeypatch):
    spec = dataclasses.replace(zoo.QUICK_SPEC, drafter_steps=1, target_max_steps=2)
    forbid_training(monkeypatch, "train_drafter_stage")
    paths = zoo.ensure_zoo(tmp_path, spec=spec, log=lambda message: None, with_drafter=False)
    assert (paths.target_dir / "config.json").is_file() and not paths.drafter_dir.exists()
    monkeypatch.undo()
    forbid_training(monkeypatch, "train_target_stage")
    paths = zoo.ensure_zoo(tmp_path, spec=spec, log=lambda message: None)
    assert (paths.drafter_dir / "config.json").is_file()


def test_a_share_of_the_supervised_solutions_states_no_answer():
    spec = dataclasses.replace(zoo.QUICK_SPEC, unanswered_fraction=0.5)
    tokenizer = training.build_tokenizer()
    batches = training.TrainBatches(tokenizer, spec, batch_size=200, seed=0)
    batch = batches.next()
    texts = [tokenizer.decode(row[1:length - 1].tolist()) for row, length in zip(batch.input_ids, batch.lengths)]
    answered = [arithmetic.parse_answer(text.split("=", 1)[1]) is not None for text in texts]
    # Binomial(200, 0.5): outside [70, 130] has probability < 1e-5.
    assert 70 <= sum(answered) <= 130
    # The cut solutions keep every column: only the answer line is gone.
    problems = arithmetic.problems(200, seed=0, split="train", max_digits=spec.max_digits)
    for text, problem, has_answer in zip(texts, problems, answered):
        expected = problem.completion if has_answer else problem.completion.split(arithmetic.ANSWER_PREFIX)[0]
        assert text == problem.prompt + expected
    # Deterministic: the same stream again gives the same cut.
    again = training.TrainBatches(tokenizer, spec, batch_size=200, seed=0).next()
    assert torch.equal(again.input_ids, batch.input_ids)


def test_a_shipped_copy_with_a_matching_stamp_seeds_the_cache_without_training(quick_zoo, tmp_path, monkeypatch):
    paths = zoo.ensure_zoo(quick_zoo, spec=zoo.QUICK_SPEC)
    shipped = tmp_path / "shipped"
    zoo.ship(paths, shipped)
    monkeypatch.setattr(cache, "SHIPPED_DIR", shipped)
    forbid_training(monkeypatch, "train_target_stage", "train_drafter_stage")
    messages = []
    seeded = zoo.ensure_zoo(tmp_path / "cache", spec=zoo.QUICK_SPEC, log=messages.append)
    assert sum("shipped with the package" in m for m in messages) == 2
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (seeded.target_dir / name).read_bytes() == (paths.target_dir / name).read_bytes()
    assert (seeded.drafter_dir / "model.safetensors").read_bytes() == (paths.drafter_dir / "model.safetensors").read_bytes()
    assert zoo.read_stamp(seeded) == zoo.read_stamp(paths)


def test_a_shipped_copy_of_another_spec_is_ignored_and_force_retrains(quick_zoo, tmp_path, monkeypatch):
    shipped = tmp_path / "shipped"
    zoo.ship(zoo.ensure_zoo(quick_zoo, spec=zoo.QUICK_SPEC), shipped)
    monkeypatch.setattr(cache, "SHIPPED_DIR", shipped)
    other = dataclasses.replace(zoo.QUICK_SPEC, seed=5, target_max_steps=1, drafter_steps=1)
    messages = []
    zoo.ensure_zoo(tmp_path / "cache", spec=other, log=messages.append, with_drafter=False)
    assert not any("shipped with the package" in m for m in messages)
    messages.clear()
    zoo.ensure_zoo(tmp_path / "cache2", spec=zoo.QUICK_SPEC, log=messages.append, force=True, with_drafter=False)
    assert not any("shipped with the package" in m for m in messages)


def test_each_task_has_its_zoo_and_new_spec_fields_keep_the_shipped_keys():
    default = zoo.ZooSpec()
    # The shipped copies are named by the default spec's keys: a field added with its default
    # must not rename them (every fresh clone would retrain the zoo for minutes).
    shipped = {p.name for p in zoo.SHIPPED_DIR.iterdir()}
    assert {f"target-{default.target_key()}", f"zoo-{default.key()}"} <= shipped
    assert zoo.spec_for_task("arithmetic") == default and zoo.spec_for_task("jsonl") == default
    longtail = zoo.spec_for_task("longtail")
    assert longtail.problem_shape() == arithmetic.TASKS["longtail"]
    assert default.problem_shape() == arithmetic.TASKS["arithmetic"]
    assert longtail.key() != default.key() and longtail.target_key() != default.target_key()
    # The long-tail zoo ships too: its target trains for ~24 minutes on one core.
    assert {f"target-{longtail.target_key()}", f"zoo-{longtail.key()}"} <= shipped


def test_the_curriculum_caps_the_digits_of_early_problems():
    spec = zoo.ZooSpec(max_digits=20, target_curriculum_steps=10, curriculum_start_digits=3)
    assert [spec.curriculum_digits(step) for step in (1, 5, 9, 10, 50)] == [4, 11, 18, 20, 20]
    assert zoo.ZooSpec(max_digits=20).curriculum_digits(1) == 20  # off by default
    tokenizer = training.build_tokenizer()
    early = training.TrainBatches(tokenizer, spec, 64, seed=0).next(spec.curriculum_digits(1))
    late = training.TrainBatches(tokenizer, spec, 64, seed=0).next(spec.curriculum_digits(10))
    # Prompts are "a+b=" plus <bos>: 4-digit operands give at most 11 prompt tokens.
    prompt_lengths = (early.loss_mask.argmax(dim=1) + 1).tolist()
    assert max(prompt_lengths) <= 11 < int((late.loss_mask.argmax(dim=1) + 1).max())
