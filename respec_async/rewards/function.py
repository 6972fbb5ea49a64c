"""`reward.source = "python:pkg.module:fn"` (or `python:/path/file.py:fn`): a user function with
verl's signature, per rollout or batched per group."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from respec_async.config import RewardSection
from respec_async.rewards.caller import Caller, ScoreRequest, ScoreResult, expect_list, failed, to_result

# Threads beyond num_workers, for calls abandoned after a timeout that keep running (a thread
# cannot be killed); they keep the pool serving while a stuck call finishes, if ever.
_SPARE_THREADS = 32


def load_function(spec: str) -> Callable[..., Any]:
    """`pkg.module:fn` or `/path/to/file.py:fn` -> the function."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(f"reward function {spec!r}: expected pkg.module:function or /path/file.py:function")
    if target.endswith(".py") or "/" in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"reward function {spec!r}: no such file {path}")
        module_name = f"respec_user_reward_{abs(hash(str(path)))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ValueError(f"reward function {spec!r}: cannot import {target}: {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {target} has no function {name!r}")
    return fn


class PythonScorer:
    """A user function, per rollout or batched per group; sync functions in a thread pool of
    `num_workers` (a call abandoned after its timeout frees its slot; its thread finishes
    aside), async ones on the loop with `max_concurrency` calls in flight."""

    def __init__(self, cfg: RewardSection, spec: str, fn: Callable[..., Any] | None = None) -> None:
        self.fn = fn if fn is not None else load_function(spec)
        self.name = f"python:{spec}"
        self.batched = cfg.batched
        self.is_async = inspect.iscoroutinefunction(self.fn)
        self.executor = None if self.is_async else ThreadPoolExecutor(
            cfg.num_workers + _SPARE_THREADS, thread_name_prefix="reward-fn")
        self.caller = Caller(cfg, [self.name], cfg.max_concurrency if self.is_async else cfg.num_workers)
        self.stats = self.caller.stats

    async def _invoke(self, *args: Any) -> Any:
        if self.is_async:
            return await self.fn(*args)
        assert self.executor is not None
        return await asyncio.wrap_future(self.executor.submit(self.fn, *args))

    @staticmethod
    def _extra_info(r: ScoreRequest) -> dict[str, Any]:
        return {"rollout_id": r.rollout_id, "prompt": r.prompt_text}

    async def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        if not requests:
            return []
        if self.batched:
            return await self._score_batch(requests)
        return list(await asyncio.gather(*(self._score_one(r) for r in requests)))

    async def _score_one(self, r: ScoreRequest) -> ScoreResult:
        async def attempt(_: str) -> ScoreResult:
            value = await self._invoke(r.data_source, r.completion_text, r.answer, self._extra_info(r))
            return to_result(value, self.name)

        result, _, error = await self.caller.call(attempt, [r.rollout_id])
        return result if result is not None else failed(1, self.name, error)[0]

    async def _score_batch(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        async def attempt(_: str) -> list[ScoreResult]:
            values = await self._invoke([r.data_source for r in requests], [r.completion_text for r in requests],
                                        [r.answer for r in requests], [self._extra_info(r) for r in requests])
            values = expect_list(values, len(requests), "the function's result")
            return [to_result(v, self.name, f"result[{i}]") for i, v in enumerate(values)]

        results, _, error = await self.caller.call(attempt, [r.rollout_id for r in requests])
        return results if results is not None else failed(len(requests), self.name, error)

    async def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
