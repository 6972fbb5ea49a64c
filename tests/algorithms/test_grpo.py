"""GRPO loss: advantages, clipping, truncated importance weights, token aggregation."""

from __future__ import annotations

import pytest
import torch

from respec_async.algorithms.grpo import grpo_loss, group_advantages


def test_group_advantages_are_zero_mean_unit_std_and_zero_for_equal_groups():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]]))
    assert torch.allclose(adv[0].mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(adv[0].std(unbiased=False), torch.tensor(1.0), atol=1e-4)
    assert torch.all(adv[1] == 0)


def test_on_policy_gradient_is_advantage_weighted_logprob_gradient():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, requires_grad=True)
    lp = torch.log_softmax(logits, -1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float)
    adv = torch.tensor([1.0, -0.5, 2.0])
    loss, stats = grpo_loss(lp, lp.detach(), lp.detach(), adv, mask)
    loss.backward()
    logits2 = logits.detach().clone().requires_grad_(True)
    lp2 = torch.log_softmax(logits2, -1)
    (-(lp2 * adv[:, None] * mask).sum() / mask.sum()).backward()
    assert torch.allclose(logits.grad, logits2.grad, atol=1e-6)
    assert stats.num_tokens == 9 and stats.clip_fraction == 0.0 and abs(stats.is_weight_mean - 1.0) < 1e-6


def test_ratio_beyond_the_clip_range_gets_no_gradient():
    lp = torch.tensor([[0.0]], requires_grad=True)
    prox = torch.tensor([[-1.0]])  # ratio e^1 ~ 2.7 > 1 + clip_high
    loss, stats = grpo_loss(lp, prox, prox, torch.tensor([1.0]), torch.ones(1, 1))
    loss.backward()
    assert lp.grad.abs().item() == 0.0
    assert stats.clip_fraction == 1.0


def test_importance_weight_is_truncated_at_the_cap():
    lp = torch.zeros(1, 2, requires_grad=True)
    behaviour = torch.tensor([[-5.0, -0.1]])  # stale sampler put much less mass on token 0
    loss, stats = grpo_loss(lp, lp.detach(), behaviour, torch.tensor([1.0]), torch.ones(1, 2), is_cap=2.0)
    loss.backward()
    assert torch.allclose(lp.grad, -torch.tensor([[2.0, torch.exp(torch.tensor(0.1)).item()]]) / 2, atol=1e-6)
    assert stats.is_truncated_fraction == 0.5


def test_kl_penalty_is_zero_at_the_reference_and_positive_away_from_it():
    lp = torch.log_softmax(torch.randn(2, 4), -1)
    mask = torch.ones(2, 4)
    _, same = grpo_loss(lp, lp, lp, torch.zeros(2), mask, ref_logprobs=lp, kl_coef=0.1)
    _, away = grpo_loss(lp, lp, lp, torch.zeros(2), mask, ref_logprobs=lp - 0.5, kl_coef=0.1)
    assert abs(same.kl) < 1e-7 and away.kl > 0.1


def test_loss_value_matches_a_hand_computation():
    """Two samples of one group (rewards 1 and 0: advantages +1 and -1), three token slots, the
    second sample one token shorter; the numbers worked out by hand from the module docstring."""
    import math

    adv = group_advantages(torch.tensor([[1.0, 0.0]]))[0]
    assert torch.allclose(adv, torch.tensor([1.0, -1.0]), atol=1e-5)
    theta = torch.tensor([[-0.7, -0.5, -2.0], [-1.5, -0.2, 0.0]])
    prox = torch.tensor([[-1.2, -0.5, -1.0], [-1.5, -0.6, 0.0]])
    behaviour = torch.tensor([[-1.2, -2.0, -1.0], [-0.5, -0.6, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss, stats = grpo_loss(theta, prox, behaviour, adv, mask, clip_low=0.2, clip_high=0.28, is_cap=2.0)
    # Sample 0, A = +1: ratios e^0.5 = 1.649 (clipped to 1.28), 1, e^-1 = 0.368 (below 0.8: the
    # min keeps it); IS weights 1, min(e^1.5, 2) = 2, 1; pg = -1.28, -2, -0.368.
    # Sample 1, A = -1: ratios 1, e^0.4 = 1.492 (above 1.28, but with A < 0 the min keeps the
    # unclipped term); IS weights e^-1 = 0.368, 1; pg = 0.368, 1.492.
    expected = (-1.28 - 2.0 - math.exp(-1.0) + math.exp(-1.0) + math.exp(0.4)) / 5
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert stats.num_tokens == 5 and stats.is_truncated_fraction == pytest.approx(1 / 5)
    assert stats.is_weight_mean == pytest.approx((1 + 2 + 1 + math.exp(-1.0) + 1) / 5, rel=1e-5)
    assert stats.clip_fraction == pytest.approx(1 / 5)  # sample 0's first token only
