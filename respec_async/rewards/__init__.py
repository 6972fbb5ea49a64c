"""Reward sources behind one interface: `await scorer.score(requests) -> results`.

`make_scorer(config)` picks the source from `reward.source`:

- `builtin`: the rule reward of each sample's task (zoo arithmetic, or math final-answer match).
- `python:pkg.module:fn` or `python:/path/to/file.py:fn`: a user function with verl's signature,
  `fn(data_source, solution_str, ground_truth, extra_info=None) -> float | dict` (a dict's
  `score` is the reward; its other keys are logged). With `reward.batched = true` it takes
  lists, `fn(data_sources, solution_strs, ground_truths, extra_infos) -> list`, once per group.
  Sync functions run in a thread pool (`reward.num_workers`), async ones on the event loop.
- `http://host:port/path`: a reward server. `reward.http_format = "batch"` speaks OpenRLHF's
  remote-reward schema: POST `{"query": [prompt + response], "prompts": [...], "labels": [...]}`
  -> `{"rewards": [...]}` (optional `scores`, `extra_logs`), one request per group; `"sample"`
  posts `{"prompt", "response", "label"}` per rollout -> a number or `{"reward": ...}`.
- `zmq://host:port` (or `zmq://ipc:///path`): a native server, `respec reward-serve`
  (respec_async.rewards.server), speaking RewardRequest/RewardResponse from transport.schema.

Several http or zmq URLs, comma-separated, shard the load round robin. Every call to a source
has the same rules: at most `max_concurrency` in flight, `timeout_s` per call, `max_retries`
retries with exponential backoff and jitter, each retry on the next URL. A wrong number of
rewards, NaN, a string, non-JSON: all are errors of that call, retried like a timeout. When the
retries are exhausted the call's rollouts come back with `ScoreResult.error` set (reward 0):
`score` never raises for a failing source; the reward role applies `reward.on_error`.
"""

from __future__ import annotations

from respec_async.config import Config, RewardSection, source_kind, source_urls
from respec_async.rewards.caller import RewardSourceError, ScoreRequest, ScoreResult, Scorer, ScorerStats, to_result

__all__ = ["RewardSourceError", "ScoreRequest", "ScoreResult", "Scorer", "ScorerStats", "make_scorer", "to_result"]


def make_scorer(config: Config | RewardSection) -> Scorer:
    cfg = config.reward if isinstance(config, Config) else config
    kind = source_kind(cfg.source)
    # Each source's module is imported only when it is used (aiohttp, pyzmq's asyncio).
    if kind == "builtin":
        from respec_async.rewards.builtin import BuiltinScorer
        return BuiltinScorer()
    if kind == "python":
        from respec_async.rewards.function import PythonScorer
        return PythonScorer(cfg, cfg.source.strip().removeprefix("python:"))
    if kind == "http":
        from respec_async.rewards.http_client import HttpScorer
        return HttpScorer(cfg, source_urls(cfg.source))
    from respec_async.rewards.zmq_client import ZmqScorer
    return ZmqScorer(cfg, source_urls(cfg.source))
