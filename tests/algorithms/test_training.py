"""The actor trainer's dtypes: float32 master weights, the forward and backward under autocast in
trainer.compute_dtype, and the generators' weights in model.dtype."""

from __future__ import annotations

import pytest
import torch

from respec_async.config import config_from_dict
from respec_async.training import ActorTrainer
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
