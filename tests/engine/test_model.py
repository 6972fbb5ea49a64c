"""The target model against transformers on random tiny Llama, Qwen2 and Qwen3 configs: full-sequence
logits, hidden states, KV-cache decoding (prefill, single steps, chunks, mixed slots), bf16;
each through the module path and the fused inference path."""

from __future__ import annotations

import pytest
import torch
import transformers

from respec_async.engine.checkpoint import from_state_dict_hf
from respec_async.engine.model import KVCache, Linear, ModelConfig, Transformer, can_prepack, eagle3_feature_layers

TOL = 1e-4

FAMILIES = {
    # Qwen2: q/k/v bias, tied embeddings.
    "qwen2": dict(model_type="qwen2", vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6,
                  max_position_embeddings=128),
    # Qwen3: per-head q/k RMSNorm, no bias, an explicit head_dim unlike hidden / heads, tied.
    "qwen3": dict(model_type="qwen3", vocab_size=59, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=12, tie_word_embeddings=True,
                  rope_theta=1e6, max_position_embeddings=128, rms_norm_eps=1e-6),
    # Llama: GQA 4/2, untied embeddings.
    "llama": dict(model_type="llama", vocab_size=67, hidden_size=32, intermediate_size=40, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500.0,
                  max_position_embeddings=128, rms_norm_eps=1e-5),
}


def hf_pair(family: str, **overrides):
    """A random transformers model and our Transformer holding the same weights."""
    torch.manual_seed(0)
    config = ModelConfig(**{**FAMILIES[family], **overrides})
    hf_config = transformers.AutoConfig.for_model(**config.to_hf_dict())
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    with torch.no_grad():  # biases are zero-initialised in HF; make them count
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    ours = from_state_dict_hf(config, dict(hf.state_dict())).eval()
    return hf, ours


def random_ids(vocab_size: int, batch_size: int, seq_len: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=[(family, fused) for family in sorted(FAMILIES) for fused in (False, True)],
                ids=lambda param: f"{param[0]}-{'fused' if param[1] else 'plain'}")
def pair(request):
    """Each family twice: the module path and the fused inference path (engine/fused.py, taken
    under no_grad in float32), both against transformers."""
    family, fused_inference = request.param
    hf, ours = hf_pair(family)
    ours.fused_inference = fused_inference
    return hf, ours


@torch.no_grad()
def test_full_sequence_logits_match_transformers(pair):
    hf, ours = pair
    ids = random_ids(ours.config.vocab_size, 3, 11)
    expected = hf(ids).logits
    assert (ours(ids).logits - expected).abs().max() < TOL


@torch.no_grad()
def test_llama3_rope_scaling_matches_transformers():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    hf, ours = hf_pair("llama", rope_scaling=scaling, head_dim=16, num_attention_heads=2, num_key_value_heads=1)
    ids = random_ids(ours.config.vocab_size, 2, 40)
    assert (ours(ids).logits - hf(ids).logits).abs().max() < TOL


@torch.no_grad()
def test_llama_attention_bias_covers_o_proj_as_in_transformers():
    hf, ours = hf_pair("llama", attention_bias=True)
    assert ours.layers[0].self_attn.o_proj.bias is not None
    ids = random_ids(ours.config.vocab_size, 2, 6)
    assert (ours(ids).logits - hf(ids).logits).abs().max() < TOL


@torch.no_grad()
def test_hidden_layers_match_transformers_hidden_states(pair):
    hf, ours = pair
    ids = random_ids(ours.config.vocab_size, 2, 9)
    hf_hidden = hf(ids, output_hidden_states=True).hidden_states
    num_layers = ours.config.num_hidden_layers
    layers = (num_layers - 2, 0, 1)  # HF applies the final norm to its last entry: skip layer L-1
    out = ours(ids, hidden_layers=layers)
    assert len(out.hidden) == len(layers)
    for layer, hidden in zip(layers, out.hidden):
        assert hidden.shape == (2, 9, ours.config.hidden_size)
        assert (hidden - hf_hidden[layer + 1]).abs().max() < TOL


@torch.no_grad()
def test_logits_positions_gathers_rows(pair):
    _, ours = pair
    ids = random_ids(ours.config.vocab_size, 2, 7)
    full = ours(ids).logits
    at = torch.tensor([[6, 2], [0, 6]])
    gathered = ours(ids, logits_positions=at).logits
    assert gathered.shape == (2, 2, ours.config.vocab_size)
    assert torch.allclose(gathered, full.gather(1, at[:, :, None].expand(-1, -1, full.shape[-1])))
    assert ours(ids, logits_positions=at[:, :0]).logits.shape == (2, 0, ours.config.vocab_size)


@torch.no_grad()
def test_cached_prefill_steps_and_chunk_match_full_forward(pair):
    _, ours = pair
    ids = random_ids(ours.config.vocab_size, 2, 12)
    full = ours(ids).logits
    # Rows need not sit in slots of the same index (a gather of cache rows); consecutive slots
    # are read as a slice of the cache.
    for slots in (torch.tensor([1, 0]), torch.tensor([1, 2])):
        cache = KVCache(ours.config, num_slots=3, max_seq_len=16)
        got = [ours(ids[:, :5], cache=cache, slots=slots).logits]
        for t in range(5, 8):  # single decode steps
            got.append(ours(ids[:, t:t + 1], torch.full((2, 1), t), cache, slots).logits)
        chunk_positions = torch.arange(8, 12).expand(2, 4)  # a k+1 verification chunk
        got.append(ours(ids[:, 8:], chunk_positions, cache, slots).logits)
        assert (torch.cat(got, 1) - full).abs().max() < TOL, slots


@torch.no_grad()
def test_two_slots_at_different_lengths_decode_in_one_batch(pair):
    _, ours = pair
    lengths = (4, 9)
    seqs = [random_ids(ours.config.vocab_size, 1, n + 3, seed=n)[0] for n in lengths]
    cache = KVCache(ours.config, num_slots=3, max_seq_len=16)
    slots = torch.tensor([2, 0])
    for seq, n, slot in zip(seqs, lengths, slots):  # separate prefills of different lengths
        ours(seq[None, :n], cache=cache, slots=slot[None])
    for step in range(3):  # then batched decode: each row at its own position
        positions = torch.tensor([[n + step] for n in lengths])
        step_ids = torch.stack([seq[n + step] for seq, n in zip(seqs, lengths)])[:, None]
        logits = ours(step_ids, positions, cache, slots).logits
        for row, (seq, n) in enumerate(zip(seqs, lengths)):
            expected = ours(seq[None, :n + step + 1]).logits[0, -1]
            assert (logits[row, 0] - expected).abs().max() < TOL


@torch.no_grad()
def test_padded_batch_prefill_with_mask_has_no_nan_and_matches(pair):
    _, ours = pair
    lengths = (3, 6)
    ids = random_ids(ours.config.vocab_size, 2, 6)
    cache = KVCache(ours.config, num_slots=2, max_seq_len=8)
    index = torch.arange(6)
    valid = index[None, :] < torch.tensor(lengths)[:, None]  # right padding
    mask = (index[None, None, :] <= index[None, :, None]) & valid[:, None, :] & valid[:, :, None]
    out = ours(ids, index.expand(2, 6), cache, torch.arange(2), attn_mask=mask)
    assert not out.logits.isnan().any()
    for row, n in enumerate(lengths):
        assert (out.logits[row, :n] - ours(ids[row:row + 1, :n]).logits[0]).abs().max() < TOL


@torch.no_grad()
def test_tree_verification_positions_and_mask(pair):
    """Two siblings at the same depth: each sees the prefix and itself, not the other."""
    _, ours = pair
    prefix = random_ids(ours.config.vocab_size, 1, 5)
    a, b = 3, 7
    cache = KVCache(ours.config, num_slots=1, max_seq_len=8)
    ours(prefix, cache=cache)
    tree_ids = torch.tensor([[a, b]])
    mask = torch.ones(1, 2, 7, dtype=torch.bool)
    mask[0, 0, 6] = mask[0, 1, 5] = False
    out = ours(tree_ids, torch.tensor([[5, 5]]), cache, cache_positions=torch.tensor([[5, 6]]), attn_mask=mask)
    for i, token in enumerate((a, b)):
        expected = ours(torch.cat([prefix, torch.tensor([[token]])], 1)).logits[0, -1]
        assert (out.logits[0, i] - expected).abs().max() < TOL


def test_training_path_backpropagates(pair):
    _, ours = pair
    ids = random_ids(ours.config.vocab_size, 2, 6)
    loss = torch.nn.functional.cross_entropy(ours(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in ours.parameters())
    ours.zero_grad(set_to_none=True)


@torch.no_grad()
def test_bfloat16_runs_close_to_float32(pair):
    _, ours = pair
    ids = random_ids(ours.config.vocab_size, 2, 6)
    reference = ours(ids).logits
    bf16 = Transformer(ours.config).to(torch.bfloat16)
    bf16.load_state_dict(ours.state_dict())
    out = bf16(ids)
    assert out.logits.dtype == torch.float32
    assert (out.logits - reference).abs().max() < 0.1
    cache = KVCache(ours.config, 2, 8, dtype=torch.bfloat16)
    cached = bf16(ids, cache=cache, logits_positions=torch.tensor([[5], [5]])).logits
    assert (cached[:, 0] - reference[:, -1]).abs().max() < 0.1


@torch.no_grad()
@pytest.mark.parametrize("bias", [False, True])
def test_one_bfloat16_row_goes_through_mv_with_the_gemms_result(bias):
    torch.manual_seed(0)
    layer = Linear(64, 96, bias=bias).to(torch.bfloat16)
    for shape in ((1, 1, 64), (1, 64), (3, 1, 64)):  # one row (torch.mv), and several (the GEMM)
        x = torch.randn(shape, dtype=torch.bfloat16)
        got, expected = layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias)
        assert got.shape == expected.shape and got.dtype == torch.bfloat16
        # The same float32 sums; with a bias, one more bf16 rounding (mv, then + bias).
        ulp = 2 ** -7 * expected.float().abs().max()
        assert (got.float() - expected.float()).abs().max() <= (ulp if bias else 0)


@pytest.mark.skipif(not can_prepack(torch.empty(1, dtype=torch.bfloat16)),
                    reason="oneDNN's packed bf16 linear is not usable with this torch build or CPU")
@pytest.mark.parametrize("bias", [False, True])
def test_prepacked_bfloat16_linear_equals_the_gemm_and_follows_weight_updates(bias):
    torch.manual_seed(0)
    layer = Linear(64, 96, bias=bias).to(torch.bfloat16)
    layer.prepack = True
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(2):
            got = layer(x)
            assert "_fused_cache" in layer.__dict__  # the packed copy, not F.linear
            expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
            assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
            assert torch.equal(layer(x[:, 1:3]), expected[:, 1:3])  # a strided input
            # A weight update in place (as load_state_dict does): the packed copy is rebuilt.
            layer.weight.mul_(-0.5)
    # Training is not affected: gradients flow through the module's own weight.
    layer.weight.requires_grad_(True)
    layer(x).float().sum().backward()
    assert layer.weight.grad is not None


def test_engine_prepacks_bfloat16_cpu_targets_only_and_refuses_an_explicit_prepack_elsewhere():
    from respec_async.engine.engine import Engine
    config = ModelConfig(**FAMILIES["llama"])
    for dtype, expected in ((torch.float32, False), (torch.bfloat16, can_prepack(torch.empty(1, dtype=torch.bfloat16)))):
        target = Transformer(config).to(dtype)
        Engine(target, max_batch_size=2, max_seq_len=16)
        linears = [m for m in target.modules() if isinstance(m, Linear)]
        assert linears and all(m.prepack is expected for m in linears)
        Engine(target, max_batch_size=2, max_seq_len=16, prepack_weights=False)
        assert not any(m.prepack for m in linears)
    target = target.float().train()
    target.fused_inference = False
    with pytest.raises(ValueError, match="bfloat16 weights on a CPU that runs oneDNN.*float32 on cpu"):
        Engine(target, max_batch_size=2, max_seq_len=16, prepack_weights=True)
    assert target.training and not target.fused_inference  # refused before the engine changed anything


def test_tied_embeddings_share_one_parameter():
    model = Transformer(ModelConfig(**FAMILIES["qwen2"]))
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.config.attention_bias and model.layers[0].self_attn.q_proj.bias is not None


def test_kv_cache_size_is_the_formula():
    config = ModelConfig(**FAMILIES["llama"])
    cache = KVCache(config, num_slots=3, max_seq_len=10, dtype=torch.bfloat16)
    assert cache.k.shape == (4, 3, 2, 10, 8)
    assert cache.num_bytes == KVCache.bytes_for(config, 3, 10, torch.bfloat16) == 2 * 4 * 3 * 2 * 10 * 8 * 2


def test_eagle3_feature_layers():
    assert eagle3_feature_layers(32) == (1, 15, 28)
    assert eagle3_feature_layers(4) == (1, 1, 0)
    assert eagle3_feature_layers(2) == (1, 0, 0)
    assert eagle3_feature_layers(1) == (0, 0, 0)


def test_config_round_trips_through_hf_dict():
    for family in FAMILIES.values():
        config = ModelConfig(**family, eos_token_id=2)
        assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config
        hf_dict = transformers.AutoConfig.for_model(**config.to_hf_dict()).to_dict()
        assert ModelConfig.from_hf_dict(hf_dict) == config


def test_unsupported_rope_scaling_is_rejected():
    d = ModelConfig(**FAMILIES["llama"]).to_hf_dict()
    d["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        ModelConfig.from_hf_dict(d)
