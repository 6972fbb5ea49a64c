"""GRPO-family policy loss with off-policy correction, for rollouts sampled by older weights.

Per group of G samples of one prompt, advantages are the group-normalised rewards. The loss is
decoupled PPO: the clipped ratio is taken against the *proximal* policy (the trainer's weights
at the start of this optimizer step, detached), and the gap between the proximal policy and
the *behaviour* policy that actually sampled each token (the generator's log-probs, possibly
several versions old) is corrected by a truncated importance weight. Tokens are aggregated at
the token level: every completion token of the batch counts once.

    A_i      = (r_i - mean(r)) / (std(r) + eps)                 # per group
    rho      = exp(logp_theta - logp_prox)                       # PPO ratio (1 at the first pass)
    w        = min(exp(logp_prox - logp_behaviour), is_cap)      # truncated IS, no gradient
    pg       = -w * min(rho * A, clip(rho, 1 - clip_low, 1 + clip_high) * A)
    kl       = exp(logp_ref - logp) - (logp_ref - logp) - 1      # k3 estimator, optional
    loss     = sum_tokens(pg + kl_coef * kl) / num_tokens
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def group_advantages(rewards: torch.Tensor, normalize_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """rewards [num_groups, G] -> advantages [num_groups, G]. All-equal groups get zero."""
    centered = rewards - rewards.mean(dim=-1, keepdim=True)
    if not normalize_std:
        return centered
    return centered / (rewards.std(dim=-1, keepdim=True, unbiased=False) + eps)


def completion_logprobs(model: torch.nn.Module, prompts: list[list[int]], completions: list[list[int]],
                        temperature: float = 1.0, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of each completion token under `model` at `temperature`, right-padded.

    Returns (logprobs [N, T], mask [N, T]) with T the longest completion. One causal forward
    over prompt + completion per row; right padding cannot affect earlier positions.
    """
    device = next(model.parameters()).device
    rows = [p + c for p, c in zip(prompts, completions)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, device=device)
    logits = model(ids).logits.float()
    if temperature > 0:
        logits = logits / temperature
    logps = F.log_softmax(logits, dim=-1)
    longest = max(len(c) for c in completions)
    out = torch.zeros(len(rows), longest, device=device)
    mask = torch.zeros(len(rows), longest, device=device)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if not c:
            continue
        # The token at position len(p) + j is predicted from position len(p) + j - 1.
        positions = torch.arange(len(p) - 1, len(p) - 1 + len(c), device=device)
        targets = torch.tensor(c, device=device)
        out[i, : len(c)] = logps[i, positions, targets]
        mask[i, : len(c)] = 1.0
    return out, mask


@dataclass
class LossStats:
    loss: float
    policy_loss: float
    kl: float
    clip_fraction: float
    is_weight_mean: float
    is_truncated_fraction: float
    num_tokens: int


def grpo_loss(
    logprobs: torch.Tensor,
    proximal_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    is_cap: float = 2.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, LossStats]:
    """All token tensors are [N, T]; advantages [N] (one per sample)."""
    num_tokens = mask.sum().clamp(min=1.0)
    adv = advantages[:, None]
    ratio = torch.exp(logprobs - proximal_logprobs.detach())
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    raw_is = torch.exp(proximal_logprobs - behaviour_logprobs).detach()
    is_weight = raw_is.clamp(max=is_cap)
    per_token = -is_weight * torch.minimum(ratio * adv, clipped * adv)
    policy_loss = (per_token * mask).sum() / num_tokens
    kl = torch.zeros((), device=logprobs.device)
    if ref_logprobs is not None and kl_coef > 0:
        log_r = ref_logprobs.detach() - logprobs
        kl = ((torch.exp(log_r) - log_r - 1.0) * mask).sum() / num_tokens
    loss = policy_loss + kl_coef * kl
    with torch.no_grad():
        was_clipped = ((ratio * adv) > (clipped * adv)).float()
        stats = LossStats(
            loss=float(loss),
            policy_loss=float(policy_loss),
            kl=float(kl),
            clip_fraction=float((was_clipped * mask).sum() / num_tokens),
            is_weight_mean=float((is_weight * mask).sum() / num_tokens),
            is_truncated_fraction=float(((raw_is > is_cap).float() * mask).sum() / num_tokens),
            num_tokens=int(mask.sum()),
        )
    return loss, stats
