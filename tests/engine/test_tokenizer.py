"""Tokenizer: the character tokenizer round-trips and is a normal tokenizer.json that the
`tokenizers` library and transformers load."""

from __future__ import annotations

import pytest
import tokenizers
import transformers

from respec_async.engine.tokenizer import Tokenizer, build_char_tokenizer

ALPHABET = "0123456789+= \n"


def test_char_tokenizer_gives_one_id_per_character_and_round_trips():
    tokenizer = build_char_tokenizer(ALPHABET)
    ids = tokenizer.encode("12+3=")
    assert len(ids) == 5 and len(set(ids)) == 5
    text = "907 + 1\n= 908"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.vocab_size == 3 + len(ALPHABET)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)


def test_decode_drops_special_tokens():
    tokenizer = build_char_tokenizer(ALPHABET)
    ids = [tokenizer.bos_token_id, *tokenizer.encode("4+4=8"), tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert tokenizer.decode(ids) == "4+4=8"


def test_unknown_character_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot encode '1a'"):
        build_char_tokenizer(ALPHABET).encode("1a")


def test_saved_tokenizer_loads_in_tokenizers_transformers_and_from_dir(tmp_path):
    tokenizer = build_char_tokenizer(ALPHABET)
    tokenizer.save(tmp_path / "tokenizer.json")
    ids = tokenizer.encode("12+3=")
    assert tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode("12+3=").ids == ids
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert fast("12+3=")["input_ids"] == ids
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert auto("12+3=")["input_ids"] == ids and auto.eos_token_id == tokenizer.eos_token_id
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.encode("12+3=") == ids
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)


def test_from_file_without_config_finds_specials_by_name(tmp_path):
    build_char_tokenizer("ab", special_tokens=("</s>", "<pad>")).tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.bos_token_id) == (0, 1, None)


TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<bos>{{ m['content'] }}{% else %}"
            "{{ m['content'] }}<eos>{% endif %}{% endfor %}{% if add_generation_prompt %}={% endif %}")


@pytest.mark.parametrize("layout", ["tokenizer_config", "jinja_file"])
def test_chat_template_renders_as_transformers_renders_it(tmp_path, layout):
    import json
    build_char_tokenizer(ALPHABET).save(tmp_path / "tokenizer.json")
    config_path = tmp_path / "tokenizer_config.json"
    if layout == "tokenizer_config":
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "chat_template": TEMPLATE}))
    else:
        (tmp_path / "chat_template.jinja").write_text(TEMPLATE)
    tokenizer = Tokenizer.from_dir(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    hf.chat_template = TEMPLATE
    messages = [{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "3"},
                {"role": "user", "content": "4+5"}]
    for add in (True, False):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add)
        assert text == hf.apply_chat_template(messages, add_generation_prompt=add, tokenize=False)
    assert text == "<bos>1+23<eos><bos>4+5"
    assert tokenizer.encode(text)[0] == tokenizer.bos_token_id  # special tokens in the text encode as such


def test_chat_template_missing_or_raising_is_a_clear_error(tmp_path):
    import jinja2
    build_char_tokenizer(ALPHABET).save(tmp_path / "tokenizer.json")
    tokenizer = Tokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "1"}])
    tokenizer.chat_template = "{{ raise_exception('only user turns') }}"
    with pytest.raises(jinja2.TemplateError, match="only user turns"):
        tokenizer.apply_chat_template([{"role": "user", "content": "1"}])
