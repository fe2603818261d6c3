"""Tokenizers: GPT-2 BPE identical to tiktoken's own, char vocabulary round trips."""

import hashlib
import shutil
from importlib import resources

import pytest
import tiktoken

from jaxgpt2.tokenizer import CharTokenizer, GPT2Tokenizer, encode_prompt

R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"


def corpus() -> str:
    return resources.files("jaxgpt2").joinpath("assets/tinyshakespeare.txt").read_text()


def test_known_gpt2_ids():
    tok = GPT2Tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.eot_id == 50256 and tok.vocab_size == 50257
    assert tok.decode([15496, 995, 50256]) == "Hello world<|endoftext|>"


def test_matches_tiktoken_r50k_loaded_through_its_own_cache(tmp_path, monkeypatch):
    """tiktoken's own loader (hash-checked) reads the shipped ranks from a local cache,
    so no network is needed to compare with tiktoken's r50k_base encoding."""
    ranks = resources.files("jaxgpt2").joinpath("assets/r50k_base.tiktoken")
    shutil.copy(ranks, tmp_path / hashlib.sha1(R50K_URL.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    tiktoken.registry.ENCODINGS.pop("r50k_base", None)
    reference = tiktoken.get_encoding("r50k_base")
    ours = GPT2Tokenizer()
    text = corpus()[:200_000] + " naïve café 東京 🙂 \t\n  <|endoftext|> 12345 don't"
    assert ours.encode(text) == reference.encode_ordinary(text)


def test_gpt2_round_trips_the_corpus():
    tok = GPT2Tokenizer()
    text = corpus()
    assert tok.decode(tok.encode(text)) == text


def test_char_tokenizer_round_trips_and_rejects_unknown_characters():
    text = corpus()
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == 65
    assert tok.decode(tok.encode(text)) == text
    with pytest.raises(ValueError, match="not in this character vocabulary"):
        tok.encode("é")


def test_an_empty_prompt_starts_from_endoftext_or_is_refused():
    assert encode_prompt(GPT2Tokenizer(), "") == [50256]
    assert encode_prompt(GPT2Tokenizer(), "Hello world") == [15496, 995]
    chars = CharTokenizer.from_text("ab\n")
    assert encode_prompt(chars, "ba") == [2, 1]
    with pytest.raises(ValueError, match="prompt is empty and the 'char' vocabulary has no"):
        encode_prompt(chars, "")
