"""Sampling: the distribution a request samples from, and drawing tokens from it.

`sampling_logprobs` is the single definition of "the sampling distribution" for given logits:
temperature, then top-k, then top-p, with -inf outside the support (temperature 0 is greedy,
a point mass on the argmax). Plain decoding samples from it, speculative decoding verifies
against it, and every emitted token's behaviour log-prob is read from it, so the three agree
by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Vocabulary block of sample_probs' two-level inverse CDF.
SAMPLE_BLOCK = 256


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose mass reaches top_p; 1 = off
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.max_new_tokens < 1:
            raise ValueError(f"invalid sampling params {self}: need temperature >= 0, 0 < top_p <= 1, "
                             f"top_k >= 0, max_new_tokens >= 1")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


def _as_param(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or a per-row tensor, shaped to broadcast against `like[..., :1]`."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    return value.reshape(value.shape + (1,) * (like.dim() - value.dim()))


def sampling_logprobs(logits: torch.Tensor, temperature: float | torch.Tensor = 1.0,
                      top_p: float | torch.Tensor = 1.0, top_k: int | torch.Tensor = 0) -> torch.Tensor:
    """Log-probs [..., V] (float32) of the distribution tokens are sampled from.

    Each parameter is a scalar or a tensor whose shape is a prefix of `logits.shape[:-1]`
    (e.g. one value per row [B] for logits [B, T, V]).
    """
    logits = logits.float()
    if isinstance(temperature, (int, float)) and isinstance(top_p, (int, float)) and isinstance(top_k, int):
        # One set of parameters for every row (the common case): no per-row tensors to build.
        if temperature <= 0:
            return torch.full_like(logits, float("-inf")).scatter_(-1, logits.argmax(-1, keepdim=True), 0.0)
        if top_k <= 0 and top_p >= 1:
            return F.log_softmax(logits if temperature == 1 else logits / temperature, dim=-1)
    temperature = _as_param(temperature, logits)
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)

    top_p = _as_param(top_p, logits)
    top_k = _as_param(top_k, logits)
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(logits.shape[-1], device=logits.device)
        keep_sorted = (top_k <= 0) | (rank < top_k)
        # top-p on what top-k kept: keep a token while the mass strictly before it is < top_p,
        # so the most likely token always stays.
        probs = torch.softmax(sorted_logits.masked_fill(~keep_sorted, float("-inf")), dim=-1)
        mass_before = probs.cumsum(-1) - probs
        keep_sorted = keep_sorted & (mass_before < top_p)
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        scaled = scaled.masked_fill(~keep, float("-inf"))

    logprobs = F.log_softmax(scaled, dim=-1)
    if bool(greedy.any()):
        point_mass = torch.full_like(logprobs, float("-inf"))
        point_mass.scatter_(-1, logits.argmax(-1, keepdim=True), 0.0)
        logprobs = torch.where(greedy, point_mass, logprobs)
    return logprobs


def sample(logprobs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `logprobs` [..., V] -> [...], an exact draw from exp(logprobs)."""
    return sample_probs(logprobs.exp(), generator)


def sample_probs(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Like `sample`, for unnormalised non-negative weights [..., V] (e.g. a residual).

    Inverse CDF with one uniform per row, in two levels: the vocabulary in blocks of
    SAMPLE_BLOCK, a block drawn by its mass, then a token within it. One random number a row
    instead of one per vocabulary entry (the exponential race, argmax(p / E), drew V of them: a
    sixth of a CPU decode step at V = 49k), and a cumulative sum over V / SAMPLE_BLOCK + SAMPLE_BLOCK
    entries instead of V (a sequential scan). A block's mass is summed in the weights' dtype
    (for float32, within ~1e-7 relative: the rounding the weights themselves carry), the sums
    across blocks and within the drawn block in float64, so a token's share is its weight to
    that precision anywhere in a large vocabulary, and a zero-weight token is never drawn.
    """
    shape, vocab = probs.shape[:-1], probs.shape[-1]
    flat = probs.reshape(-1, vocab)
    block = min(SAMPLE_BLOCK, vocab)
    if vocab % block:
        flat = F.pad(flat, (0, block - vocab % block))
    blocks = flat.view(flat.shape[0], -1, block)
    # Block sums in the weights' own dtype, then float64: summing in float64 converts the whole
    # [rows, V] tensor first (a fifth of a bf16 decode step at B = 64, V = 49k).
    mass = blocks.sum(-1).to(torch.float64)
    cdf = mass.cumsum(-1)
    u = torch.rand(cdf[:, :1].shape, generator=generator, dtype=torch.float64, device=probs.device)
    point = _below(u * cdf[:, -1:], cdf[:, -1:])
    # Rows of all zeros (an unused residual) end at the last token: never emitted.
    chosen = torch.searchsorted(cdf, point, right=True).clamp_(max=cdf.shape[1] - 1)
    inner = blocks[torch.arange(blocks.shape[0], device=probs.device), chosen[:, 0]].cumsum(-1, dtype=torch.float64)
    offset = _below((point - cdf.gather(1, chosen) + mass.gather(1, chosen)).clamp_(min=0), inner[:, -1:])
    within = torch.searchsorted(inner, offset, right=True).clamp_(max=block - 1)
    return (chosen * block + within).clamp_(max=vocab - 1).view(shape)


def _below(value: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """min(value, the largest float below bound): a point some cumulative weight exceeds, so
    searchsorted(right=True) lands on a token (or block) of positive weight."""
    return torch.minimum(value, torch.nextafter(bound, torch.zeros_like(bound)))


def token_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) for tokens [...] under logprobs [..., V]."""
    return logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
