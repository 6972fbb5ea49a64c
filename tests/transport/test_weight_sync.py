"""Weight broadcast with real processes and real gloo groups: bit-identical delivery, re-forming
after a member restarts, and a named error (not a hang) when a member is missing."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

from respec_async.endpoints import free_tcp_port
from transport.weights import (
    WeightGroup,
    WeightSyncError,
    choose_backend,
    device_identity,
    host_rendezvous_store,
    manifest_of,
    plan_buckets,
    weights_checksum,
)

pytestmark = pytest.mark.process


def make_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(300, 64, generator=g),
        "layers.0.attn.q.weight": torch.randn(64, 64, generator=g).bfloat16(),
        "layers.0.attn.q.bias": torch.randn(64, generator=g).half(),
        "layers.0.norm.weight": torch.randn(64, generator=g),
        "d2t": torch.randint(0, 100, (50,), generator=g),
        "scalar": torch.tensor(3.5),
    }


def member(rendezvous: str, me: str, members: list[str], epoch: int, versions: list[int],
           results: mp.Queue, timeout_s: float = 20.0) -> None:
    group = WeightGroup(rendezvous, name="actor", timeout_s=timeout_s)
    try:
        group.form(epoch, members, me)
        for version in versions:
            if group.rank == 0:
                state = make_state(version)
                stats = group.broadcast(state, version, bucket_bytes=16 << 10)
                results.put((me, version, weights_checksum(state), stats.num_buckets))
            else:
                staged, stats = group.receive(manifest_of(make_state(0)), version, bucket_bytes=16 << 10)
                results.put((me, version, weights_checksum(staged), stats.num_buckets))
    except WeightSyncError as exc:
        results.put((me, "error", str(exc), 0))


def run_members(rendezvous, specs, epoch, versions, timeout_s=20.0):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    members = [name for name, _ in specs]
    procs = [ctx.Process(target=member, args=(rendezvous, name, members, epoch, versions, results, timeout_s))
             for name, _ in specs]
    for p in procs:
        p.start()
    out = [results.get(timeout=120) for _ in range(len(procs) * len(versions))]
    for p in procs:
        p.join(30)
    return out


@pytest.fixture
def rendezvous():
    address = f"tcp://127.0.0.1:{free_tcp_port('127.0.0.1')}"
    store = host_rendezvous_store(address)
    yield address
    del store


def test_broadcast_delivers_bit_identical_weights_to_every_receiver(rendezvous):
    specs = [("trainer-0", None), ("generator-0", None), ("generator-1", None)]
    out = run_members(rendezvous, specs, epoch=0, versions=[1, 2])
    for version in (1, 2):
        sums = {me: s for me, v, s, _ in out if v == version}
        assert set(sums) == {"trainer-0", "generator-0", "generator-1"}, out
        assert len(set(sums.values())) == 1, sums
        assert sums["trainer-0"] == weights_checksum(make_state(version))
    assert {n for _, _, _, n in out} == {len(plan_buckets(manifest_of(make_state(0)), 16 << 10))}


def test_group_reforms_at_a_new_epoch_with_a_replacement_member(rendezvous):
    run_members(rendezvous, [("trainer-0", None), ("generator-0", None)], epoch=0, versions=[1])
    # generator-0 "restarted": a fresh process joins epoch 1 of the same rendezvous.
    out = run_members(rendezvous, [("trainer-0", None), ("generator-0", None)], epoch=1, versions=[5])
    sums = {me: s for me, _, s, _ in out}
    assert sums["trainer-0"] == sums["generator-0"] == weights_checksum(make_state(5))


def test_missing_member_fails_with_a_named_error_instead_of_hanging(rendezvous):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    members = ["trainer-0", "generator-0"]
    proc = ctx.Process(target=member, args=(rendezvous, "trainer-0", members, 0, [1], results, 3.0))
    started = time.monotonic()
    proc.start()
    me, what, message, _ = results.get(timeout=60)
    proc.join(30)
    assert time.monotonic() - started < 45
    assert what == "error"
    assert "'actor'" in message and "epoch 0" in message and "generator-0 (rank 1)" in message
    assert "never arrived: generator-0" in message


def test_a_failed_formation_names_exactly_the_members_that_never_arrived(rendezvous):
    # generator-0 comes, generator-1 never does: only generator-1 may be dropped for it.
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    members = ["trainer-0", "generator-0", "generator-1"]
    procs = [ctx.Process(target=formation_outcome, args=(rendezvous, me, members, results))
             for me in members[:2]]
    for p in procs:
        p.start()
    out = dict(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
    assert out == {"trainer-0": ["generator-1"], "generator-0": ["generator-1"]}


def formation_outcome(rendezvous: str, me: str, members: list[str], results: mp.Queue) -> None:
    group = WeightGroup(rendezvous, name="actor", timeout_s=3.0)
    try:
        group.form(0, members, me)
        results.put((me, "formed"))
    except WeightSyncError as exc:
        results.put((me, exc.missing))


def test_bucket_plan_keeps_one_dtype_per_bucket_and_respects_the_size():
    manifest = manifest_of(make_state(0))
    plan = plan_buckets(manifest, bucket_bytes=16 << 10)
    assert sorted(i for b in plan for i in b) == list(range(len(manifest)))
    for bucket in plan:
        assert len({manifest[i].dtype for i in bucket}) == 1


def test_nccl_only_when_every_member_has_a_gpu_of_its_own(monkeypatch):
    monkeypatch.setattr("torch.distributed.is_nccl_available", lambda: True)
    gpu = lambda host, uuid: {"host": host, "type": "cuda", "id": uuid}  # noqa: E731
    assert choose_backend([gpu("a", "GPU-0"), gpu("a", "GPU-1"), gpu("b", "GPU-0")]) == "nccl"
    # Two roles on one GPU: NCCL would fail with "Duplicate GPU detected".
    assert choose_backend([gpu("a", "GPU-0"), gpu("a", "GPU-1"), gpu("a", "GPU-0")]) == "gloo"
    assert choose_backend([gpu("a", "GPU-0"), device_identity("cpu")]) == "gloo"
    monkeypatch.setattr("torch.distributed.is_nccl_available", lambda: False)
    assert choose_backend([gpu("a", "GPU-0"), gpu("a", "GPU-1")]) == "gloo"


def test_cpu_groups_use_gloo_without_asking_the_other_members(rendezvous):
    group = WeightGroup(rendezvous, device="cpu")
    assert group.backend == "gloo" and group._agree_on_backend(store=None) == "gloo"
    assert WeightGroup(rendezvous, backend="nccl", device="cpu")._agree_on_backend(store=None) == "nccl"
