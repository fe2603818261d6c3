"""Prepared folders -> batches: round trips, the window rule over shards, the padded mode,
folders from before shards, the checks made when a folder is opened, and exact resume
over a sharded dataset."""

import json
import shutil
from importlib import resources
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxgpt2.config import load_config
from jaxgpt2.data import BatchSource, DataError, Split, open_dataset
from jaxgpt2.prepare import bundled_corpus, ensure_bundled, prepare
from jaxgpt2.tokenizer import GPT2Tokenizer
from jaxgpt2.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
LINES = bundled_corpus().read_text().splitlines()


def prepared(tmp_path: Path, name: str = "p", docs: int = 100, **options) -> Path:
    """A GPT-2 folder of ``docs`` documents of 20 Tiny Shakespeare lines each."""
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": "\n".join(LINES[i * 20:(i + 1) * 20])}) + "\n"
                           for i in range(docs)))
    prepare([src], tmp_path / name, **options)
    return tmp_path / name


def edit_meta(folder: Path, **changes) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, **changes}))


def test_prepare_then_load_round_trips_tokens(tmp_path):
    docs = ["First document.", "Second one, longer than the first.", "Third!"] * 400
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    meta = prepare([src], tmp_path / "prepared", tokenizer="gpt2", val_fraction=0.25)
    ds = open_dataset(tmp_path / "prepared")
    tok = GPT2Tokenizer()
    expected = []
    for i, d in enumerate(docs):
        expected += tok.encode(d) + [50256] if i % 4 != 3 else []
    np.testing.assert_array_equal(ds.train.read(0, ds.train.size), expected)
    assert meta["train_docs"] == 900 and meta["val_docs"] == 300
    assert ds.train.shards[0].dtype == np.uint16 and meta["train_shards"][0]["file"] == "train.bin"
    assert tok.decode(ds.val.read(0, len(tok.encode(docs[3])))) == docs[3]


def test_bundled_char_dataset_matches_nanogpt_split(tmp_path):
    ds = open_dataset(ensure_bundled("shakespeare_char", tmp_path))
    assert ds.meta["vocab_size"] == 65
    # nanoGPT's prepare.py reports 1,003,854 train and 111,540 val characters.
    assert ds.train.size == 1_003_854 and ds.val.size == 111_540
    assert ds.tokenizer().decode(ds.train.read(0, 14)) == "First Citizen:"


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


def test_single_file_windows_are_the_draw_of_earlier_versions(tmp_path):
    """Runs that started before shards resume onto exactly the windows they would have seen."""
    ds = open_dataset(ensure_bundled("shakespeare_char", tmp_path))
    tokens = ds.train.shards[0]
    source = BatchSource(ds.train, "windows", 4, 32, 2, seed=1337, stream=0)
    for step in (0, 7, 1000):
        rng = np.random.default_rng([1337, 0, step])
        starts = rng.integers(0, tokens.size - 32, size=8)  # the earlier code, verbatim
        windows = np.stack([tokens[s:s + 33] for s in starts]).astype(np.int32)
        np.testing.assert_array_equal(source(step)["input_ids"].reshape(8, 32), windows[:, :-1])


def test_windows_never_span_two_shards_and_draw_every_start_alike():
    # Token values are global positions, so a window's tokens say where it came from.
    bounds = [0, 1500, 3000, 3100]
    split = Split([np.arange(a, b, dtype=np.uint32) for a, b in zip(bounds, bounds[1:])],
                  np.zeros(1, np.int64))
    windows = np.concatenate([BatchSource(split, "windows", 64, 200, 1, 0, 0)(s)["input_ids"][0]
                              for s in range(40)])
    starts = windows[:, 0]
    assert (np.diff(windows, axis=1) == 1).all()
    # Starts 0..1299 of the first shard and 1500..2799 of the second; the third (100
    # tokens) is too short for a window of 201.
    assert ((starts < 1300) | ((starts >= 1500) & (starts < 2800))).all()
    assert 0.4 < (starts < 1500).mean() < 0.6
    np.testing.assert_array_equal(split.read(1490, 3010), np.arange(1490, 3010))


def test_padded_batches_mask_padding(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"text": "word " * n}) for n in (2, 3, 40, 5, 1, 7) * 100))
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


def test_padded_batches_are_the_same_however_the_split_is_sharded(tmp_path):
    """Documents continue across shard boundaries, so sharding changes no row."""
    one = open_dataset(prepared(tmp_path, "one"))
    many = open_dataset(prepared(tmp_path, "many", shard_tokens=1025))
    assert len(one.train.shards) == 1 and len(many.train.shards) == 15
    np.testing.assert_array_equal(one.train.doc_starts, many.train.doc_starts)
    for step in range(5):
        a = BatchSource(one.train, "padded", 16, 256, 1, 3, 0)(step)
        b = BatchSource(many.train, "padded", 16, 256, 1, 3, 0)(step)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_a_folder_from_before_shards_still_opens(tmp_path):
    """The layout earlier versions wrote: no ``*_shards`` in meta.json; the oldest had no
    ``*_docs.npy`` either."""
    new = ensure_bundled("shakespeare_char", tmp_path / "new")
    old = tmp_path / "old"
    shutil.copytree(new, old)
    meta = json.loads((old / "meta.json").read_text())
    (old / "meta.json").write_text(json.dumps({k: v for k, v in meta.items()
                                               if not k.endswith("_shards")}))
    (old / "val_docs.npy").unlink()
    a, b = open_dataset(new, 33), open_dataset(old, 33)
    assert b.train.size == a.train.size and b.val.doc_starts.tolist() == [0]
    np.testing.assert_array_equal(BatchSource(a.train, "windows", 4, 32, 1, 0, 0)(3)["input_ids"],
                                  BatchSource(b.train, "windows", 4, 32, 1, 0, 0)(3)["input_ids"])


# ----------------------------------------------------------------------------- checks at open


def test_missing_folder_and_tokens_outside_vocab_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="meta.json is missing"):
        open_dataset(tmp_path / "empty")
    out = tmp_path / "p"
    (tmp_path / "t.txt").write_text("abc" * 4000)
    prepare([tmp_path / "t.txt"], out, tokenizer="char")
    np.asarray([0, 1, 7], np.uint16).tofile(out / "train.bin")
    edit_meta(out, train_tokens=3, train_shards=[{"file": "train.bin", "tokens": 3, "docs": 1}])
    with pytest.raises(DataError, match="token id 7, outside the vocabulary of 3"):
        open_dataset(out)


def test_dataset_shorter_than_one_window_is_refused(tmp_path):
    (tmp_path / "t.txt").write_text("abcdefghij" * 1100)
    prepare([tmp_path / "t.txt"], tmp_path / "p", tokenizer="char")
    with pytest.raises(DataError, match=r"val.bin holds 1100 tokens, fewer than "
                                        r"block_size\+1=2000"):
        open_dataset(tmp_path / "p", min_tokens=2000)


def _damage(folder: Path, case: str) -> str:
    """Damage a prepared folder (sharded for the shard cases); return the expected error."""
    meta_file, train = folder / "meta.json", folder / "train.bin"
    if case == "meta_not_json":
        meta_file.write_text('{"tokenizer": "gpt2", ')
        return f"{meta_file} is not valid JSON"
    if case == "meta_lacks_keys":
        meta_file.write_text(json.dumps({"tokenizer": "gpt2", "train_tokens": 5}))
        return f"{meta_file} lacks 'vocab_size', 'dtype'; the folder is damaged"
    if case == "dtype_float64":  # the earlier code read the ids as float64s and trained
        edit_meta(folder, dtype="float64")
        return f"{meta_file} gives dtype 'float64'; token files are uint16 or uint32"
    if case == "odd_bytes":
        with open(train, "ab") as f:
            f.write(b"\0")
        return f"{train} holds [0-9,]+ bytes, not a whole number of uint16 tokens"
    if case == "truncated":  # the earlier code trained on what was left
        train.write_bytes(train.read_bytes()[:2000])
        return f"{train} holds 1,000 tokens but meta.json lists [0-9,]+: it is truncated"
    shard = folder / "train_000001.bin"
    if case == "shard_truncated":
        shard.write_bytes(shard.read_bytes()[:1000])
        return f"{shard} holds 500 tokens but meta.json lists 1,025"
    if case == "shard_missing":
        shard.unlink()
        return f"{shard} is missing or empty"
    if case == "shard_docs_missing":
        (folder / "train_000001_docs.npy").unlink()
        return "train_000001_docs.npy cannot be read"
    assert case == "counts_disagree"
    edit_meta(folder, train_tokens=5)
    return "lists train shards of [0-9,]+ tokens in all but train_tokens=5"


@pytest.mark.parametrize("case", ["meta_not_json", "meta_lacks_keys", "dtype_float64",
                                  "odd_bytes", "truncated", "shard_truncated",
                                  "shard_missing", "shard_docs_missing", "counts_disagree"])
def test_a_damaged_folder_is_refused_naming_the_file_and_the_fix(tmp_path, case):
    sharded = case.startswith(("shard", "counts"))
    folder = prepared(tmp_path, shard_tokens=1025 if sharded else 10**8)
    expected = _damage(folder, case)
    with pytest.raises(DataError, match=expected) as err:
        open_dataset(folder)
    message = str(err.value)
    assert str(folder) in message and ("re-prepare" in message or "rerun" in message)


# ----------------------------------------------------------------------------- exact resume


def test_training_on_shards_resumes_exactly(tmp_path):
    """configs/tiny.yaml on Tiny Shakespeare cut into 100k-token shards: a run stopped at
    step 3 and resumed logs the losses of one never stopped (all steps in the warmup, so
    the schedule does not depend on max_steps)."""
    data = tmp_path / "sharded"
    with resources.as_file(bundled_corpus()) as corpus:
        prepare([corpus], data, tokenizer="char", shard_tokens=100_000)
    assert len(json.loads((data / "meta.json").read_text())["train_shards"]) == 11

    def config(run, *extra):
        return load_config(ROOT / "configs/tiny.yaml", [
            f"train.out_dir={tmp_path / run}", f"data.dataset={data}", "train.progress=false",
            "train.log_interval=1", "train.eval_steps=1", "train.sample_tokens=0",
            "model.dropout=0.1", "train.save_interval=3", "train.eval_interval=3", *extra])

    def losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["train_loss"] for r in map(json.loads, lines) if "train_loss" in r}

    straight = Trainer(config("straight", "train.max_steps=6"))
    straight.run()
    Trainer(config("split", "train.max_steps=3")).run()
    resumed = Trainer(config("split", "train.max_steps=6", "train.resume=true"))
    assert int(resumed.state.step) == 3
    resumed.run()
    assert losses("split") == losses("straight") and len(losses("straight")) == 6
    for a, b in zip(jax.tree.leaves(jax.device_get(straight.state.params)),
                    jax.tree.leaves(jax.device_get(resumed.state.params))):
        np.testing.assert_array_equal(a, b)
