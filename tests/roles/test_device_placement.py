"""Where each role's models live: plain "cuda" spreads the model roles over the visible GPUs
(trainer on cuda:0, generators on the others) so the actor weight group can use NCCL; anything
else keeps every role on the configured device."""

from __future__ import annotations

from respec_async.config import Config, ModelSection
from respec_async.models import place_role, role_device


def test_plain_cuda_puts_the_trainer_on_gpu_0_and_spreads_the_generators():
    assert role_device("cuda", "trainer-0", num_gpus=4) == "cuda:0"
    assert role_device("cuda", "drafter_learner-0", num_gpus=4) == "cuda:0"
    assert [role_device("cuda", f"generator-{i}", num_gpus=4) for i in range(5)] == \
        ["cuda:1", "cuda:2", "cuda:3", "cuda:1", "cuda:2"]
    assert role_device("cuda", "generator-3", num_gpus=2) == "cuda:1"


def test_one_gpu_an_explicit_index_or_cpu_keep_every_role_on_the_configured_device():
    assert role_device("cuda", "generator-0", num_gpus=1) == "cuda"
    assert role_device("cuda", "trainer-0", num_gpus=0) == "cuda"
    assert role_device("cuda:2", "generator-0", num_gpus=8) == "cuda:2"
    assert role_device("cpu", "generator-1", num_gpus=8) == "cpu"


def test_placing_a_role_on_cpu_or_a_role_without_models_changes_nothing():
    config = Config(model=ModelSection(device="cpu"))
    assert place_role(config, "generator-0").model.device == "cpu"
    config = Config(model=ModelSection(device="cuda"))
    assert place_role(config, "reward-0").model.device == "cuda"  # no torch.cuda call: no GPU needed
