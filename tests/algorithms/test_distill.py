"""Reward-weighted unrolled distillation loss and reward weights."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from respec_async.algorithms.distill import reward_weights, unroll_drafter, unrolled_distill_loss
from respec_async.engine.drafter import DrafterConfig, Eagle3Drafter


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Tiny tensors: a second OpenMP thread only adds waiting on a shared, loaded machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class TokenTableDrafter(torch.nn.Module):
    """A stand-in drafter whose logits depend only on the input token (a lookup table), with a
    learned mixing of the incoming hidden so the unrolled steps are connected."""

    def __init__(self, vocab_size: int, hidden_size: int, feature_size: int):
        super().__init__()
        self.table = torch.nn.Embedding(vocab_size, vocab_size)
        self.fc = torch.nn.Linear(feature_size, hidden_size, bias=False)
        self.mix = torch.nn.Linear(hidden_size, vocab_size, bias=False)
        self.hidden_size = hidden_size

    config = SimpleNamespace(num_key_value_heads=1, head_dim=2)

    def forward(self, input_ids, hidden, positions=None, cache=None, slots=None, cache_positions=None,
                attn_mask=None):
        if hidden.shape[-1] != self.hidden_size:
            hidden = self.fc(hidden)
        return self.table(input_ids) + self.mix(hidden), torch.tanh(hidden)


def random_batch(batch_size=3, seq_len=12, vocab_size=7, hidden_size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    features = [torch.randn(batch_size, seq_len, hidden_size, generator=generator) for _ in range(3)]
    target_logits = 2 * torch.randn(batch_size, seq_len, vocab_size, generator=generator)
    loss_mask = torch.ones(batch_size, seq_len)
    loss_mask[:, :3] = 0  # a "prompt" that is not learned
    return input_ids, features, target_logits, loss_mask


def test_loss_is_zero_when_the_drafter_matches_the_target_at_every_step():
    vocab_size, hidden_size = 7, 8
    drafter = TokenTableDrafter(vocab_size, hidden_size, 3 * hidden_size)
    torch.nn.init.zeros_(drafter.mix.weight)
    input_ids, features, _, loss_mask = random_batch(vocab_size=vocab_size, hidden_size=hidden_size)
    # The target at position s puts exactly the drafter's distribution for input token x_s.
    target_logits = drafter.table(input_ids).detach() + 5.0  # a shift does not change softmax
    loss, stats = unrolled_distill_loss(drafter, features, input_ids, target_logits, loss_mask, num_steps=4)
    assert abs(loss.item()) < 1e-6
    assert len(stats.loss_per_step) == 4 and all(abs(x) < 1e-6 for x in stats.loss_per_step)
    assert stats.top1_agreement_per_step == [1.0] * 4
    assert all(abs(a - 1.0) < 1e-5 for a in stats.accept_prob_per_step)
    assert stats.expected_acceptance_length == pytest.approx(5.0, abs=1e-4)


def test_features_may_come_as_three_layers_or_one_concatenation():
    drafter = TokenTableDrafter(7, 8, 24)
    input_ids, features, target_logits, loss_mask = random_batch()
    split, _ = unrolled_distill_loss(drafter, features, input_ids, target_logits, loss_mask)
    fused, _ = unrolled_distill_loss(drafter, torch.cat(features, -1), input_ids, target_logits, loss_mask)
    assert torch.allclose(split, fused)


def test_step_j_is_weighted_by_decay_to_the_j_and_the_loss_is_forward_kl():
    torch.manual_seed(0)
    drafter = TokenTableDrafter(7, 8, 24)
    input_ids, features, target_logits, loss_mask = random_batch()
    loss, stats = unrolled_distill_loss(drafter, features, input_ids, target_logits, loss_mask,
                                        num_steps=3, step_decay=0.5)
    assert loss.item() == pytest.approx(sum(0.5 ** j * x for j, x in enumerate(stats.loss_per_step)), rel=1e-5)
    # Step 0 by hand: chain t sees x_{t+1} and f_t, and is scored against the target at t+1.
    draft_logits, _ = drafter(input_ids[:, 1:], torch.cat(features, -1)[:, :-1], None)
    kl = F.kl_div(F.log_softmax(draft_logits, -1), F.log_softmax(target_logits[:, 1:], -1),
                  log_target=True, reduction="none").sum(-1)
    mask = loss_mask[:, 1:]
    assert stats.loss_per_step[0] == pytest.approx(((kl * mask).sum() / mask.sum()).item(), rel=1e-5)


def test_a_few_optimizer_steps_reduce_the_loss():
    torch.manual_seed(0)
    drafter = TokenTableDrafter(7, 8, 24)
    input_ids, features, target_logits, loss_mask = random_batch(batch_size=4, seq_len=16)
    optimizer = torch.optim.Adam(drafter.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        loss, _ = unrolled_distill_loss(drafter, features, input_ids, target_logits, loss_mask, num_steps=3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_a_zero_sample_weight_removes_that_samples_gradient():
    torch.manual_seed(0)
    drafter = TokenTableDrafter(7, 8, 24)
    input_ids, features, target_logits, loss_mask = random_batch(batch_size=2)
    loss, _ = unrolled_distill_loss(drafter, features, input_ids, target_logits, loss_mask,
                                    sample_weights=torch.tensor([1.0, 0.0]))
    with_zero = torch.autograd.grad(loss, list(drafter.parameters()))
    # The same gradient as a batch where sample 1's targets are changed arbitrarily.
    other_logits = target_logits.clone()
    other_logits[1] = torch.randn_like(other_logits[1]) * 3
    loss2, _ = unrolled_distill_loss(drafter, features, input_ids, other_logits, loss_mask,
                                     sample_weights=torch.tensor([1.0, 0.0]))
    changed = torch.autograd.grad(loss2, list(drafter.parameters()))
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(with_zero, changed))
    loss_all, _ = unrolled_distill_loss(drafter, features, input_ids, target_logits, loss_mask)
    assert loss_all.item() > loss.item()


def test_unit_weights_are_plain_kd():
    drafter = TokenTableDrafter(7, 8, 24)
    input_ids, features, target_logits, loss_mask = random_batch()
    plain, _ = unrolled_distill_loss(drafter, features, input_ids, target_logits, loss_mask)
    ones, _ = unrolled_distill_loss(drafter, features, input_ids, target_logits, loss_mask,
                                    sample_weights=torch.ones(3))
    assert torch.allclose(plain, ones)


def test_reduced_draft_vocabulary_renormalises_the_target_and_reports_the_outside_mass():
    vocab_size, draft_ids = 7, torch.tensor([0, 2, 3, 5])
    drafter = TokenTableDrafter(vocab_size, 8, 24)
    drafter.table = torch.nn.Embedding(vocab_size, len(draft_ids))
    drafter.mix = torch.nn.Linear(8, len(draft_ids), bias=False)
    torch.nn.init.zeros_(drafter.mix.weight)
    input_ids, features, _, loss_mask = random_batch(vocab_size=vocab_size)
    target_logits = torch.full((3, 12, vocab_size), -1.0)
    target_logits[..., draft_ids] = drafter.table(input_ids).detach()
    loss, stats = unrolled_distill_loss(drafter, features, input_ids, target_logits, loss_mask,
                                        num_steps=2, draft_vocab_ids=draft_ids)
    assert abs(loss.item()) < 1e-6
    assert 0.0 < stats.outside_mass < 1.0
    assert all(a < 1.0 for a in stats.accept_prob_per_step)  # outside mass is never accepted
    drafter.d2t = draft_ids - torch.arange(len(draft_ids))  # EAGLE-3's offset form, read by default
    by_default, _ = unrolled_distill_loss(drafter, features, input_ids, target_logits, loss_mask, num_steps=2)
    assert torch.allclose(by_default, loss)


def test_mismatched_shapes_are_rejected():
    drafter = TokenTableDrafter(7, 8, 24)
    input_ids, features, target_logits, loss_mask = random_batch()
    with pytest.raises(ValueError, match="must agree"):
        unrolled_distill_loss(drafter, features, input_ids, target_logits[:, :-1], loss_mask)
    with pytest.raises(ValueError, match="sample_weights"):
        unrolled_distill_loss(drafter, features, input_ids, target_logits, loss_mask, sample_weights=torch.ones(2))


def test_reward_weights_minmax_normalise_and_clip_to_w_min():
    weights = reward_weights(torch.tensor([0.0, 0.5, 1.0, 0.25]), w_min=0.1)
    assert torch.allclose(weights, torch.tensor([0.1, 0.5, 1.0, 0.25]))
    assert torch.allclose(reward_weights([2.0, 4.0, 3.0]), torch.tensor([0.05, 1.0, 0.5]))
    assert torch.allclose(reward_weights([-1.0, 1.0], w_min=0.0), torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("rewards", [[1.0, 1.0, 1.0], [0.0, 0.0], [0.3]])
def test_reward_weights_of_all_equal_rewards_are_all_ones(rewards):
    assert torch.equal(reward_weights(rewards), torch.ones(len(rewards)))


def test_reward_weights_reject_nan_and_unknown_modes():
    with pytest.raises(ValueError, match=r"NaN at sample index \[1\]"):
        reward_weights([0.0, math.nan, 1.0])
    with pytest.raises(ValueError, match="mode"):
        reward_weights([0.0, 1.0], mode="softmax")
    with pytest.raises(ValueError, match="w_min"):
        reward_weights([0.0, 1.0], w_min=1.5)
    assert torch.equal(reward_weights([0.0, 1.0], mode="none"), torch.ones(2))
    assert reward_weights([]).numel() == 0


def small_eagle3_drafter(vocab_size=11, hidden_size=16, seed=0):
    torch.manual_seed(seed)
    config = DrafterConfig(hidden_size=hidden_size, intermediate_size=32, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=vocab_size, draft_vocab_size=vocab_size,
                           feature_layers=(0, 1, 2))
    return Eagle3Drafter(config, torch.nn.Embedding(vocab_size, hidden_size))


def test_unrolled_steps_attend_as_drafting_does_prefix_from_features_then_own_chain():
    drafter = small_eagle3_drafter()
    input_ids, features, _, _ = random_batch(batch_size=2, seq_len=9, vocab_size=11, hidden_size=16)
    features = torch.cat(features, -1)
    step_logits = unroll_drafter(drafter, features, input_ids, num_steps=3)
    assert [tuple(x.shape) for x in step_logits] == [(2, 8, 11), (2, 7, 11), (2, 6, 11)]
    with torch.no_grad():
        for root in (0, 3, 5):
            # Drafting from root t: a causal pass over the prefix entries (x_{s+1}, f_s), s <= t,
            # followed by the chain's own entries (x_{t+1+j}, h^{j-1}_t) at positions t+j.
            fused = drafter.fc(features[:, : root + 1])
            ids = input_ids[:, 1: root + 2]
            logits, hidden = drafter(ids, fused)
            assert torch.allclose(logits[:, root], step_logits[0][:, root], atol=1e-5)
            chain_hidden = hidden[:, root:]
            for step in (1, 2):
                ids = torch.cat([ids, input_ids[:, root + 1 + step: root + 2 + step]], 1)
                logits, hidden = drafter(ids, torch.cat([fused, chain_hidden], 1))
                assert torch.allclose(logits[:, -1], step_logits[step][:, root], atol=1e-5)
                chain_hidden = torch.cat([chain_hidden, hidden[:, -1:]], 1)


def test_eagle3_drafter_distills_towards_a_fixed_target():
    drafter = small_eagle3_drafter()
    input_ids, features, target_logits, loss_mask = random_batch(batch_size=4, seq_len=10, vocab_size=11,
                                                                 hidden_size=16)
    optimizer = torch.optim.Adam(drafter.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss, _ = unrolled_distill_loss(drafter, features, input_ids, target_logits, loss_mask, num_steps=4)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert drafter.target_embed.weight.grad is None  # the shared target embedding stays frozen
