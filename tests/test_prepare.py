"""``python -m jaxgpt2.prepare``: input kinds, shards, parallel encoding, the validation
split, interrupted and repeated runs, and bad input."""

import gzip
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxgpt2 import prepare as prepare_module
from jaxgpt2.data import DataError, open_dataset
from jaxgpt2.errors import InputError
from jaxgpt2.prepare import (MIN_SPLIT_TOKENS, bundled_corpus, ensure_bundled, is_val,
                             list_inputs, prepare, read_documents)
from jaxgpt2.tokenizer import GPT2Tokenizer

ROOT = Path(__file__).resolve().parents[1]
LINES = bundled_corpus().read_text().splitlines()


def shakespeare_docs(n: int, lines: int = 20) -> list[str]:
    """``n`` documents of ``lines`` consecutive Tiny Shakespeare lines (about 150 GPT-2
    tokens each at 20 lines)."""
    return ["\n".join(LINES[i * lines:(i + 1) * lines]) for i in range(n)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def gpt2_ids(docs: list[str]) -> list[int]:
    tok, ids = GPT2Tokenizer(), []
    for doc in docs:
        ids += tok.encode(doc) + [50256]
    return ids


def all_tokens(split) -> np.ndarray:
    return split.read(0, split.size)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


# ----------------------------------------------------------------------------- inputs


def test_each_input_kind_is_read_with_the_named_field(tmp_path):
    missing = "{} (pip install 'jaxgpt2[data]') is not installed"
    pq = pytest.importorskip("pyarrow.parquet", reason=missing.format("pyarrow"))
    pa = pytest.importorskip("pyarrow")
    zstandard = pytest.importorskip("zstandard", reason=missing.format("zstandard"))
    docs = shakespeare_docs(10, lines=3)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(docs[0])
    write_jsonl(src / "b.jsonl", docs[1:3], field="body")
    with gzip.open(src / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"body": d}) + "\n" for d in docs[3:5]))
    (src / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"body": d}) + "\n" for d in docs[5:7]).encode()))
    pq.write_table(pa.table({"id": [7, 8, 9], "body": docs[7:10]}), src / "e.parquet",
                   row_group_size=2)
    files = list_inputs([src], [])
    assert [f.name for f in files] == ["a.txt", "b.jsonl", "c.jsonl.gz", "d.jsonl.zst", "e.parquet"]
    assert list(read_documents(files, "body")) == docs
    with pytest.raises(InputError, match=r"e.parquet has no column 'text' \(it has id, body\); "
                                         "name the text column with --text_field"):
        list(read_documents(files[-1:], "text"))


def test_a_folder_contributes_only_documented_kinds_and_never_the_output(tmp_path, capsys):
    src = tmp_path / "corpus"
    (src / "sub").mkdir(parents=True)
    write_jsonl(src / "sub" / "docs.jsonl", ["one"])
    (src / "notes.md").write_text("not read")
    (src / "table.csv").write_text("a,b")
    out = src / "prepared"  # the output inside the input folder, e.g. from an earlier run
    out.mkdir()
    (out / "train.bin").write_bytes(b"\0\0")
    (src / "prepared.partial").mkdir()
    write_jsonl(src / "prepared.partial" / "x.jsonl", ["stale"])
    files = list_inputs([src], [out, src / "prepared.partial"])
    assert files == [src / "sub" / "docs.jsonl"]
    printed = capsys.readouterr().out
    assert f"skipped 2 file(s) of other kinds: {src / 'notes.md'}, {src / 'table.csv'}" in printed
    assert "skipped 2 file(s) inside the output folder" in printed


def test_globs_expand_and_named_files_of_other_kinds_are_refused(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.txt"):
        write_jsonl(tmp_path / name, [name])
    assert list_inputs([str(tmp_path / "*.jsonl")], []) == [tmp_path / "a.jsonl",
                                                             tmp_path / "b.jsonl"]
    with pytest.raises(FileNotFoundError, match="matches nothing"):
        list_inputs([str(tmp_path / "*.parquet")], [])
    (tmp_path / "x.md").write_text("text")
    with pytest.raises(InputError, match="is not a kind prepare reads; name files ending in "
                                         ".jsonl.gz, .jsonl.zst, .jsonl, .parquet, .txt"):
        list_inputs([tmp_path / "x.md"], [])


def test_parquet_without_pyarrow_asks_for_the_extra(tmp_path, monkeypatch):
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails
    with pytest.raises(InputError, match=r"t.parquet needs the pyarrow package: pip install "
                                         r"'jaxgpt2\[data\]'"):
        prepare([tmp_path / "t.parquet"], tmp_path / "p")
    assert not (tmp_path / "p").exists() and not (tmp_path / "p.partial").exists()


# ----------------------------------------------------------------------------- output


def test_tokens_are_identical_whatever_the_workers_and_shards_are_full(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 3000)  # many chunks in flight
    docs = shakespeare_docs(120)
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    one = prepare([src], tmp_path / "w1", workers=1, shard_tokens=MIN_SPLIT_TOKENS)
    three = prepare([src], tmp_path / "w3", workers=3, shard_tokens=MIN_SPLIT_TOKENS)
    assert one == three and folder_bytes(tmp_path / "w1") == folder_bytes(tmp_path / "w3")
    shards = one["train_shards"]
    assert len(shards) > 10 and len(one["val_shards"]) > 1
    assert all(s["tokens"] == MIN_SPLIT_TOKENS for s in shards[:-1])
    assert shards[0]["file"] == "train_000000.bin"
    assert (tmp_path / "w1/train_000000_docs.npy").exists()
    # The shards concatenate to the documents' ids, every 10th document held out.
    ds = open_dataset(tmp_path / "w1")
    val = [d for i, d in enumerate(docs) if i % 10 == 9]
    train = [d for i, d in enumerate(docs) if i % 10 != 9]
    np.testing.assert_array_equal(all_tokens(ds.train), gpt2_ids(train))
    np.testing.assert_array_equal(all_tokens(ds.val), gpt2_ids(val))
    lengths = [len(ids) + 1 for ids in map(GPT2Tokenizer().encode, train)]
    np.testing.assert_array_equal(ds.train.doc_starts, np.cumsum([0] + lengths[:-1]))
    # A document straddling a boundary is listed only in the shard it starts in.
    first_docs = np.load(tmp_path / "w1/train_000000_docs.npy")
    second_docs = np.load(tmp_path / "w1/train_000001_docs.npy")
    assert first_docs[-1] + lengths[len(first_docs) - 1] > MIN_SPLIT_TOKENS
    assert second_docs[0] == first_docs[-1] + lengths[len(first_docs) - 1] - MIN_SPLIT_TOKENS


def test_validation_rule_every_kth_document_and_the_val_tokens_cap(tmp_path):
    assert [i for i in range(40) if is_val(i, 0.1)] == [9, 19, 29, 39]
    assert [i for i in range(8) if is_val(i, 0.25)] == [3, 7]
    assert sum(is_val(i, 0.37) for i in range(1000)) == 370
    docs = shakespeare_docs(100)
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    meta = prepare([src], tmp_path / "p", val_fraction=0.2, val_tokens=2000)
    # Every 5th document until val holds 2,000 tokens, then the rest to train.
    val_ids = []
    for i in range(4, 100, 5):
        val_ids += gpt2_ids([docs[i]])
        if len(val_ids) >= 2000:
            break
    assert meta["val_tokens"] == len(val_ids) and meta["val_docs"] == (i + 1) // 5
    assert meta["train_docs"] == 100 - meta["val_docs"]
    np.testing.assert_array_equal(all_tokens(open_dataset(tmp_path / "p").val), val_ids)


def test_bundled_datasets_keep_their_tokens(tmp_path):
    """sha256 of the token files the single-file prepare of earlier versions wrote."""
    expected = {
        "shakespeare_char": ("6ec305602a99ac2802745a134e1f5e33e2231b4855525b00b9aebb730ac2626f",
                             "d37d30cc0c8327c270d493299c3dca54135f6d5f1c9ef60cda78076e311204b1"),
        "shakespeare": ("3bed01fb68bb34a972dd4fbd94c05984f14f8e80cc68ff2cef22171e3b5535ec",
                        "3338144c7e9eb2828d9b19fe4b9e3688d6f9026f4f14f91f1a20756a3b2605c1"),
    }
    for name, hashes in expected.items():
        out = ensure_bundled(name, tmp_path)
        assert tuple(hashlib.sha256((out / f).read_bytes()).hexdigest()
                     for f in ("train.bin", "val.bin")) == hashes
        assert np.load(out / "train_docs.npy").tolist() == [0]


def test_char_tokenizer_ids_match_the_vocabulary(tmp_path):
    docs = ["héllo wörld " * 60, "ñandú " * 300, "zebra " * 300, "abc " * 400] * 3
    meta = prepare([write_jsonl(tmp_path / "d.jsonl", docs)], tmp_path / "p", tokenizer="char",
                   val_fraction=0.25)
    ds = open_dataset(tmp_path / "p")
    assert meta["chars"] == sorted(set("".join(docs))) and ds.meta["dtype"] == "uint16"
    train = "".join(d for i, d in enumerate(docs) if i % 4 != 3)
    assert ds.tokenizer().decode(all_tokens(ds.train)) == train


def test_a_vocabulary_beyond_65536_ids_is_stored_as_uint32(tmp_path):
    alphabet = "".join(map(chr, range(0x20000, 0x20000 + 70_000)))  # valid code points
    (tmp_path / "t.txt").write_text(alphabet * 2, encoding="utf-8")
    meta = prepare([tmp_path / "t.txt"], tmp_path / "p", tokenizer="char")
    ds = open_dataset(tmp_path / "p")
    assert meta["vocab_size"] == 70_000 and meta["dtype"] == "uint32"
    assert ds.train.shards[0].dtype == np.uint32
    assert ds.train.read(70_000, 70_003).tolist() == [0, 1, 2]
    assert ds.tokenizer().decode(ds.val.read(0, ds.val.size)) == (alphabet * 2)[126_000:]


# ----------------------------------------------------------------------------- interruptions


KILL_AFTER_FIRST_SHARD = """
import os, signal, sys
from jaxgpt2 import prepare
prepare.CHUNK_CHARS = 3000  # several chunks: the worker processes are used
close = prepare.ShardWriter._close
def close_then_die(self):
    close(self)
    os.kill(os.getpid(), signal.SIGKILL)
prepare.ShardWriter._close = close_then_die
sys.exit(prepare.main(sys.argv[1:]))
"""


def session_processes(session: int) -> list[int]:
    """The processes of a session (Linux' /proc), to find orphaned pool workers."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[3]) == session:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux' /proc")
def test_a_killed_prepare_is_refused_by_training_and_a_rerun_starts_over(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", shakespeare_docs(80))
    out = tmp_path / "p"
    args = [str(src), "--out", str(out), "--shard_tokens", "2000", "--workers", "2"]
    killed = subprocess.Popen([sys.executable, "-c", KILL_AFTER_FIRST_SHARD, *args], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert killed.wait() == -9, killed.stderr.read()
    # Its worker processes notice and exit too (they check every second).
    deadline = time.time() + 10
    while session_processes(killed.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert session_processes(killed.pid) == []
    partial = tmp_path / "p.partial"
    assert (partial / "train_000000.bin").exists() and (partial / "PREPARING.json").exists()
    with pytest.raises(DataError, match=r"does not exist: its prepare was interrupted \(it "
                                        f"left {partial}\\); rerun the same"):
        open_dataset(out)
    with pytest.raises(DataError, match="PREPARING.json marks an interrupted prepare"):
        open_dataset(partial)
    assert prepare_module.main(args) == 0
    assert not partial.exists()
    prepare([src], tmp_path / "clean", shard_tokens=2000)
    assert folder_bytes(out) == folder_bytes(tmp_path / "clean")


def test_a_failure_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "docs.jsonl", shakespeare_docs(60))
    with open(src, "a") as f:
        f.write("{broken\n")
    with pytest.raises(InputError, match="docs.jsonl:61: not valid JSON"):
        prepare([src], tmp_path / "p", shard_tokens=2000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


# ----------------------------------------------------------------------------- never overwrite


def test_an_existing_corpus_is_refused_unless_overwrite_then_swapped_when_complete(tmp_path):
    old_src = write_jsonl(tmp_path / "old.jsonl", shakespeare_docs(100))
    new_src = write_jsonl(tmp_path / "new.jsonl", shakespeare_docs(200)[100:])
    out = tmp_path / "p"
    old = prepare([old_src], out)
    with pytest.raises(InputError, match=rf"--out {out} already holds a prepared corpus \(gpt2 "
                                         rf"tokens, {old['train_tokens']:,} train and "
                                         rf"{old['val_tokens']:,} val tokens, written 20\d\d-.* "
                                         r"UTC\); pass --overwrite"):
        prepare([new_src], out)
    # A failing --overwrite leaves the old corpus whole.
    with open(new_src, "a") as f:
        f.write("{broken\n")
    with pytest.raises(InputError, match="not valid JSON"):
        prepare([new_src], out, overwrite=True)
    assert open_dataset(out).meta == old
    new_src.write_text(new_src.read_text().replace("{broken\n", ""))
    new = prepare([new_src], out, overwrite=True)
    assert open_dataset(out).meta == new != old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.jsonl", "old.jsonl", "p"]


def test_out_that_is_a_file_or_a_foreign_folder_is_refused(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", shakespeare_docs(100))
    (tmp_path / "file").write_text("mine")
    assert prepare_module.main([str(src), "--out", str(tmp_path / "file")]) == 1
    with pytest.raises(InputError, match="is an existing file, not a folder"):
        prepare([src], tmp_path / "file")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"holds files prepare did not write \(notes.txt\)"):
        prepare([src], tmp_path / "home", overwrite=True)
    (tmp_path / "empty").mkdir()
    prepare([src], tmp_path / "empty")  # an empty folder is fine
    assert (tmp_path / "empty" / "meta.json").exists()


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("docs, val_fraction, split, tokens", [
    (["a few words"] * 20, 0.1, "train", 72),  # 18 documents of 4 tokens
    (shakespeare_docs(20), 0.1, "val", 253),  # 2 documents held out
])
def test_a_corpus_below_the_minimum_is_refused_naming_both(tmp_path, docs, val_fraction,
                                                           split, tokens):
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    with pytest.raises(InputError, match=rf"the {split} split would hold {tokens:,} tokens "
                                         rf"\(\d+ documents\), fewer than the minimum of 1,025"):
        prepare([src], tmp_path / "p", val_fraction=val_fraction)
    assert not (tmp_path / "p").exists()


def test_prepare_cli_writes_the_folder_and_returns_0(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("abcdefghij" * 1100)
    assert prepare_module.main([str(tmp_path / "t.txt"), "--out", str(tmp_path / "p"),
                                "--tokenizer", "char"]) == 0
    assert f"wrote {tmp_path / 'p'}: 9,900 train and 1,100 val tokens" in capsys.readouterr().out
    assert (tmp_path / "p" / "meta.json").is_file()


@pytest.mark.parametrize("case", ["missing_input", "bad_jsonl_line", "not_utf8",
                                  "val_fraction_zero", "bad_gzip", "no_text"])
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
    elif case == "bad_gzip":
        src = tmp_path / "docs.jsonl.gz"
        src.write_bytes(b"not gzip at all")
        expected = f"{src} cannot be decompressed (Not a gzipped file"
    elif case == "no_text":
        src.write_text(json.dumps({"text": ""}) + "\n")
        expected = "no text found in"
    else:
        args, expected = ["--val_fraction", "0"], "--val_fraction must be between 0 and 1"
    code = prepare_module.main([str(src), "--out", str(tmp_path / "p"), *args])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ") and expected in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "p").exists() and not (tmp_path / "p.partial").exists()


@pytest.mark.parametrize("option, value, expected", [
    ("val_fraction", 1.0, "--val_fraction must be between 0 and 1 (exclusive), got 1.0"),
    ("val_fraction", float("nan"), "--val_fraction must be between 0 and 1 (exclusive), got nan"),
    ("workers", 0, "--workers must be at least 1, got 0"),
    ("shard_tokens", 1000, "--shard_tokens must be at least 1,025"),
    ("val_tokens", 10, "--val_tokens must be at least 1,025"),
])
def test_options_are_checked_before_anything_is_read(tmp_path, option, value, expected):
    with pytest.raises(ValueError) as err:
        prepare([tmp_path / "not_even_there.txt"], tmp_path / "p", **{option: value})
    assert expected in str(err.value)
    assert not (tmp_path / "p").exists()
