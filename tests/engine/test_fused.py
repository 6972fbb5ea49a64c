"""The fused inference path (engine/fused.py) against the module path: the drafter, the cached
weights following every kind of parameter update, and the engine end to end. (The target's
fused path is checked against transformers in test_model.py.)"""

import pytest
import torch
from torch import nn

from respec_async.engine import fused
from respec_async.engine.engine import Engine
from respec_async.engine.requests import Request, SDConfig
from respec_async.engine.model import KVCache
from respec_async.engine.sampling import SamplingParams

from tests.engine.test_drafter import fake_cache, make_drafter
from tests.engine.test_engine import PROMPTS, tiny_models

TOL = 1e-5


def both_paths(model, call):
    """call() through the module path, then through the fused path (under no_grad)."""
    with torch.no_grad():
        model.fused_inference = False
        expected = call()
        model.fused_inference = True
        got = call()
    model.fused_inference = False
    return expected, got


def test_rotate_half_rows_is_rotate_half_of_the_projection():
    torch.manual_seed(0)
    weight, bias, x = torch.randn(3 * 8, 5), torch.randn(3 * 8), torch.randn(4, 5)
    y = (x @ weight.T + bias).view(4, 3, 8)
    rotated = (x @ fused.rotate_half_rows(weight, 3, 8).T + fused.rotate_half_rows(bias, 3, 8)).view(4, 3, 8)
    torch.testing.assert_close(rotated, torch.cat([-y[..., 4:], y[..., :4]], -1))


def test_drafter_fused_matches_module_path_uncached_cached_and_masked():
    drafter, _ = make_drafter()
    ids = torch.randint(0, drafter.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    features = torch.randn(2, 6, 3 * drafter.config.hidden_size)

    def uncached():
        logits, hidden = drafter(ids, features)
        return torch.cat([logits, hidden], -1)

    def cached_steps():  # a prefix, single steps (B = 2, then the no-mask B = 1 path), own hidden
        cache = fake_cache(num_slots=4, max_seq_len=12)
        slots = torch.tensor([3, 1])
        out = [drafter(ids[:, :4], features[:, :4], torch.arange(4).expand(2, -1), cache, slots)[0]]
        logits, hidden = drafter(ids[:, 4:5], features[:, 4:5], torch.full((2, 1), 4), cache, slots)
        out.append(logits)
        logits, _ = drafter(ids[:1, 5:6], hidden[:1], torch.full((1, 1), 5), cache, slots[:1])
        return torch.cat(out + [logits.expand(2, -1, -1)], 1)

    def masked_tree():
        cache = fake_cache(num_slots=2, max_seq_len=8)
        mask = torch.tensor([[[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 1]]], dtype=torch.bool)
        return drafter(ids[:1, :4], features[:1, :4], torch.tensor([[0, 1, 2, 2]]), cache, torch.tensor([1]),
                       torch.arange(4)[None], mask, logits_positions=torch.tensor([[3, 2]]))[0]

    for call in (uncached, cached_steps, masked_tree):
        expected, got = both_paths(drafter, call)
        torch.testing.assert_close(got, expected, atol=TOL, rtol=TOL)


def decode_logits(target):
    """Prefill two sequences into slots 2 and 0, then one decode step each."""
    cache = KVCache(target.config, num_slots=3, max_seq_len=16)
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    slots = torch.tensor([2, 0])
    target(ids, cache=cache, slots=slots)
    return target(torch.tensor([[9], [10]]), torch.full((2, 1), 4), cache, slots).logits


@pytest.mark.parametrize("update", ["load_state_dict", "optimizer_step", "copy_", "new_parameter", "to_dtype",
                                    "fused_adamw_then_drop_cache"])
def test_cached_fused_weights_follow_parameter_updates(update):
    target, _ = tiny_models(seed=0)
    other, _ = tiny_models(seed=1)
    target.fused_inference = True
    with torch.no_grad():
        before = decode_logits(target)
    if update == "load_state_dict":
        with torch.no_grad():
            target.load_state_dict(other.state_dict())
    elif update == "optimizer_step":  # training the same module between generations
        optimizer = torch.optim.SGD(target.parameters(), lr=1.0)
        target(torch.tensor([[1, 2, 3]])).logits.logsumexp(-1).sum().backward()
        optimizer.step()
    elif update == "copy_":
        with torch.no_grad():
            target.layers[0].mlp.down_proj.weight.copy_(other.layers[0].mlp.down_proj.weight)
    elif update == "new_parameter":
        target.layers[1].self_attn.q_proj.weight = nn.Parameter(other.layers[1].self_attn.q_proj.weight.clone())
    elif update == "fused_adamw_then_drop_cache":  # fused kernels do not bump versions: drop_cache says so
        optimizer = torch.optim.AdamW(target.parameters(), lr=0.1, fused=True)
        target(torch.tensor([[1, 2, 3]])).logits.logsumexp(-1).sum().backward()
        optimizer.step()
        fused.drop_cache(target)
    elif update == "to_dtype":  # new storage: float64 and back
        target.double().float()
        with torch.no_grad():
            target.norm.weight.mul_(2.0)
    with torch.no_grad():
        after = decode_logits(target)
        target.fused_inference = False
        expected = decode_logits(target)
    assert (after - before).abs().max() > 1e-3  # the update mattered...
    torch.testing.assert_close(after, expected, atol=TOL, rtol=TOL)  # ...and the fused path saw it


def test_training_mode_never_takes_the_fused_path():
    target, _ = tiny_models()
    target.fused_inference = True
    ids = torch.tensor([[1, 2, 3, 4]])
    target(ids).logits.sum().backward()  # grad enabled: the module path, which backpropagates
    assert target.layers[0].self_attn.q_proj.weight.grad is not None
    assert "_fused_cache" not in target.__dict__


@pytest.mark.parametrize("sd", [None, SDConfig(3, 1, 3), SDConfig(3, 3, 8)], ids=["plain", "chain", "tree"])
def test_engine_fused_and_module_paths_agree(sd):
    """Same seed, temperature 1: the same tokens, behaviour log-probs within float32 rounding."""
    params = SamplingParams(temperature=1.0, max_new_tokens=24)
    results = {}
    for fused_inference in (False, True):
        target, drafter = tiny_models()
        engine = Engine(target, drafter, max_batch_size=3, max_seq_len=64, seed=7, fused_inference=fused_inference)
        results[fused_inference] = engine.generate([Request(i, p, params) for i, p in enumerate(PROMPTS)], sd)
        assert target.fused_inference is fused_inference and drafter.fused_inference is fused_inference
    for plain, fast in zip(results[False], results[True]):
        assert plain.output_ids == fast.output_ids
        torch.testing.assert_close(torch.tensor(fast.logprobs), torch.tensor(plain.logprobs), atol=1e-4, rtol=0)


def test_engine_fuses_small_cpu_models_by_default_and_module_path_turns_it_off_for_a_block():
    target, drafter = tiny_models()
    Engine(target, drafter, max_batch_size=1, max_seq_len=16)
    assert target.fused_inference and drafter.fused_inference
    with fused.module_path(target, drafter):
        assert not target.fused_inference and not drafter.fused_inference
    assert target.fused_inference and drafter.fused_inference
    big, _ = tiny_models()
    Engine(big.double(), None, max_batch_size=1, max_seq_len=16)  # not float32: the module path
    assert not big.fused_inference


def test_a_drafter_whose_own_weights_are_inference_tensors_takes_the_module_path():
    target, _ = tiny_models()
    with torch.inference_mode():
        drafter = make_drafter()[0]
        drafter = type(drafter)(drafter.config, target.embed_tokens)  # built under inference_mode
    drafter.fused_inference = True
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        drafter(ids, torch.randn(1, 3, 3 * drafter.config.hidden_size))  # no version-counter error
    assert "_fused_cache" not in drafter.__dict__


def test_packed_ragged_forward_equals_the_padded_one_at_real_tokens():
    """num_real: the fused path computes only each row's first num_real tokens; logits, hidden
    states and the K/V written for those equal the padded forward's."""
    target, _ = tiny_models()
    target.fused_inference = True
    batch_size, seq_len, prefix = 4, 5, 3
    num_real = torch.tensor([5, 1, 3, 2])
    torch.manual_seed(1)
    prompt = torch.randint(0, target.config.vocab_size, (batch_size, prefix))
    ids = torch.randint(0, target.config.vocab_size, (batch_size, seq_len))
    positions = prefix + torch.arange(seq_len).expand(batch_size, -1)
    outs, caches = [], []
    for packed in (None, num_real):
        cache = KVCache(target.config, batch_size, 16)
        with torch.no_grad():
            target(prompt, None, cache)
            outs.append(target(ids, positions, cache, None, None, None, hidden_layers=(0, 1), num_real=packed))
        caches.append(cache)
    real = torch.arange(seq_len) < num_real[:, None]
    torch.testing.assert_close(outs[1].logits[real], outs[0].logits[real], atol=TOL, rtol=0)
    for dense, packed in zip(outs[0].hidden, outs[1].hidden):
        torch.testing.assert_close(packed[real], dense[real], atol=TOL, rtol=0)
    for row in range(batch_size):
        end = prefix + int(num_real[row])
        torch.testing.assert_close(caches[1].k[:, row, :, :end], caches[0].k[:, row, :, :end], atol=TOL, rtol=0)
        torch.testing.assert_close(caches[1].v[:, row, :, :end], caches[0].v[:, row, :, :end], atol=TOL, rtol=0)
    assert not torch.equal(outs[1].logits[~real], outs[0].logits[~real])  # the padding really was skipped
    target.fused_inference = False


@pytest.mark.parametrize("prompt_len", [fused.FOLD_MAX_QUERIES // 2, fused.FOLD_MAX_QUERIES + 6])
def test_grouped_heads_fold_for_short_rows_only_and_both_ways_equal_the_module_path(prompt_len):
    """Short rows run folded query heads, long ones (a prefill past FOLD_MAX_QUERIES) SDPA's
    grouped-query path on the plain mask; the prefill, the K/V it writes and the next decode
    step equal the module path's either way."""
    target, _ = tiny_models()
    groups = target.config.num_attention_heads // target.config.num_key_value_heads
    assert groups > 1
    mask = fused.additive_mask(torch.ones(2, prompt_len, prompt_len + 1, dtype=torch.bool))
    folded = fused.fold_mask(mask, groups)
    assert folded.shape[2] == (groups * prompt_len if prompt_len <= fused.FOLD_MAX_QUERIES else prompt_len)
    torch.manual_seed(2)
    prompt = torch.randint(0, target.config.vocab_size, (2, prompt_len))
    step = torch.randint(0, target.config.vocab_size, (2, 1))

    def run():
        cache = KVCache(target.config, 2, prompt_len + 4)
        first = target(prompt, None, cache).logits
        second = target(step, torch.full((2, 1), prompt_len), cache).logits
        return first, second, cache.k.clone(), cache.v.clone()

    expected, got = both_paths(target, run)
    for want, have in zip(expected, got):  # float32 rounding of logits up to ~10 in size
        torch.testing.assert_close(have, want, atol=TOL, rtol=1e-4)
