"""The CUDA checks (run by benchmarks/gpu_check.sh): skipped unless RESPEC_TEST_DEVICE=cuda.

    RESPEC_TEST_DEVICE=cuda .venv/bin/python -m pytest -q tests/engine/test_cuda.py

On the GPU, with TF32 off: our Transformer against transformers (float32 within 1e-4, bfloat16
within a loose bound), KV-cache decoding against the full forward, the engine's greedy output
(plain, chain and tree SD) against the same weights on CPU, the weight broadcast between
processes (gloo when two ranks share a GPU, NCCL across two GPUs), and the Qwen2.5 config's RL
run on CUDA in bfloat16.
"""

from __future__ import annotations

import copy
import multiprocessing as mp
import os

import pytest
import torch

from respec_async.endpoints import free_tcp_port
from respec_async.engine.engine import Engine
from respec_async.engine.requests import Request
from respec_async.engine.model import KVCache
from respec_async.engine.sampling import SamplingParams
from respec_async.metrics import read_metrics
from tests.engine.test_engine import CHAIN, PROMPTS, TREE, full_logprobs, tiny_models
from tests.engine.test_model import FAMILIES, TOL, hf_pair, random_ids
from tests.roles.test_real_model_config import gsm8k_file, launch_config, overrides, qwen_dir  # noqa: F401
from transport.weights import WeightGroup, WeightSyncError, host_rendezvous_store, manifest_of, weights_checksum

pytestmark = [pytest.mark.process, pytest.mark.skipif(
    os.environ.get("RESPEC_TEST_DEVICE") != "cuda",
    reason="CUDA checks: set RESPEC_TEST_DEVICE=cuda on a machine with a GPU (benchmarks/gpu_check.sh runs them)")]

CUDA = "cuda"
BF16_TOL = 0.1  # max |logit difference| of a bf16 forward (as the CPU bf16 test)


@pytest.fixture(autouse=True, scope="module")
def strict_float32():
    """Fail (not skip) when CUDA was asked for but is missing; TF32 off for exact-ish float32."""
    if not torch.cuda.is_available():
        pytest.fail(f"RESPEC_TEST_DEVICE=cuda but torch.cuda.is_available() is False (torch {torch.__version__}: "
                    f"a CPU build?)")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request):
    """(transformers model on CPU, ours on CPU, ours on CUDA), same weights."""
    hf, ours = hf_pair(request.param)
    return hf, ours, copy.deepcopy(ours).to(CUDA)


# ---- (a)-(c): the model ---------------------------------------------------------------------


@torch.no_grad()
def test_float32_logits_on_cuda_match_transformers(pair):
    hf, _, ours = pair
    ids = random_ids(ours.config.vocab_size, 3, 11)
    expected = hf(ids).logits
    assert (ours(ids.to(CUDA)).logits.cpu() - expected).abs().max() < TOL
    hf_cuda = copy.deepcopy(hf).to(CUDA)
    assert (ours(ids.to(CUDA)).logits - hf_cuda(ids.to(CUDA)).logits).abs().max() < TOL


@torch.no_grad()
def test_bfloat16_on_cuda_is_close_to_float32_and_to_transformers(pair):
    hf, ours_cpu, _ = pair
    ids = random_ids(ours_cpu.config.vocab_size, 2, 9)
    reference = ours_cpu(ids).logits
    bf16 = copy.deepcopy(ours_cpu).to(device=CUDA, dtype=torch.bfloat16)
    out = bf16(ids.to(CUDA)).logits
    assert out.dtype == torch.float32
    assert (out.cpu() - reference).abs().max() < BF16_TOL
    hf_bf16 = copy.deepcopy(hf).to(device=CUDA, dtype=torch.bfloat16)
    assert (out - hf_bf16(ids.to(CUDA)).logits.float()).abs().max() < BF16_TOL
    cache = KVCache(bf16.config, 2, 16, dtype=torch.bfloat16, device=CUDA)
    cached = bf16(ids.to(CUDA), cache=cache, logits_positions=torch.full((2, 1), 8, device=CUDA)).logits
    assert (cached[:, 0].cpu() - reference[:, -1]).abs().max() < BF16_TOL


@torch.no_grad()
def test_kv_cache_decoding_on_cuda_matches_the_full_forward(pair):
    _, _, ours = pair
    ids = random_ids(ours.config.vocab_size, 2, 12).to(CUDA)
    full = ours(ids).logits
    cache = KVCache(ours.config, num_slots=2, max_seq_len=16, device=CUDA)
    slots = torch.tensor([1, 0], device=CUDA)
    got = [ours(ids[:, :5], cache=cache, slots=slots).logits]
    for t in range(5, 8):
        got.append(ours(ids[:, t:t + 1], torch.full((2, 1), t, device=CUDA), cache, slots).logits)
    got.append(ours(ids[:, 8:], torch.arange(8, 12, device=CUDA).expand(2, 4), cache, slots).logits)
    assert (torch.cat(got, 1) - full).abs().max() < TOL


# ---- (d): the engine --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_models():
    """The engine tests' tiny target and drafter on CPU, and a copy of both on CUDA (the drafter
    shares the target's embedding, so they are copied together)."""
    cpu = tiny_models()
    target, drafter = copy.deepcopy(cpu)
    return cpu, (target.to(CUDA), drafter.to(CUDA))


def generate(models, params, sd, max_batch_size=4):
    target, drafter = models
    engine = Engine(target, drafter, max_batch_size=max_batch_size, max_seq_len=64, seed=0)
    return engine.generate([Request(i, p, params) for i, p in enumerate(PROMPTS)], sd)


@pytest.mark.parametrize("sd", [None, CHAIN, TREE], ids=str)
def test_greedy_generation_on_cuda_equals_cpu(engine_models, sd):
    cpu, cuda = engine_models
    greedy = SamplingParams(temperature=0.0, max_new_tokens=20)
    expected = [c.output_ids for c in generate(cpu, greedy, None)]
    got = generate(cuda, greedy, sd)
    assert [c.output_ids for c in got] == expected
    assert all(len(c.output_ids) == 20 for c in got)
    if sd is not None:
        assert all(c.num_verify_steps > 0 for c in got)


@pytest.mark.parametrize("sd", [None, TREE], ids=str)
def test_behaviour_logprobs_on_cuda_equal_a_full_forward(engine_models, sd):
    cpu, cuda = engine_models
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=10, max_new_tokens=12)
    for completion in generate(cuda, params, sd, max_batch_size=2):  # slots are refilled
        expected = full_logprobs(cpu[0], completion, params)
        torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=1e-4, rtol=1e-4)


# ---- (e): weight sync between processes -------------------------------------------------------


def make_state(seed: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {"embed.weight": torch.randn(1000, 256, generator=g),
             "layers.0.q.weight": torch.randn(256, 256, generator=g).bfloat16(),
             "layers.0.q.bias": torch.randn(256, generator=g),
             "d2t": torch.randint(0, 100, (50,), generator=g)}
    return {name: t.to(device) for name, t in state.items()}


def sync_member(rendezvous: str, me: str, members: list[str], device: str, backend: str | None,
                results: mp.Queue) -> None:
    torch.cuda.set_device(torch.device(device))
    group = WeightGroup(rendezvous, name="actor", timeout_s=60.0, device=device, backend=backend)
    try:
        group.form(0, members, me)
        for version in (1, 2):
            if group.rank == 0:
                state = make_state(version, device)
                group.broadcast(state, version, bucket_bytes=256 << 10)
            else:
                state, _ = group.receive(manifest_of(make_state(0, "cpu")), version, bucket_bytes=256 << 10)
                assert all(t.device == torch.device(device) for t in state.values())
            results.put((me, version, group.backend, weights_checksum(state)))
    except (WeightSyncError, AssertionError) as exc:
        results.put((me, "error", group.backend, repr(exc)))


def broadcast_between(devices: list[str], backend: str | None = None) -> list[tuple]:
    rendezvous = f"tcp://127.0.0.1:{free_tcp_port('127.0.0.1')}"
    store = host_rendezvous_store(rendezvous)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    members = ["trainer-0"] + [f"generator-{i}" for i in range(len(devices) - 1)]
    procs = [ctx.Process(target=sync_member, args=(rendezvous, me, members, device, backend, results))
             for me, device in zip(members, devices)]
    for p in procs:
        p.start()
    try:
        out = [results.get(timeout=180) for _ in range(2 * len(procs))]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        del store
    assert not [r for r in out if r[1] == "error"], out
    for version in (1, 2):
        sums = {me: s for me, v, _, s in out if v == version}
        assert set(sums) == set(members) and set(sums.values()) == {weights_checksum(make_state(version, "cpu"))}
    return out


def test_two_ranks_on_one_gpu_agree_on_gloo_and_deliver_bit_identical_weights():
    out = broadcast_between(["cuda:0", "cuda:0"])
    assert {backend for _, _, backend, _ in out} == {"gloo"}  # NCCL: "Duplicate GPU detected"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank: fewer than 2 GPUs visible")
def test_ranks_on_two_gpus_use_nccl_and_deliver_what_gloo_delivers():
    out = broadcast_between(["cuda:0", "cuda:1"])
    assert {backend for _, _, backend, _ in out} == {"nccl"}
    gloo = broadcast_between(["cuda:0", "cuda:1"], backend="gloo")
    assert {s for *_, s in out} == {s for *_, s in gloo}


# ---- the Qwen2.5 config on CUDA ---------------------------------------------------------------


def test_the_qwen_config_trains_on_cuda_in_bfloat16(launch_config, qwen_dir, gsm8k_file, tmp_path):  # noqa: F811
    sets = [s for s in overrides(qwen_dir, gsm8k_file, tmp_path / "runs", "bfloat16")
            if not s.startswith("model.device=")]  # the file's own device: "cuda"
    run = launch_config(*sets)
    code = run.proc.wait(timeout=300)
    assert code == 0, run.output()
    assert [r.step for r in read_metrics(run.run_dir / "metrics.jsonl")] == [0, 1]
    published = {e["version"]: e["checksum"] for e in run.events("trainer-0") if e.get("event") == "weights.published"}
    assert set(published) == {0, 1, 2}
    applied = [e for e in run.events("generator-0") if e.get("event") == "weights.applied"]
    assert applied and all(e["matches"] is True and e["checksum"] == published[e["version"]] for e in applied)
    formed = [e for e in run.events("trainer-0") if e.get("event") == "weights.group_formed"]
    assert formed[-1]["backend"] == ("nccl" if torch.cuda.device_count() >= 2 else "gloo"), formed
    started = [e for e in run.events() if e.get("event") in ("trainer.started", "generator.ready")]
    devices = {e["role"]: e["device"] for e in started}
    assert devices["trainer-0"].startswith("cuda") and devices["generator-0"].startswith("cuda"), devices
