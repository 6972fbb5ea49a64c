"""Checkpoints: transformers' save_pretrained output (single file and sharded) loads and matches;
ours loads in transformers and matches; broken checkpoints fail with errors naming the problem."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from respec_async.engine.checkpoint import load_pretrained, save_pretrained, state_dict_hf
from respec_async.engine.model import ModelConfig, Transformer
from tests.engine.test_model import FAMILIES, TOL, hf_pair, random_ids


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request):
    return hf_pair(request.param)


@torch.no_grad()
def test_transformers_checkpoint_loads_and_matches(pair, tmp_path):
    hf, _ = pair
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    ids = random_ids(ours.config.vocab_size, 2, 8)
    assert (ours(ids).logits - hf(ids).logits).abs().max() < TOL
    assert ours.config.tie_word_embeddings == hf.config.tie_word_embeddings
    if ours.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.embed_tokens.weight


@torch.no_grad()
def test_sharded_transformers_checkpoint_loads_and_matches(pair, tmp_path):
    hf, _ = pair
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = load_pretrained(tmp_path)
    ids = random_ids(ours.config.vocab_size, 2, 8)
    assert (ours(ids).logits - hf(ids).logits).abs().max() < TOL


@torch.no_grad()
@pytest.mark.parametrize("max_shard_bytes", [None, 16_000])
def test_our_checkpoint_loads_in_transformers_and_matches(pair, tmp_path, max_shard_bytes):
    _, ours = pair
    save_pretrained(ours, tmp_path, max_shard_bytes=max_shard_bytes)
    assert (tmp_path / "model.safetensors.index.json").exists() == (max_shard_bytes is not None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(hf).__name__ == json.loads((tmp_path / "config.json").read_text())["architectures"][0]
    ids = random_ids(ours.config.vocab_size, 2, 8)
    assert (ours(ids).logits - hf(ids).logits).abs().max() < TOL
    assert (load_pretrained(tmp_path)(ids).logits - ours(ids).logits).abs().max() == 0


def test_load_casts_dtype_and_resaving_replaces_a_sharded_checkpoint(pair, tmp_path):
    _, ours = pair
    save_pretrained(ours, tmp_path, max_shard_bytes=16_000)
    save_pretrained(ours.to(torch.bfloat16), tmp_path)
    ours.float()
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_pretrained(tmp_path, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


def test_state_dict_hf_uses_transformers_names(pair):
    hf, ours = pair
    names = set(state_dict_hf(ours))
    hf_names = set(hf.state_dict())
    if ours.config.tie_word_embeddings:
        hf_names.discard("lm_head.weight")
    assert names == hf_names
    assert "model.layers.0.self_attn.q_proj.weight" in names


@pytest.fixture
def small_checkpoint(tmp_path):
    config = ModelConfig(**FAMILIES["llama"])
    save_pretrained(Transformer(config), tmp_path)
    return tmp_path


def test_missing_tensor_is_named(small_checkpoint):
    tensors = load_file(small_checkpoint / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, small_checkpoint / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors.*missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(small_checkpoint)


def test_wrong_shape_and_unexpected_tensor_are_named(small_checkpoint):
    tensors = load_file(small_checkpoint / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(7)
    tensors["model.layers.0.extra.weight"] = torch.ones(2)
    save_file(tensors, small_checkpoint / "model.safetensors")
    with pytest.raises(ValueError) as error:
        load_pretrained(small_checkpoint)
    assert "wrong shape for model.norm.weight: checkpoint (7,), config expects (32,)" in str(error.value)
    assert "unexpected tensor model.layers.0.extra.weight" in str(error.value)


def test_unsupported_rope_scaling_names_config_file(small_checkpoint):
    config = json.loads((small_checkpoint / "config.json").read_text())
    config["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    (small_checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: .*rope_scaling type 'dynamic' is not supported"):
        load_pretrained(small_checkpoint)


def test_missing_weights_file_is_named(small_checkpoint):
    (small_checkpoint / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(small_checkpoint)
