"""Tokenizer: a thin wrapper over the `tokenizers` library's tokenizer.json, plus a character-level
tokenizer for the tiny CPU models.

Special token ids come from tokenizer_config.json beside tokenizer.json when there is one (the
Hugging Face layout), else from well-known token names (<eos>, </s>, <|endoftext|>, ...).
`save` writes both files, so transformers' AutoTokenizer / PreTrainedTokenizerFast load the
directory too.
"""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
SPECIAL_NAMES = {
    "bos_token": ("<bos>", "<s>", "<|begin_of_text|>"),
    "eos_token": ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>"),
    "pad_token": ("<pad>", "<|pad|>"),
}


class Tokenizer:
    def __init__(self, tokenizer: tokenizers.Tokenizer, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None):
        self.tokenizer = tokenizer
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        for token in (bos_token, eos_token, pad_token):
            if token is not None and tokenizer.token_to_id(token) is None:
                raise ValueError(f"special token {token!r} is not in the vocabulary")

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """Load tokenizer.json; special tokens from a tokenizer_config.json beside it if present."""
        path = Path(path)
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
        specials = {}
        config_file = path.parent / TOKENIZER_CONFIG_NAME
        if config_file.exists():
            config = json.loads(config_file.read_text())
            for key in SPECIAL_NAMES:
                token = config.get(key)
                specials[key] = token.get("content") if isinstance(token, dict) else token
        else:
            vocab = tokenizer.get_vocab(with_added_tokens=True)
            for key, names in SPECIAL_NAMES.items():
                specials[key] = next((name for name in names if name in vocab), None)
        return cls(tokenizer, **specials)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        path = Path(model_dir) / TOKENIZER_NAME
        if not path.exists():
            raise FileNotFoundError(f"{path} not found")
        return cls.from_file(path)

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json at `path` and tokenizer_config.json (special tokens) beside it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                  "eos_token": self.eos_token, "pad_token": self.pad_token}
        (path.parent / TOKENIZER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    def encode(self, text: str) -> list[int]:
        try:
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        except Exception as error:  # tokenizers raises a bare Exception for an unknown character
            raise ValueError(f"cannot encode {text!r}: {error}") from error

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)


def build_char_tokenizer(alphabet: str, special_tokens=("<pad>", "<bos>", "<eos>")) -> Tokenizer:
    """One id per character of `alphabet` (after the special tokens, which get ids 0, 1, ...).
    Characters outside the alphabet make encode raise. Special tokens named <pad>, <bos>, <eos>
    become the pad, bos and eos tokens."""
    chars = list(dict.fromkeys(alphabet))
    if len(chars) != len(alphabet):
        raise ValueError(f"alphabet {alphabet!r} repeats characters")
    vocab = {token: i for i, token in enumerate([*special_tokens, *chars])}
    if len(vocab) != len(special_tokens) + len(chars):
        raise ValueError(f"special tokens {special_tokens} collide with the alphabet")
    tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=None))
    # Every character is its own piece (newlines too); decoding concatenates without spaces.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(special_tokens))
    names = {"<bos>": "bos_token", "<eos>": "eos_token", "<pad>": "pad_token"}
    return Tokenizer(tokenizer, **{names[token]: token for token in special_tokens if token in names})
