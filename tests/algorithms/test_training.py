"""The actor trainer's dtypes: float32 master weights, the forward and backward under autocast in
trainer.compute_dtype, and the generators' weights in model.dtype."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from respec_async.config import config_from_dict
from respec_async.training import ActorTrainer, native_bf16
from tests.roles.conftest import random_actor_dir  # noqa: F401  (fixture)
from transport.schema import PromptGroup, Rollout, ScoredGroup


def scored_group(prompt_ids: list[int]) -> ScoredGroup:
    rollouts = [Rollout(i, [3, 4, 5], torch.full((3,), -1.0), 0, 0, "stop") for i in range(2)]
    return ScoredGroup(PromptGroup(0, 0, prompt_ids, 2, 0), rollouts, [1.0, 0.0], [True, False], "generator-0", 0.1)


@pytest.mark.parametrize(("model_dtype", "compute", "expected_compute", "expected_weights"), [
    ("float32", "model", torch.float32, torch.float32),
    ("float32", "bfloat16", torch.bfloat16, torch.float32),
    ("bfloat16", "model", torch.bfloat16, torch.bfloat16),
    ("bfloat16", "float32", torch.float32, torch.bfloat16),
])
def test_the_forward_runs_in_compute_dtype_and_weights_ship_in_model_dtype(
        random_actor_dir, tmp_path, model_dtype, compute, expected_compute, expected_weights):  # noqa: F811
    config = config_from_dict({"model": {"path": str(random_actor_dir), "dtype": model_dtype},
                               "trainer": {"compute_dtype": compute}})
    trainer = ActorTrainer(config, tmp_path)
    seen = []
    layer = trainer.model.layers[0].mlp.down_proj
    handle = layer.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    stats = trainer.train_step([scored_group([1, 2])])
    handle.remove()
    assert seen and set(seen) == {expected_compute}
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters()) and stats.num_tokens == 6
    version, state = trainer.snapshot()
    assert version == 1 and {t.dtype for t in state.values() if t.is_floating_point()} == {expected_weights}


def test_auto_compute_dtype_is_bfloat16_where_this_cpu_multiplies_it_natively(random_actor_dir, tmp_path):  # noqa: F811
    config = config_from_dict({"model": {"path": str(random_actor_dir)}, "trainer": {"compute_dtype": "auto"}})
    native = native_bf16(torch.device("cpu"))
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():  # the kernel's own word on the CPU's flags, independent of torch's probe
        flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
        assert native == bool(flags & {"avx512_bf16", "amx_bf16"})
    assert ActorTrainer(config, tmp_path).compute_dtype == (torch.bfloat16 if native else torch.float32)


def test_a_truncated_latest_checkpoint_falls_back_to_the_newest_intact_one(random_actor_dir, tmp_path):  # noqa: F811
    from respec_async.checkpoints import CheckpointError
    from respec_async.training import load_newest_intact

    config = config_from_dict({"model": {"path": str(random_actor_dir)}})
    trainer = ActorTrainer(config, tmp_path)
    assert load_newest_intact(trainer, tmp_path, lambda *a: None) is None  # nothing saved: a fresh start
    paths = []
    for _ in range(3):
        trainer.train_step([scored_group([1, 2])])
        paths.append(trainer.save_checkpoint((trainer.version * 3, [])))
    weights = paths[2] / "actor" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    optimizer = paths[1] / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    optimizer.write_bytes(bytes(data))

    warnings = []
    resumed = ActorTrainer(config, tmp_path)
    path = load_newest_intact(resumed, tmp_path, lambda p, reason: warnings.append((p, reason)))
    assert path == paths[0] and resumed.version == 1 and resumed.data_position == (3, [])
    assert [p for p, _ in warnings] == [paths[2], paths[1]]
    assert str(weights) in warnings[0][1] and "the manifest says" in warnings[0][1]
    assert str(optimizer) in warnings[1][1] and "SHA-256 differs" in warnings[1][1]
    from respec_async.training import latest_checkpoint
    assert latest_checkpoint(tmp_path) == paths[0]  # what `respec eval` reads: the intact one
    (paths[0] / "trainer.json").write_text("{")  # now none is intact: the error lists each
    (paths[0] / "manifest.json").unlink()  # (an old checkpoint without a manifest is still read)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint to resume from: step-3: .*step-2: .*step-1: "
                                              r"JSONDecodeError"):
        load_newest_intact(ActorTrainer(config, tmp_path), tmp_path, lambda *a: None)
