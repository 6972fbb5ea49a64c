"""The tiny model zoo: a micro zoo (--quick) trains in seconds, is cached by its stamp, saved
atomically, and reloads through the engine's loaders and transformers."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from respec_async import zoo
from respec_async.engine.checkpoint import load_pretrained
from respec_async.engine.drafter import Eagle3Drafter
from respec_async.engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def quick_zoo(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("zoo")
    assert zoo.main(["--quick", "--out", str(cache_dir)]) == 0
    return cache_dir


def test_quick_zoo_reloads_target_tokenizer_and_drafter(quick_zoo):
    paths = zoo.ensure_zoo(quick_zoo, spec=zoo.QUICK_SPEC)
    tokenizer = Tokenizer.from_dir(paths.target_dir)
    assert paths.tokenizer_path.is_file() and tokenizer.vocab_size == 3 + len(zoo.arithmetic.ALPHABET)
    target = load_pretrained(paths.target_dir)
    drafter = Eagle3Drafter.load_pretrained(paths.drafter_dir, target.embed_tokens)
    ids = torch.tensor([zoo.encode_prompt(tokenizer, "12+34=") + tokenizer.encode("2+4+0=6;")])
    output = target(ids, hidden_layers=drafter.config.feature_layers)
    assert output.logits.shape == (1, ids.shape[1], tokenizer.vocab_size)
    draft_logits, _ = drafter(ids[:, 1:], torch.cat(output.hidden, -1)[:, :-1])
    assert draft_logits.shape == (1, ids.shape[1] - 1, tokenizer.vocab_size)


def test_stamp_records_the_spec_and_the_measured_numbers(quick_zoo):
    stamp = zoo.read_stamp(zoo.ensure_zoo(quick_zoo, spec=zoo.QUICK_SPEC))
    assert stamp["key"] == zoo.QUICK_SPEC.key() and stamp["spec"] == dataclasses.asdict(zoo.QUICK_SPEC)
    metrics = stamp["metrics"]
    assert metrics["target"]["num_parameters"] > 0 and metrics["target"]["num_steps"] == zoo.QUICK_SPEC.target_max_steps
    assert len(metrics["drafter"]["top1_agreement_per_step"]) == zoo.QUICK_SPEC.drafter_unroll_steps
    assert 0.0 <= metrics["generation"]["accuracy_t1"] <= 1.0
    assert metrics["generation"]["acceptance_length"] >= 1.0


def test_a_matching_zoo_is_reused_without_training(quick_zoo, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the cached zoo should have been reused")

    monkeypatch.setattr(zoo, "train_zoo", fail)
    messages = []
    zoo.ensure_zoo(quick_zoo, spec=zoo.QUICK_SPEC, log=messages.append)
    assert any("using cached" in m for m in messages)


def test_a_different_spec_or_a_stale_stamp_does_not_match(quick_zoo, tmp_path):
    assert dataclasses.replace(zoo.QUICK_SPEC, seed=1).key() != zoo.QUICK_SPEC.key()
    root = quick_zoo / f"zoo-{zoo.QUICK_SPEC.key()}"
    assert zoo._is_complete(root, zoo.QUICK_SPEC)
    copy = tmp_path / "copy"
    import shutil
    shutil.copytree(root, copy)
    stamp = json.loads((copy / zoo.STAMP_NAME).read_text())
    stamp["key"] = "older"
    (copy / zoo.STAMP_NAME).write_text(json.dumps(stamp))
    assert not zoo._is_complete(copy, zoo.QUICK_SPEC)


def test_a_failed_training_leaves_no_partial_zoo(tmp_path, monkeypatch):
    def crash(out_dir, spec, log):
        (out_dir / "target").mkdir()
        raise RuntimeError("interrupted")

    monkeypatch.setattr(zoo, "train_zoo", crash)
    with pytest.raises(RuntimeError, match="interrupted"):
        zoo.ensure_zoo(tmp_path, spec=zoo.QUICK_SPEC)
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
