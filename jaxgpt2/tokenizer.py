"""Tokenizers: GPT-2 BPE through tiktoken (offline) and a character-level vocabulary.

The GPT-2 ranks ship inside the package (``assets/r50k_base.tiktoken``) and are checked
against OpenAI's sha256 at load, so tokenizing never touches the network and a damaged
file is caught instead of producing silently different ids.
"""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache
from importlib import resources
from typing import Protocol, Sequence

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

from jaxgpt2.errors import DataError, InputError

GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
ENDOFTEXT = "<|endoftext|>"
GPT2_EOT_ID = 50256


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eot_id: int | None

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


class GPT2Tokenizer:
    """GPT-2's byte-level BPE; ``encode`` treats ``<|endoftext|>`` in text as plain text."""

    name = "gpt2"
    vocab_size = 50257
    eot_id = GPT2_EOT_ID

    def __init__(self) -> None:
        self.encoding = _gpt2_encoding()

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode([int(i) for i in ids])


class CharTokenizer:
    """One id per character; the vocabulary is saved with the prepared data (``meta.json``)."""

    name = "char"
    eot_id = None

    def __init__(self, chars: Sequence[str]) -> None:
        self.chars = list(chars)
        self.vocab_size = len(self.chars)
        self._index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[c] for c in text]
        except KeyError as err:
            raise InputError(f"character {err.args[0]!r} is not in this character vocabulary "
                             f"({self.vocab_size} characters); use text made of the training "
                             "corpus' characters") from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)


@lru_cache(maxsize=1)
def _gpt2_encoding() -> tiktoken.Encoding:
    data = resources.files("jaxgpt2").joinpath("assets/r50k_base.tiktoken").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_RANKS_SHA256:
        raise RuntimeError(f"jaxgpt2/assets/r50k_base.tiktoken is damaged (sha256 {digest}, "
                           f"expected {GPT2_RANKS_SHA256}); reinstall the package")
    ranks = {base64.b64decode(token): int(rank)
             for token, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: GPT2_EOT_ID}, explicit_n_vocab=50257)


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """``text`` as a prompt to continue. An empty prompt starts a fresh document from
    ``<|endoftext|>``, as GPT-2 was trained to; a vocabulary without that token (the
    character level) has no neutral start, so an empty prompt is refused, not guessed."""
    ids = tokenizer.encode(text)
    if ids:
        return ids
    if tokenizer.eot_id is None:
        raise InputError(f"the prompt is empty and the {tokenizer.name!r} vocabulary has no "
                         f"{ENDOFTEXT} to start from; give the prompt some text")
    return [tokenizer.eot_id]


def tokenizer_from_meta(meta: dict) -> Tokenizer:
    """The tokenizer a prepared dataset was made with, from its ``meta.json``."""
    kind = meta.get("tokenizer")
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char":
        return CharTokenizer(meta["chars"])
    raise DataError(f"meta.json names tokenizer {kind!r}; expected 'gpt2' or 'char'")
