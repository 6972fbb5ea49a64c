"""`reward.source = "http://host:port/path"`: remote reward servers over HTTP (aiohttp, an
optional dependency), OpenRLHF's batch schema or one request per sample."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import msgspec

from respec_async.config import RewardSection
from respec_async.rewards.caller import (Caller, RewardSourceError, ScoreRequest, ScoreResult, expect_list, failed,
                                         to_result)


class HttpScorer:
    """OpenRLHF-style remote reward servers over HTTP (aiohttp), batched per group or per sample."""

    def __init__(self, cfg: RewardSection, urls: list[str]) -> None:
        try:
            import aiohttp
        except ImportError:
            raise ValueError("reward.source = http://...: needs aiohttp (pip install aiohttp)") from None
        self.aiohttp = aiohttp
        self.format = cfg.http_format
        self.headers = {"Content-Type": "application/json"}
        if cfg.token_env:
            token = os.environ.get(cfg.token_env)
            if not token:
                raise ValueError(f"reward.token_env: environment variable {cfg.token_env!r} is not set")
            self.headers["Authorization"] = f"Bearer {token}"
        self.caller = Caller(cfg, urls, cfg.max_concurrency)
        self.stats = self.caller.stats
        self.session: Any = None

    async def _post(self, url: str, payload: dict[str, Any]) -> Any:
        if self.session is None:
            # The concurrency slots bound the requests; the connector must not queue them again.
            connector = self.aiohttp.TCPConnector(limit=0)
            self.session = self.aiohttp.ClientSession(connector=connector, headers=self.headers)
        try:
            async with self.session.post(url, data=msgspec.json.encode(payload)) as response:
                body = await response.read()
                status = response.status
        except self.aiohttp.ClientError as exc:
            raise RewardSourceError("connection", repr(exc)[:300]) from None
        if status != 200:
            raise RewardSourceError(f"http_{status}", body[:200].decode(errors="replace"))
        try:
            return msgspec.json.decode(body)
        except msgspec.DecodeError:
            raise RewardSourceError("bad_response", f"not JSON: {body[:80]!r}") from None

    async def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        if not requests:
            return []
        if self.format == "sample":
            return list(await asyncio.gather(*(self._score_one(r) for r in requests)))
        return await self._score_batch(requests)

    async def _score_batch(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        n = len(requests)
        payload = {
            "query": [r.prompt_text + r.completion_text for r in requests],
            "prompts": [r.prompt_text for r in requests],
            "labels": [r.answer for r in requests],
        }

        async def attempt(url: str) -> list[ScoreResult]:
            body = await self._post(url, payload)
            if not isinstance(body, dict) or "rewards" not in body:
                raise RewardSourceError("bad_response", f"no 'rewards' in {str(body)[:80]!r}")
            rewards = expect_list(body["rewards"], n, "rewards")
            results = [to_result(v, url, f"rewards[{i}]") for i, v in enumerate(rewards)]
            if body.get("scores") is not None:
                for result, score in zip(results, expect_list(body["scores"], n, "scores")):
                    result.extra["score"] = score
            logs = body.get("extra_logs") or {}
            if isinstance(logs, dict):
                for key, values in logs.items():
                    if isinstance(values, list) and len(values) == n:
                        for result, v in zip(results, values):
                            result.extra[key] = v
            return results

        results, url, error = await self.caller.call(attempt, [r.rollout_id for r in requests])
        return results if results is not None else failed(n, url, error)

    async def _score_one(self, r: ScoreRequest) -> ScoreResult:
        payload = {"prompt": r.prompt_text, "response": r.completion_text, "label": r.answer}

        async def attempt(url: str) -> ScoreResult:
            return to_result(await self._post(url, payload), url, key="reward")

        result, url, error = await self.caller.call(attempt, [r.rollout_id])
        return result if result is not None else failed(1, url, error)[0]

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None
