"""What the engine takes and gives: a request, its completion, a speculative-decoding
configuration (ReSpec's (s, t, n) and its draft source), and one step's statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from respec_async.engine.sampling import SamplingParams

SOURCES = ("eagle", "history")
MAX_HISTORY_DRAFT_TOKENS = 64


@dataclass(frozen=True)
class SDConfig:
    """One speculative-decoding configuration (ReSpec's (s, t, n)) and where its drafts come from.

    num_steps s: tree depth (drafter forwards per step for "eagle"). top_k t: children per
    expanded node; t = 1 is a chain of s drafts. num_draft_tokens n: drafted tokens verified per
    sequence, the best n of the tree (the root is extra); a chain verifies exactly its s drafts,
    so for t = 1 a larger n is clamped to s (and a smaller one is an error). source: "eagle"
    (the neural drafter) or "history" (engine/history.py: earlier rollouts of the same prompt,
    no model call; rows without a match get no drafts and decode one token).
    """

    num_steps: int
    top_k: int = 1
    num_draft_tokens: int | None = None
    source: str = "eagle"

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"SDConfig source must be one of {SOURCES}, got {self.source!r}")
        if self.num_draft_tokens is None:
            object.__setattr__(self, "num_draft_tokens", self.num_steps if self.top_k == 1 else self.num_steps * self.top_k)
        s, t, n = self.num_steps, self.top_k, self.num_draft_tokens
        if s < 1 or t < 1 or n < 1:
            raise ValueError(f"SDConfig needs num_steps, top_k, num_draft_tokens >= 1, got {self}")
        if t == 1 and n < s:
            raise ValueError(f"a chain (top_k 1) verifies its num_steps drafts: num_draft_tokens must be >= {s}, got {n}")
        if t == 1:
            n = s
            object.__setattr__(self, "num_draft_tokens", n)
        if self.source == "eagle" and n > t + (s - 1) * t * t:
            raise ValueError(f"{self} drafts at most {t + (s - 1) * t * t} candidates, fewer than num_draft_tokens")
        if self.source == "history" and n > MAX_HISTORY_DRAFT_TOKENS:
            raise ValueError(f"{self}: a history tree has at most {MAX_HISTORY_DRAFT_TOKENS} draft tokens")

    @property
    def is_chain(self) -> bool:
        return self.top_k == 1

    @property
    def uses_drafter(self) -> bool:
        return self.source == "eagle"


@dataclass
class Request:
    request_id: str | int
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Completion:
    request_id: str | int
    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: list[float]  # behaviour log-prob of each output token
    finish_reason: str  # "stop" (a stop token, included in output_ids) or "length"
    num_drafted: int = 0
    num_accepted: int = 0
    num_verify_steps: int = 0
    num_decode_steps: int = 0  # forwards after the prefill that emitted tokens for this sequence
    acceptance_length: float = 0.0  # mean (accepted + 1) per verify step; 0 without SD
    # The share of the three counts above that history drafts made (the rest: EAGLE's).
    num_history_drafted: int = 0
    num_history_accepted: int = 0
    num_history_verify_steps: int = 0


@dataclass
class StepStats:
    mode: str  # "plain", "sd" or "idle"
    sd: SDConfig | None
    num_active: int  # sequences decoded in this step
    num_admitted: int
    num_emitted: int
    duration_s: float
    num_accepted: int = 0  # drafts accepted in this step, summed over sequences (before any stop cut)
    num_drafted: int = 0  # draft tokens verified in this step, summed over sequences
    draft_s: float = 0.0  # seconds spent drafting from history (0 for EAGLE: its drafting is model calls)
    # Shadow chains scored in this step (HistoryIndex.shadow_chains; an unverified history
    # chain's acceptance, sampled for free): shadow_tests[j] drafts at position j were compared
    # with the row's own token, shadow_hits[j] of them matched.
    shadow_tests: list[int] = field(default_factory=list)
    shadow_hits: list[int] = field(default_factory=list)
    # Of num_admitted, those prefilled; the rest took a sibling's prompt (Engine.share_prompts)
    # and cost one one-token forward between them. None: all of them.
    num_prefilled: int | None = None


# What Engine.generate consults before every step: a fixed config, none (plain), or a function
# of the active batch size.
SDPolicy = SDConfig | Callable[[int], SDConfig | None] | None
