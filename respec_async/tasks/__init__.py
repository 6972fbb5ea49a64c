"""Tasks: prompts with verifiable answers and their rule rewards.

`arithmetic` is the synthetic task of the tiny zoo (multi-digit addition written out column by
column); `math` scores GSM8K-style final answers; `dataset` reads a JSONL file of prompt/answer
records in a deterministic, resumable order.
"""

from respec_async.tasks import arithmetic, math


def rule_reward(data_source: str, completion_text: str, answer: str) -> float:
    """The reward of a completion for its sample's data source (`reward.source = "builtin"`)."""
    if data_source == "arithmetic":
        return arithmetic.reward(completion_text, answer)
    if data_source == "addition":
        return arithmetic.last_number_reward(completion_text, answer)
    if data_source == "math":
        return math.reward(completion_text, answer)
    raise ValueError(f"no rule reward for data source {data_source!r}")
