"""Prepare -> load round trip, batch modes, determinism and data errors."""

import json

import numpy as np
import pytest

from jaxgpt2.data import BatchSource, DataError, open_dataset
from jaxgpt2 import prepare as prepare_module
from jaxgpt2.prepare import ensure_bundled, prepare
from jaxgpt2.tokenizer import GPT2Tokenizer


def test_prepare_then_load_round_trips_tokens(tmp_path):
    docs = ["First document.", "Second one, longer than the first.", "Third!"] * 4
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    meta = prepare([src], tmp_path / "prepared", tokenizer="gpt2", val_fraction=0.25)
    ds = open_dataset(tmp_path / "prepared")
    tok = GPT2Tokenizer()
    expected = []
    for d in docs[:9]:
        expected += tok.encode(d) + [50256]
    np.testing.assert_array_equal(np.asarray(ds.train.tokens), expected)
    assert meta["train_docs"] == 9 and meta["val_docs"] == 3
    assert ds.train.tokens.dtype == np.uint16
    assert tok.decode(ds.val.tokens[: len(tok.encode(docs[9]))]) == docs[9]


def test_bundled_char_dataset_matches_nanogpt_split(tmp_path):
    ds = open_dataset(ensure_bundled("shakespeare_char", tmp_path))
    assert ds.meta["vocab_size"] == 65
    # nanoGPT's prepare.py reports 1,003,854 train and 111,540 val characters.
    assert ds.train.tokens.size == 1_003_854 and ds.val.tokens.size == 111_540
    assert ds.tokenizer().decode(ds.train.tokens[:14]) == "First Citizen:"


def test_window_batches_are_shifted_by_one_and_reproducible(tmp_path):
    ds = open_dataset(ensure_bundled("shakespeare_char", tmp_path))
    source = BatchSource(ds.train, "windows", batch_size=4, block_size=8, grad_accum=2,
                         seed=1, stream=0)
    batch = source(5)
    assert batch["input_ids"].shape == (2, 4, 8)
    np.testing.assert_array_equal(batch["input_ids"][..., 1:], batch["targets"][..., :-1])
    np.testing.assert_array_equal(source(5)["input_ids"], batch["input_ids"])
    assert not np.array_equal(source(6)["input_ids"], batch["input_ids"])
    # A process owning rows 2..4 sees exactly those rows of the global batch.
    half = BatchSource(ds.train, "windows", 4, 8, 2, 1, 0, row_start=2, row_stop=4)
    np.testing.assert_array_equal(half(5)["input_ids"], batch["input_ids"][:, 2:4])


def test_padded_batches_mask_padding(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"text": "word " * n}) for n in (2, 3, 40, 5, 1)))
    prepare([src], tmp_path / "p", tokenizer="gpt2", val_fraction=0.2)
    ds = open_dataset(tmp_path / "p")
    batch = BatchSource(ds.train, "padded", 8, 16, 1, 0, 0)(0)
    ids, mask, loss_mask = batch["input_ids"][0], batch["attention_mask"][0], batch["loss_mask"][0]
    lengths = mask.sum(-1)
    assert lengths.min() < 16 and lengths.max() == 16  # short docs padded, long one cut
    for row in range(8):
        n = lengths[row]
        assert mask[row, :n].all() and not mask[row, n:].any()  # right padding
        assert (ids[row, n:] == 0).all()
        # A document of n < 16 tokens has n - 1 next-token targets; the padding none.
        if n < 16:
            assert loss_mask[row].sum() == n - 1 and not loss_mask[row, n - 1:].any()
        else:
            assert loss_mask[row].sum() in (15, 16)


def test_missing_folder_and_tokens_outside_vocab_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="meta.json is missing"):
        open_dataset(tmp_path / "empty")
    out = tmp_path / "p"
    (tmp_path / "t.txt").write_text("abcabcabcabc")
    prepare([tmp_path / "t.txt"], out, tokenizer="char")
    np.asarray([0, 1, 7], np.uint16).tofile(out / "train.bin")
    with pytest.raises(DataError, match="token id 7, outside the vocabulary of 3"):
        open_dataset(out)


def test_dataset_shorter_than_one_window_is_refused(tmp_path):
    (tmp_path / "t.txt").write_text("abcdefghij" * 3)
    prepare([tmp_path / "t.txt"], tmp_path / "p", tokenizer="char")
    with pytest.raises(DataError, match="fewer than block_size\\+1=65"):
        open_dataset(tmp_path / "p", min_tokens=65)


# ----------------------------------------------------------------------------- bad input


def test_prepare_cli_writes_the_folder_and_returns_0(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("abcdefghij" * 3)
    assert prepare_module.main([str(tmp_path / "t.txt"), "--out", str(tmp_path / "p"),
                                "--tokenizer", "char"]) == 0
    assert f"wrote {tmp_path / 'p'}: 27 train and 3 val tokens" in capsys.readouterr().out
    assert (tmp_path / "p" / "meta.json").is_file()


@pytest.mark.parametrize("case", ["missing_input", "bad_jsonl_line", "not_utf8",
                                  "val_fraction_zero"])
def test_prepare_cli_reports_bad_input_without_traceback(tmp_path, capsys, case):
    """Each mistake exits 1 with ``error: <what and the fix>`` on stderr, no traceback."""
    src = tmp_path / "docs.jsonl"
    src.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": "also"}) + "\n")
    args = ["--val_fraction", "0.5"]
    if case == "missing_input":
        src, expected = tmp_path / "nope.txt", f"input '{tmp_path / 'nope.txt'}' does not exist"
    elif case == "bad_jsonl_line":
        src.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
        expected = (f"{src}:2: not valid JSON (Expecting property name enclosed in double "
                    "quotes: line 1 column 2 (char 1)); each line must be a JSON object with "
                    "a string 'text' field")
    elif case == "not_utf8":
        src = tmp_path / "latin1.txt"
        src.write_bytes("caf\u00e9 au lait".encode("latin-1"))
        expected = f"{src} is not UTF-8 text ("
    else:
        args, expected = ["--val_fraction", "0"], "--val_fraction must be between 0 and 1"
    code = prepare_module.main([str(src), "--out", str(tmp_path / "p"), *args])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ") and expected in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("val_fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_val_fraction_outside_0_1_is_refused_before_writing(tmp_path, val_fraction):
    (tmp_path / "t.txt").write_text("abcdefghij" * 3)
    with pytest.raises(ValueError, match="--val_fraction must be between 0 and 1 "
                                         r"\(exclusive\), got"):
        prepare([tmp_path / "t.txt"], tmp_path / "p", tokenizer="char",
                val_fraction=val_fraction)
    assert not (tmp_path / "p").exists()


def test_whole_document_split_leaving_train_empty_is_refused(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"text": t}) for t in ("one", "two")))
    with pytest.raises(ValueError, match="--val_fraction 0.9 of 2 documents puts all 2 in "
                                         "the val split and none in train; lower "
                                         "--val_fraction or give more documents"):
        prepare([src], tmp_path / "p", tokenizer="gpt2", val_fraction=0.9)
    assert not (tmp_path / "p").exists()
    meta = prepare([src], tmp_path / "p", tokenizer="gpt2", val_fraction=0.5)
    assert meta["train_docs"] == 1 and meta["val_docs"] == 1  # two documents can split


@pytest.mark.parametrize("text, val_fraction, empty", [
    ("ab", 0.9, "train"),  # int(2 * 0.1) = 0 characters to train
    ("ab", 1e-17, "val"),  # 1 - 1e-17 == 1.0: every character to train
])
def test_single_document_split_leaving_a_side_empty_is_refused(tmp_path, text,
                                                                val_fraction, empty):
    (tmp_path / "t.txt").write_text(text)
    with pytest.raises(ValueError, match=f"the only document has 2 character\\(s\\), and "
                                         f"--val_fraction {val_fraction} of it leaves the "
                                         f"{empty} split empty; give more text"):
        prepare([tmp_path / "t.txt"], tmp_path / "p", tokenizer="char",
                val_fraction=val_fraction)
    assert not (tmp_path / "p").exists()
