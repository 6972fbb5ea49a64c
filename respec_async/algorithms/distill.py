"""Reward-weighted, unrolled multi-step distillation of an EAGLE-3 drafter (ReSpec's drafter loss).

The drafter is trained the way it drafts ("training-time test"). For a chain rooted at position
t of a sequence x_0..x_{T-1}:

    step 0:  input (embed(x_{t+1}), target features f_t)   -> q^0_t, hidden h^0_t
    step j:  input (embed(x_{t+1+j}), h^{j-1}_t)             -> q^j_t, hidden h^j_t
    target of step j at t: p_{t+1+j}, the target's distribution at position t+1+j

so step j > 0 sees the drafter's own hidden from the previous step (one position back in the
token stream) instead of the target's features, and predicts one position further, exactly
as it does when it drafts j+1 tokens ahead. Gradients flow through the unrolled hidden states.

    KL_j(b, t)  = KL(p_{t+1+j} || q^j_t)                     (forward KL, temperature tau on both)
    loss_j      = sum_{b,t} w_b * m_{b,t+1+j} * KL_j(b, t) / sum_{b,t} m_{b,t+1+j}
    loss        = sum_j step_decay^j * loss_j                (EAGLE-3: 7 steps, 0.8^j)

w_b is the sample's weight (ReSpec: its reward, normalised in the batch by `reward_weights`;
w = 1 is plain KD). The denominator counts tokens, not weights, so w scales each sample's
contribution: a weight of 0 removes the sample's gradient, and a batch of low-reward samples
moves the drafter less.

Reduced draft vocabulary: the drafter only has logits for `draft_vocab_ids` (target ids). The
target distribution is renormalised over those ids before the KL, so the loss is zero exactly
when the drafter matches the target on the tokens it can propose; the target mass outside the
draft vocabulary can never be accepted and is reported as `outside_mass`, not trained on.

Attention is the one drafting sees. When the drafter drafts j+1 tokens from root t, its query
attends to the prefix's keys, built from target features (step-0 entries 0..t), and to the
keys of its own chain's earlier steps (steps 1..j of chain t), nothing else. Every step is one
batched drafter call that writes its keys into an unrolling cache at index step * L0 + t
(L0 = T - 1 chains) and attends through an explicit mask with exactly those entries, so the
training-time attention equals the inference-time one instead of being causal over the
other chains' step-j states.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass
class DistillStats:
    loss: float
    loss_per_step: list[float] = field(default_factory=list)
    # Fraction of masked positions where the drafter's argmax is the target's argmax.
    top1_agreement_per_step: list[float] = field(default_factory=list)
    # Expected acceptance of one token drafted from q and verified against p: sum_v min(p, q).
    accept_prob_per_step: list[float] = field(default_factory=list)
    outside_mass: float = 0.0  # mean target probability outside the draft vocabulary
    num_tokens: int = 0  # masked positions at step 0

    @property
    def expected_acceptance_length(self) -> float:
        """Tokens per verify step of a chain draft with these per-step acceptance rates, counting
        the token the target adds itself: 1 + sum_k prod_{j<k} a_j (acceptances treated as
        independent, so an estimate)."""
        length, survive = 1.0, 1.0
        for accept in self.accept_prob_per_step:
            survive *= accept
            length += survive
        return length


def reward_weights(rewards: torch.Tensor | Sequence[float], w_min: float = 0.05,
                   mode: str = "minmax") -> torch.Tensor:
    """Per-sample distillation weights from rewards, normalised within the batch.

    mode "minmax": w = (r - min r) / (max r - min r), clipped to [w_min, 1]; the best sample
    of the batch gets 1, the worst w_min (not 0: a low-reward sample still says something
    about the actor's distribution, so it is down-weighted rather than dropped).
    mode "none": w = 1 for every sample (plain KD).
    When every reward is equal there is nothing to rank, and all weights are 1: the batch is
    distilled as plain KD rather than being scaled down as a whole.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be one value per sample, got shape {tuple(rewards.shape)}")
    if not 0.0 <= w_min <= 1.0:
        raise ValueError(f"w_min must be in [0, 1], got {w_min}")
    if torch.isnan(rewards).any():
        bad = torch.nonzero(torch.isnan(rewards)).flatten().tolist()
        raise ValueError(f"rewards contain NaN at sample index {bad}; score or drop those samples first")
    if mode == "none" or rewards.numel() == 0:
        return torch.ones_like(rewards)
    if mode != "minmax":
        raise ValueError(f"unknown reward weighting mode {mode!r} (expected 'minmax' or 'none')")
    if torch.isinf(rewards).any():
        raise ValueError("rewards contain an infinite value; min-max normalisation needs finite rewards")
    low, high = rewards.min(), rewards.max()
    if high == low:
        return torch.ones_like(rewards)
    return ((rewards - low) / (high - low)).clamp(min=w_min, max=1.0)


def _draft_vocab_ids(drafter: torch.nn.Module, draft_vocab_size: int, target_vocab_size: int,
                     device: torch.device) -> torch.Tensor | None:
    """Target ids of the draft vocabulary, or None when the drafter uses the full vocabulary."""
    if draft_vocab_size == target_vocab_size:
        return None
    ids = getattr(drafter, "draft_vocab_ids", None)
    if ids is None:
        # EAGLE-3 stores the mapping as an offset: target_id = draft_id + d2t[draft_id].
        d2t = getattr(drafter, "d2t", None)
        if d2t is None:
            raise ValueError(f"drafter has a {draft_vocab_size}-token vocabulary but the target has "
                             f"{target_vocab_size}, and neither draft_vocab_ids nor d2t to map them")
        ids = torch.arange(draft_vocab_size, device=d2t.device) + d2t
    return torch.as_tensor(ids, device=device, dtype=torch.long)


class _UnrollingCache:
    """K/V of every unrolled step, in the layout of engine.model.KVCache (k, v: [1 layer, slots,
    kv_heads, positions, head_dim]) so the drafter writes and reads it as it does when drafting.
    It grows by one step's worth of entries per step; growing by concatenation (a new tensor)
    rather than writing into one preallocated buffer keeps every earlier step's keys, which
    autograd still needs, untouched."""

    def __init__(self, drafter: torch.nn.Module, batch_size: int, device: torch.device, dtype: torch.dtype):
        config = drafter.config
        shape = (1, batch_size, config.num_key_value_heads, 0, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def extend(self, num_positions: int) -> None:
        grow = list(self.k.shape)
        grow[3] = num_positions
        self.k = torch.cat([self.k, self.k.new_zeros(grow)], dim=3)
        self.v = torch.cat([self.v, self.v.new_zeros(grow)], dim=3)


def _unrolled_mask(num_chains: int, step: int, length: int, batch_size: int, device: torch.device) -> torch.Tensor:
    """Bool [B, length, (step + 1) * num_chains]: chain t at this step sees step-0 entries 0..t
    (the prefix, from target features) and its own entries of steps 1..step."""
    chains = torch.arange(length, device=device)
    mask = torch.zeros(length, (step + 1) * num_chains, dtype=torch.bool, device=device)
    mask[:, :num_chains] = torch.arange(num_chains, device=device)[None, :] <= chains[:, None]
    for earlier in range(1, step + 1):
        mask[chains, earlier * num_chains + chains] = True
    return mask.unsqueeze(0).expand(batch_size, -1, -1)


def unroll_drafter(drafter: torch.nn.Module, target_features: torch.Tensor | Sequence[torch.Tensor],
                   input_ids: torch.Tensor, num_steps: int) -> list[torch.Tensor]:
    """The drafter's logits at every unrolled step: entry j is [B, T - 1 - j, V_draft], row t the
    prediction of chain t for position t + 1 + j (see module docstring)."""
    if not isinstance(target_features, torch.Tensor):
        target_features = torch.cat(list(target_features), dim=-1)
    batch_size, seq_len = input_ids.shape
    device = input_ids.device
    num_chains = seq_len - 1
    cache = _UnrollingCache(drafter, batch_size, device, next(drafter.parameters()).dtype)
    slots = torch.arange(batch_size, device=device)
    hidden = target_features.detach()
    step_logits = []
    for step in range(min(num_steps, num_chains)):
        length = num_chains - step
        chains = torch.arange(length, device=device)
        positions = (chains + step).unsqueeze(0).expand(batch_size, -1)
        cache_positions = (chains + step * num_chains).unsqueeze(0).expand(batch_size, -1)
        cache.extend(num_chains)
        # Chain t's input at this step is token x_{t+1+step} with the previous step's hidden.
        draft_logits, out_hidden = drafter(input_ids[:, 1 + step:], hidden[:, :length], positions, cache=cache,
                                           slots=slots, cache_positions=cache_positions,
                                           attn_mask=_unrolled_mask(num_chains, step, length, batch_size, device))
        step_logits.append(draft_logits)
        hidden = out_hidden
    return step_logits


def unrolled_distill_loss(
    drafter: torch.nn.Module,
    target_features: torch.Tensor | Sequence[torch.Tensor],
    input_ids: torch.Tensor,
    target_logits: torch.Tensor,
    loss_mask: torch.Tensor,
    sample_weights: torch.Tensor | None = None,
    num_steps: int = 7,
    step_decay: float = 0.8,
    temperature: float = 1.0,
    draft_vocab_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, DistillStats]:
    """The reward-weighted unrolled KD loss of a drafter against its target (see module docstring).

    target_features: the target's fused-layer hidden states, three [B, T, H] (low, mid, high)
        or one [B, T, 3H], at every position; no gradient is taken through them.
    input_ids [B, T]: the token stream, right-padded.
    target_logits [B, T, V]: the target's logits at every position (position s predicts s+1).
    loss_mask [B, T]: 1 where the target's distribution at that position is to be learned
        (typically the positions that predict completion tokens), 0 on prompts and padding.
    sample_weights [B] or None (= all ones).
    draft_vocab_ids [V_draft]: target ids of the draft vocabulary; by default read from the
        drafter (`draft_vocab_ids` or EAGLE-3's `d2t`), or the identity when V_draft = V.
    """
    batch_size, seq_len = input_ids.shape
    if target_logits.shape[:2] != (batch_size, seq_len) or loss_mask.shape != (batch_size, seq_len):
        raise ValueError(f"input_ids {tuple(input_ids.shape)}, target_logits {tuple(target_logits.shape)} "
                         f"and loss_mask {tuple(loss_mask.shape)} must agree on [B, T]")
    if num_steps < 1 or temperature <= 0:
        raise ValueError(f"need num_steps >= 1 and temperature > 0, got {num_steps} and {temperature}")
    device = input_ids.device
    weights = (torch.ones(batch_size, device=device) if sample_weights is None
               else torch.as_tensor(sample_weights, dtype=torch.float32, device=device))
    if weights.shape != (batch_size,):
        raise ValueError(f"sample_weights must have shape [{batch_size}], got {tuple(weights.shape)}")
    target_logits = target_logits.detach().float() / temperature
    loss_mask = loss_mask.to(torch.float32)

    step_logits = unroll_drafter(drafter, target_features, input_ids, num_steps)
    vocab_ids = draft_vocab_ids
    if vocab_ids is None and step_logits:
        vocab_ids = _draft_vocab_ids(drafter, step_logits[0].shape[-1], target_logits.shape[-1], device)

    total = torch.zeros((), device=device)
    stats = DistillStats(loss=0.0)
    for step, draft_logits in enumerate(step_logits):
        full_target = target_logits[:, 1 + step:]
        target_full_logp = F.log_softmax(full_target, dim=-1)
        target_logp = (target_full_logp if vocab_ids is None
                       else F.log_softmax(full_target[..., vocab_ids], dim=-1))
        draft_logp = F.log_softmax(draft_logits.float() / temperature, dim=-1)
        kl = (target_logp.exp() * (target_logp - draft_logp)).sum(-1)  # [B, T - 1 - step]
        mask = loss_mask[:, 1 + step:]
        num_tokens = mask.sum()
        step_loss = (kl * mask * weights[:, None]).sum() / num_tokens.clamp(min=1.0)
        total = total + step_decay ** step * step_loss

        with torch.no_grad():
            full_p = target_full_logp.exp()
            draft_top1 = draft_logits.argmax(-1)
            if vocab_ids is not None:
                full_p = full_p[..., vocab_ids]
                draft_top1 = vocab_ids[draft_top1]
            agree = (draft_top1 == full_target.argmax(-1)).float()
            accept = torch.minimum(full_p, draft_logp.exp()).sum(-1)
            denominator = max(num_tokens.item(), 1.0)
            stats.loss_per_step.append(step_loss.item())
            stats.top1_agreement_per_step.append((agree * mask).sum().item() / denominator)
            stats.accept_prob_per_step.append((accept * mask).sum().item() / denominator)
            if step == 0:
                stats.num_tokens = int(num_tokens.item())
                stats.outside_mass = ((1.0 - full_p.sum(-1)) * mask).sum().item() / denominator
    stats.loss = total.item()
    return total, stats
