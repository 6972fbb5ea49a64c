"""The reward role's failure policy, in-process over real sockets: a reward that still fails
after its retries sends the whole group back to the trainer ("drop") or scores the rollout 0
and flags it ("zero"); each failure is logged with server, error and rollout id, and counted
in the role's metrics file."""

from __future__ import annotations

import asyncio
import threading

import msgspec
import structlog
import torch
import zmq.asyncio

from respec_async.actor import RoleContext
from respec_async.config import Config, RewardSection, RolesSection
from respec_async.endpoints import assign_endpoints
from transport.channels import Kind, open_channel
from transport.schema import HOP_AT_REWARD, GroupMoved, PromptGroup, Ready, ReturnedGroup, Rollout, RolloutGroup, ScoredGroup, Shutdown
from transport.security import Security


class CharTokenizer:
    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def rollout_group(group_id: int, completions: list[str]) -> RolloutGroup:
    group = PromptGroup(group_id=group_id, attempt=0, prompt_ids=[1], num_samples=len(completions),
                        policy_version=0, prompt_text=f"q{group_id}=", answer="42", data_source="test")
    rollouts = [Rollout(sample_index=i, completion_ids=[ord(c) for c in text],
                        behaviour_logprobs=torch.zeros(len(text)), min_policy_version=0, max_policy_version=0,
                        finish_reason="stop") for i, text in enumerate(completions)]
    return RolloutGroup(group=group, rollouts=rollouts, generator="generator-0", generation_s=0.1)


GROUPS = [["42", "7"], ["42", "boom"], ["7", "42"], ["boom", "boom"]]


def run_role(tmp_path, monkeypatch, reward_file, on_error):
    import roles.reward

    monkeypatch.setattr(roles.reward, "load_tokenizer", lambda cfg: CharTokenizer())
    reward = RewardSection(source=f"python:{reward_file}:fails_on_boom", on_error=on_error, max_retries=1,
                           retry_backoff_s=0.01)
    config = Config(roles=RolesSection(generator=0, reward=1, trainer=1), reward=reward)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ctx = RoleContext(config, run_dir, "reward-0", assign_endpoints(config, run_dir), Security(insecure=True))
    exit_codes: list[int] = []
    thread = threading.Thread(target=lambda: exit_codes.append(asyncio.run(roles.reward.RewardActor(ctx).run())),
                              daemon=True)

    async def drive():
        zctx = zmq.asyncio.Context()
        control = open_channel(zctx, Kind.ROUTER, ctx.endpoints.supervisor, bind=True)
        trainer = open_channel(zctx, Kind.PULL, ctx.endpoints.inboxes["trainer-0"], bind=True)
        thread.start()
        ready = await asyncio.wait_for(control.recv(), 60)
        assert isinstance(ready.message, Ready)
        inbox = open_channel(zctx, Kind.PUSH, ctx.endpoints.inboxes["reward-0"], bind=False)
        for group_id, completions in enumerate(GROUPS):
            await inbox.send(rollout_group(group_id, completions))
        received, receipts = [], []
        while len(received) < len(GROUPS):
            message = (await asyncio.wait_for(trainer.recv(), 30)).message
            (receipts if isinstance(message, GroupMoved) else received).append(message)
        # Each group is acknowledged to the trainer's ledger as it reaches the role.
        assert sorted((m.group_id, m.hop, m.holder) for m in receipts) == [
            (g, HOP_AT_REWARD, "reward-0") for g in range(len(GROUPS))]
        await control.send(Shutdown(reason="test"), b"reward-0")
        await asyncio.to_thread(thread.join, 30)
        zctx.destroy(linger=0)
        return received

    with structlog.testing.capture_logs() as logs:
        received = asyncio.run(drive())
    assert exit_codes == [0]
    lines = (run_dir / "reward-0.metrics.jsonl").read_bytes().splitlines()
    return sorted(received, key=lambda m: m.group.group_id), msgspec.json.decode(lines[-1]), logs


def test_drop_returns_each_group_with_a_failed_reward_to_the_trainer_and_counts_it(tmp_path, monkeypatch,
                                                                                  reward_file):
    received, record, logs = run_role(tmp_path, monkeypatch, reward_file, "drop")
    assert [type(m) for m in received] == [ScoredGroup, ReturnedGroup, ScoredGroup, ReturnedGroup]
    assert received[0].rewards == [1.0, 0.0] and received[2].rewards == [0.0, 1.0]
    assert "reward backend exploded" in received[1].reason
    assert record["num_groups"] == 4 and record["num_groups_scored"] == 2 and record["num_groups_dropped"] == 2
    assert record["num_rollouts_failed"] == 3 and record["num_rollouts_dropped"] == 4
    assert record["num_rollouts_zeroed"] == 0 and record["num_rollouts_scored"] == 4
    # 3 failing rollouts x (1 try + 1 retry)
    assert record["scorer"]["num_retries"] == 3 and record["scorer"]["errors_by_kind"] == {"exception": 6}
    failed = [e for e in logs if e["event"] == "reward.failed"]
    assert sorted(e["rollout_id"] for e in failed) == ["1:0:1", "3:0:0", "3:0:1"]
    assert all(e["server"] == f"python:{reward_file}:fails_on_boom" and "exploded" in e["error"] for e in failed)


def test_zero_scores_a_failed_rollout_0_flags_it_and_keeps_its_group(tmp_path, monkeypatch, reward_file):
    received, record, _ = run_role(tmp_path, monkeypatch, reward_file, "zero")
    assert all(isinstance(m, ScoredGroup) for m in received)
    assert [m.rewards for m in received] == [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
    assert [m.num_reward_errors for m in received] == [0, 1, 0, 2]
    assert received[1].correct == [True, False]
    assert record["num_groups_scored"] == 4 and record["num_groups_dropped"] == 0
    assert record["num_rollouts_failed"] == record["num_rollouts_zeroed"] == 3
    assert 0.0 < record["busy_share"] <= 1.0

