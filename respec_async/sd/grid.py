"""SD configs as the adaptive server names them: `"plain"`, `"s,t,n"` (EAGLE drafter) and
`"history:s,t,n"` (rollout history), parsed into `engine.SDConfig`, and what an engine needs
to run a grid of them (draft budget, history index, shadow length)."""

from __future__ import annotations

from typing import Iterable

from respec_async.engine.requests import SDConfig

PLAIN = "plain"
HISTORY_PREFIX = "history:"
FULL_WIDTH = 2 ** 62  # Engine.min_packed_saving that never packs


def config_key(sd: SDConfig | None) -> str:
    if sd is None:
        return PLAIN
    prefix = HISTORY_PREFIX if sd.source == "history" else ""
    return f"{prefix}{sd.num_steps},{sd.top_k},{sd.num_draft_tokens}"


def parse_config(text: str) -> SDConfig:
    """'s,t,n' (or 's,t'; the EAGLE drafter) or 'history:s,t,n' (engine/history.py) -> SDConfig;
    ValueError naming the text when it is not a valid config."""
    source = "eagle"
    body = text
    if text.startswith(HISTORY_PREFIX):
        source, body = "history", text[len(HISTORY_PREFIX):]
    try:
        parts = [int(x) for x in body.split(",")]
        if not 1 <= len(parts) <= 3:
            raise ValueError("expected 's,t,n' or 'history:s,t,n'")
        return SDConfig(*parts, source=source)
    except ValueError as exc:
        raise ValueError(f"SD config {text!r}: {exc}") from None


def is_history(key: str) -> bool:
    return key.startswith(HISTORY_PREFIX)


def bucket_of(batch_size: int) -> int:
    """Batch-size bucket of the online history-acceptance estimates: 0 for B = 1, 1 for 2-3, ..."""
    return max(1, batch_size).bit_length() - 1


def parse_grid(items: Iterable[str]) -> list[SDConfig]:
    configs = [parse_config(item) for item in items]
    if not configs:
        raise ValueError("the SD grid is empty")
    return list(dict.fromkeys(configs))  # drop duplicates, keep order


def engine_draft_budget(configs: Iterable[SDConfig]) -> int:
    """The Engine's max_draft_tokens that fits every config (its default 64 at least)."""
    return max([64] + [max(sd.num_draft_tokens, (sd.num_steps - 1) * sd.top_k) for sd in configs])


def history_index_for(configs: Iterable[SDConfig], **kwargs):
    """A fresh HistoryIndex when any config drafts from history, else None."""
    if not any(sd.source == "history" for sd in configs):
        return None
    from respec_async.engine.history import HistoryIndex

    return HistoryIndex(**kwargs)


def shadow_length(configs: Iterable[SDConfig]) -> int:
    """The shadow chain length that scores every history chain config (0: none)."""
    return max([0] + [sd.num_steps for sd in configs if sd.source == "history" and sd.is_chain])
