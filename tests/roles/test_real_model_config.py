"""configs/qwen2.5-math.toml runs as written, on CPU, with only the machine-specific keys
overridden: a tiny random Qwen2 checkpoint that transformers saved (Hugging Face layout, bf16
on disk, a Qwen-style tokenizer without BOS whose EOS is <|im_end|>) stands in for the real
model, a small GSM8K-style JSONL file for the user's dataset, and the run is sized down (steps,
group sizes, completion length). A real `respec launch` subprocess; every assertion reads what
the roles recorded."""

from __future__ import annotations

import json
import os
import signal
import string
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import torch

from respec_async.config import Config, load_config
from respec_async.engine.tokenizer import Tokenizer, build_char_tokenizer
from respec_async.metrics import read_metrics
from tests.runtime.conftest import LaunchedRun, pid_alive

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "qwen2.5-math.toml"
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PROBLEMS = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "Tom has 3 + 4 = 7 apples.\n#### 7"),
    ("A box holds 12 eggs. How many eggs are in 5 boxes?", "12 * 5 = 60\n#### 60"),
    ("Sara read 15 pages on Monday and twice as many on Tuesday. How many pages in total?", "#### 45"),
    ("A shirt costs $20 and is 25% off. What does it cost now?", "15"),
    ("There are 9 birds and 4 fly away. How many are left?", 5),
]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    """A random 2-layer Qwen2ForCausalLM saved by transformers, with a character-level tokenizer
    laid out as Qwen2.5's: tokenizer.json plus tokenizer_config.json (no BOS, EOS <|im_end|>,
    PAD <|endoftext|>)."""
    path = tmp_path_factory.mktemp("qwen2.5-tiny")
    chars = build_char_tokenizer(string.ascii_letters + string.digits + string.punctuation + " \n",
                                 special_tokens=QWEN_SPECIALS)
    tokenizer = Tokenizer(chars.tokenizer, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.save(path / "tokenizer.json")
    config = transformers.Qwen2Config(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e6,
        tie_word_embeddings=True, use_sliding_window=False, bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).to(torch.bfloat16)  # Qwen2.5 ships bf16 weights
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gsm8k_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "gsm8k_train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Question: {q}\nAnswer:", "answer": a}) + "\n"
                            for q, a in PROBLEMS))
    return path


def overrides(qwen_dir: Path, data: Path, root: Path, dtype: str) -> list[str]:
    values = {
        # The machine: where the model and data are, which device and dtype.
        "model.path": str(qwen_dir), "data.path": str(data), "model.device": "cpu", "model.dtype": dtype,
        # The size of the run.
        "trainer.num_steps": 2, "data.group_size": 2, "data.groups_per_step": 2, "sampling.max_new_tokens": 8,
        "generator.max_batch_size": 4, "supervisor.live_status": False, "run.root": str(root),
    }
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


@pytest.fixture
def launch_config(tmp_path):
    runs: list[LaunchedRun] = []

    def start(*sets: str) -> LaunchedRun:
        args = [sys.executable, "-m", "respec_async.cli", "launch", str(CONFIG)]
        for item in sets:
            args += ["--set", item]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        runs.append(LaunchedRun(proc, tmp_path / "runs"))
        return runs[-1]

    yield start
    for run in runs:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
        if run.root.exists() and any(run.root.iterdir()):
            for pids in run.role_pids().values():
                for pid in pids:
                    if pid_alive(pid):
                        os.kill(pid, signal.SIGKILL)


def test_the_config_file_asks_for_a_cuda_bf16_jsonl_run():
    config = load_config(CONFIG)
    assert (config.model.device, config.model.dtype, config.data.task) == ("cuda", "bfloat16", "jsonl")
    assert config.model.path and config.data.path and config.generator.sd == "off"
    assert config.run.final_eval is False  # the held-out eval covers the arithmetic task only
    assert config.generator.max_seq_len >= config.sampling.max_new_tokens + 256


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_qwen_config_trains_on_a_transformers_qwen2_checkpoint_and_a_jsonl_file(
        launch_config, qwen_dir, gsm8k_file, tmp_path, dtype):
    run = launch_config(*overrides(qwen_dir, gsm8k_file, tmp_path / "runs", dtype))
    code = run.proc.wait(timeout=240)
    assert code == 0, run.output()

    resolved = msgspec.json.decode((run.run_dir / "config.json").read_bytes(), type=Config)
    written = load_config(CONFIG)
    # Everything but the overridden keys is the file's.
    assert resolved.trainer.lr == written.trainer.lr and resolved.sampling.temperature == written.sampling.temperature
    assert resolved.generator.max_seq_len == written.generator.max_seq_len
    assert (resolved.data.task, resolved.model.dtype) == ("jsonl", dtype)

    records = read_metrics(run.run_dir / "metrics.jsonl")
    assert [r.step for r in records] == [0, 1]
    assert all(r.num_samples == 4 for r in records)
    published = {e["version"]: e["checksum"] for e in run.events("trainer-0") if e.get("event") == "weights.published"}
    assert set(published) == {0, 1, 2}
    applied = [e for e in run.events("generator-0") if e.get("event") == "weights.applied"]
    assert applied and {e["version"] for e in applied} <= set(published)
    for e in applied:  # the generator holds exactly what the trainer sent, in its own dtype
        assert e["matches"] is True and e["checksum"] == published[e["version"]], e
    assert not [e for e in run.events("generator-0") if e.get("event") == "weights.checksum_mismatch"]
