"""A random tiny actor (no training) and configs for multi-process RL-loop tests.

The mechanics under test (staleness, weight sync, restarts, accounting) do not need a model
that learns, so the fixture saves a randomly initialised 2-layer char model once per session.
"""

from __future__ import annotations

import pytest
import torch

from respec_async.engine.checkpoint import save_pretrained
from respec_async.engine.model import ModelConfig, Transformer
from respec_async.engine.tokenizer import build_char_tokenizer
from respec_async.tasks.arithmetic import ALPHABET
from tests.runtime.conftest import launch  # noqa: F401  (fixture re-export)


@pytest.fixture(scope="session")
def random_actor_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("actor")
    tokenizer = build_char_tokenizer(ALPHABET)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, model_type="qwen2", attention_bias=True,
                         eos_token_id=tokenizer.eos_token_id)
    save_pretrained(Transformer(config), path)
    tokenizer.save(path / "tokenizer.json")
    return path


def rl_config(actor_dir, *, steps: int = 6, k: int = 1, generators: int = 1, rewards: int = 1, extra: str = "") -> str:
    return f"""
[run]
final_eval = false
[roles]
generator = {generators}
reward = {rewards}
trainer = 1
[supervisor]
live_status = false
ping_interval_s = 0.5
ping_timeout_s = 20.0
restart_backoff_s = 0.2
shutdown_grace_s = 5.0
[model]
path = "{actor_dir}"
[sampling]
max_new_tokens = 12
[data]
group_size = 2
groups_per_step = 3
[generator]
max_batch_size = 8
max_seq_len = 64
[trainer]
num_steps = {steps}
max_staleness = {k}
checkpoint_every = 2
weight_sync_timeout_s = 20.0
{extra}
"""
