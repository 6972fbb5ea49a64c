"""Tokenizer: a thin wrapper over the `tokenizers` library's tokenizer.json, plus a character-level
tokenizer for the tiny CPU models.

Special token ids come from tokenizer_config.json beside tokenizer.json when there is one (the
Hugging Face layout), else from well-known token names (<eos>, </s>, <|endoftext|>, ...). A chat
template comes from there too (its "chat_template", or a chat_template.jinja beside it, the
layout transformers 5 writes) and renders as transformers renders it: Jinja2, sandboxed,
trim_blocks and lstrip_blocks.
`save` writes both files, so transformers' AutoTokenizer / PreTrainedTokenizerFast load the
directory too.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
CHAT_TEMPLATE_NAME = "chat_template.jinja"
SPECIAL_NAMES = {
    "bos_token": ("<bos>", "<s>", "<|begin_of_text|>"),
    "eos_token": ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>"),
    "pad_token": ("<pad>", "<|pad|>"),
}


class Tokenizer:
    def __init__(self, tokenizer: tokenizers.Tokenizer, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
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
        chat_template = None
        if config_file.exists():
            config = json.loads(config_file.read_text())
            for key in SPECIAL_NAMES:
                token = config.get(key)
                specials[key] = token.get("content") if isinstance(token, dict) else token
            chat_template = config.get("chat_template")
        else:
            vocab = tokenizer.get_vocab(with_added_tokens=True)
            for key, names in SPECIAL_NAMES.items():
                specials[key] = next((name for name in names if name in vocab), None)
        template_file = path.parent / CHAT_TEMPLATE_NAME
        if chat_template is None and template_file.exists():
            chat_template = template_file.read_text()
        if chat_template is not None and not isinstance(chat_template, str):
            raise ValueError(f"{config_file}: chat_template must be one template string (named templates are "
                             f"not supported)")
        return cls(tokenizer, **specials, chat_template=chat_template)

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

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation ([{"role": ..., "content": ...}, ...]); encode() it
        (special tokens in the text are matched as such)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json's chat_template or "
                             f"{CHAT_TEMPLATE_NAME} beside tokenizer.json)")
        return _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "", pad_token=self.pad_token or "")

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


@functools.lru_cache(maxsize=8)
def _compile_template(source: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(source)


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
