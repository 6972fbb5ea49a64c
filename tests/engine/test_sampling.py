"""The sampling distribution: temperature, top-k, top-p, greedy, and that `sample` draws from it."""

import pytest
import torch

from respec_async.engine.sampling import SAMPLE_BLOCK, SamplingParams, sample, sample_probs, sampling_logprobs, token_logprobs


def test_temperature_scales_logits_before_softmax():
    logits = torch.randn(3, 7)
    expected = torch.log_softmax(logits / 0.7, dim=-1)
    torch.testing.assert_close(sampling_logprobs(logits, 0.7), expected)


def test_greedy_is_a_point_mass_on_the_argmax():
    logits = torch.randn(4, 9)
    logprobs = sampling_logprobs(logits, 0.0)
    assert torch.equal(logprobs.argmax(-1), logits.argmax(-1))
    assert torch.equal(logprobs.exp().sum(-1), torch.ones(4))
    assert torch.isinf(logprobs).sum() == 4 * 8


def test_top_k_keeps_the_k_most_likely_tokens_renormalised():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    probs = sampling_logprobs(logits, 1.0, top_k=2).exp()
    expected = torch.softmax(torch.tensor([3.0, 2.0]), dim=-1)
    torch.testing.assert_close(probs[0, [1, 3]], expected)
    assert probs[0, [0, 2, 4]].sum() == 0


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = sampling_logprobs(probs.log(), 1.0, top_p=0.8).exp()
    torch.testing.assert_close(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    # the most likely token always survives
    single = sampling_logprobs(probs.log(), 1.0, top_p=0.1).exp()
    torch.testing.assert_close(single, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_top_k_applies_before_top_p():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    # top-k 2 renormalises to (4/7, 3/7); top-p 0.5 then keeps only the first
    kept = sampling_logprobs(probs.log(), 1.0, top_p=0.5, top_k=2).exp()
    torch.testing.assert_close(kept, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_per_row_parameters_match_row_by_row():
    logits = torch.randn(3, 2, 11)
    temperature = torch.tensor([0.0, 0.5, 1.3])
    top_p = torch.tensor([1.0, 0.7, 0.9])
    top_k = torch.tensor([0, 3, 0])
    batched = sampling_logprobs(logits, temperature, top_p, top_k)
    for row in range(3):
        alone = sampling_logprobs(logits[row], float(temperature[row]), float(top_p[row]), int(top_k[row]))
        torch.testing.assert_close(batched[row], alone)


def test_sample_frequencies_match_the_distribution():
    """200k draws from a 6-token distribution; every frequency within 5 sigma (false alarm < 1e-5)."""
    generator = torch.Generator().manual_seed(0)
    logprobs = sampling_logprobs(torch.randn(6, generator=generator), 0.9, top_p=0.95)
    draws = sample(logprobs.expand(200_000, -1), generator)
    freq = torch.bincount(draws, minlength=6).double() / 200_000
    probs = logprobs.exp().double()
    sigma = (probs * (1 - probs) / 200_000).sqrt()
    assert torch.all((freq - probs).abs() <= 5 * sigma + 1e-12)
    assert torch.all(freq[probs == 0] == 0)


def test_a_vocabulary_of_several_blocks_is_sampled_exactly():
    """sample_probs picks a block, then a token in it: a 600-token vocabulary (blocks of 256, the
    last one padded), a third of the weights zero. 60k draws; every token's frequency within 5
    sigma (false alarm < 600 x 5.7e-7 = 3.4e-4) and no zero-weight token drawn."""
    assert 600 > 2 * SAMPLE_BLOCK and 600 % SAMPLE_BLOCK
    generator = torch.Generator().manual_seed(2)
    weights = torch.rand(600, generator=generator) * (torch.rand(600, generator=generator) > 1 / 3)
    draws = 60_000
    tokens = sample_probs(weights.expand(draws, -1), generator)
    freq = torch.bincount(tokens, minlength=600).double() / draws
    probs = weights.double() / weights.double().sum()
    sigma = (probs * (1 - probs) / draws).sqrt()
    assert torch.all((freq - probs).abs() <= 5 * sigma + 1e-12)
    assert torch.all(freq[weights == 0] == 0)


def test_zero_weight_tokens_are_never_drawn():
    weights = torch.tensor([[0.0, 2.0, 0.0, 1.0, 0.0], [3.0, 0.0, 0.0, 0.0, 0.0]])
    tokens = sample_probs(weights.expand(50_000, -1, -1), torch.Generator().manual_seed(1))
    assert tokens.shape == (50_000, 2)
    assert set(tokens[:, 0].unique().tolist()) == {1, 3} and set(tokens[:, 1].unique().tolist()) == {0}


def test_token_logprobs_reads_the_sampled_tokens():
    logprobs = torch.log_softmax(torch.randn(2, 3, 5), dim=-1)
    tokens = torch.tensor([[0, 4, 2], [1, 1, 3]])
    expected = torch.stack([torch.stack([logprobs[b, t, tokens[b, t]] for t in range(3)]) for b in range(2)])
    torch.testing.assert_close(token_logprobs(logprobs, tokens), expected)


def test_sampling_params_validate():
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
