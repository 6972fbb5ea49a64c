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
