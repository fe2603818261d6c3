"""HellaSwag: scores equal to transformers' on golden items (tests/make_hellaswag_golden.py),
the row layout and left cut, bad files, the ``jaxgpt2.evaluate`` flags, and the metrics in
a training run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from jaxgpt2 import evaluate
from jaxgpt2.config import load_config
from jaxgpt2.errors import InputError, NotFoundError
from jaxgpt2.evaluation import hellaswag
from jaxgpt2.hellaswag import (Example, check_gpt2, crop_note, ending_rows, load_examples,
                               make_score_step, pack, score)
from jaxgpt2.load import load
from jaxgpt2.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_HF = ROOT / "tests/golden/l2_h2_e16_p64"
ITEMS = ROOT / "tests/golden/hellaswag/items.jsonl"
GOLDEN = json.loads((ROOT / "tests/golden/hellaswag/golden.json").read_text())
# Summed losses of jaxgpt2 in float32 against transformers in float64, relative: float32
# transformers itself is 9e-8 off (golden.json), and the predictions' margins are 5e-3.
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def golden_model():
    loaded = load(GOLDEN_HF, "float32")
    return loaded, jax.jit(make_score_step(loaded.model))


@pytest.mark.parametrize("batch_examples", [1, 5])
def test_scores_match_transformers_on_the_golden_items(golden_model, batch_examples):
    """One example a batch (lengths 32 and 64), and five (a last batch of padding rows)."""
    loaded, step = golden_model
    scores = score(step, loaded.params, load_examples(ITEMS), loaded.config.block_size,
                   batch_examples)
    assert (scores.acc, scores.acc_norm, scores.n) == (GOLDEN["acc"], GOLDEN["acc_norm"], 12)
    np.testing.assert_array_equal(scores.token_counts, GOLDEN["token_counts"])
    np.testing.assert_allclose(scores.loss_sums, GOLDEN["loss_sums"], rtol=LOSS_RTOL, atol=0)
    np.testing.assert_array_equal(scores.loss_sums.argmin(1), GOLDEN["pred"])
    np.testing.assert_array_equal((scores.loss_sums / scores.token_counts).argmin(1),
                                  GOLDEN["pred_norm"])


def test_rows_keep_their_last_block_size_tokens_and_score_only_the_ending():
    example = Example(context=(1, 2, 3, 4, 5), endings=((6, 7), (8,), (9, 10, 11, 12, 13), (14,)),
                      label=0)
    rows = ending_rows(example, block_size=4)
    assert rows[0] == ([4, 5, 6, 7], [0, 0, 1, 1])
    assert rows[2] == ([10, 11, 12, 13], [1, 1, 1, 1])  # the ending itself cut: 3 scored
    batch = pack([example], batch_examples=2, block_size=4)
    assert batch["input_ids"].shape == (8, 4)  # 2 examples x 4 endings; block_size < 32
    np.testing.assert_array_equal(batch["targets"][1], [4, 5, 8, 0])
    np.testing.assert_array_equal(batch["loss_mask"][:4], [[0, 1, 1, 0], [0, 0, 1, 0],
                                                           [1, 1, 1, 0], [0, 0, 1, 0]])
    assert not batch["loss_mask"][4:].any()  # padding rows score nothing
    assert pack([example], 1, 100)["input_ids"].shape == (4, 32)  # 10 rounded up to 32
    assert crop_note([example], 10) is None
    assert "1 of 1 examples are longer than block_size 9" in crop_note([example], 9)


@pytest.mark.parametrize("line, message", [
    ("not json", "not a line of JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"ctx": "", "endings": ["a", "b", "c", "d"], "label": 0}', "'ctx' must be a non-empty"),
    ('{"ctx": "x", "endings": ["a", "b", "c"], "label": 0}', "'endings' must be a list of 4"),
    ('{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": "1"}', "'label' must be an integer"),
    ('{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 4}', "got 4"),
])
def test_a_bad_line_is_named_with_its_file_and_line(tmp_path, line, message):
    path = tmp_path / "hs.jsonl"
    path.write_text(ITEMS.read_text().splitlines()[0] + "\n\n" + line + "\n")
    with pytest.raises(InputError, match=f"hs.jsonl:3: .*{message}"):
        load_examples(path)


def test_missing_empty_and_non_gpt2_inputs_are_refused(tmp_path):
    with pytest.raises(NotFoundError, match="nope.jsonl: no such HellaSwag file"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match="no HellaSwag examples"):
        load_examples(tmp_path / "empty.jsonl")
    with pytest.raises(InputError, match="GPT-2's BPE, but run uses tokenizer 'char'"):
        check_gpt2({"tokenizer": "char"}, "run")
    with pytest.raises(InputError, match="an unknown tokenizer"):
        check_gpt2(None, "folder")
    check_gpt2({"tokenizer": "gpt2"}, "run")


# ------------------------------------------------------------------------------- CLI


def test_cli_json_prints_one_object_with_the_golden_accuracies(capsys):
    # 20 rows: 5 examples a batch, the shape the golden test compiled (persistent cache).
    assert evaluate.main(["--checkpoint", str(GOLDEN_HF), "--hellaswag", str(ITEMS),
                          "--json", "--batch_size", "20"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"hellaswag": {"acc": GOLDEN["acc"], "acc_norm": GOLDEN["acc_norm"],
                                             "n": 12}}
    assert "2 of 12 examples are longer than block_size 64" in err
    assert evaluate.main(["--checkpoint", str(GOLDEN_HF), "--hellaswag", str(ITEMS),
                          "--limit", "4", "--batch_size", "20"]) == 0
    line = capsys.readouterr().out
    labels, pred_norm = GOLDEN["labels"][:4], GOLDEN["pred_norm"][:4]
    acc_norm = np.mean(np.array(labels) == pred_norm)
    assert f"acc_norm {acc_norm:.4f}  n 4" in line


def test_cli_reports_a_bad_file_and_a_missing_choice(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "x", "endings": ["a"], "label": 0}\n')
    assert evaluate.main(["--checkpoint", str(GOLDEN_HF), "--hellaswag", str(bad)]) == 1
    assert f"error: {bad}:1: 'endings' must be a list of 4" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", str(GOLDEN_HF), "--hellaswag", str(bad) + "x"]) == 1
    assert "no such HellaSwag file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--checkpoint", str(GOLDEN_HF)])
    assert exit_info.value.code == 2
    assert "give --data (loss and perplexity), --hellaswag" in capsys.readouterr().err


# -------------------------------------------------------------------------- training


def test_training_logs_hellaswag_at_every_eval_and_takes_it_as_best_metric(tmp_path):
    short = tmp_path / "short.jsonl"  # four items of rows <= 32 tokens: one shape to compile
    lines = ITEMS.read_text(encoding="utf-8").splitlines()
    short.write_text("".join(lines[i] + "\n" for i in (0, 2, 3, 11)), encoding="utf-8")
    config = load_config(ROOT / "configs/tiny.yaml", [
        f"train.out_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'data'}",
        "data.dataset=shakespeare", "model.n_layer=1", "model.n_head=2", "model.n_embd=32",
        "model.block_size=64", "data.batch_size=4", "train.max_steps=4", "train.eval_interval=2",
        "train.eval_steps=1", "train.sample_tokens=0", "train.progress=false",
        f"train.hellaswag={short}", "train.best_metric=hellaswag_acc_norm",
        "train.best_direction=max"])
    Trainer(config).run()
    assert (tmp_path / "run/checkpoints/4").is_dir()
    records = [json.loads(line)
               for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    rows = [r for r in records if "hellaswag_acc" in r]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert r["hellaswag_acc"] in {0, 0.25, 0.5, 0.75, 1}
        assert r["hellaswag_acc_norm"] in {0, 0.25, 0.5, 0.75, 1}
        assert "val_loss" in r


def test_the_training_evaluation_is_off_by_default_and_refuses_a_character_vocabulary():
    """The builder reads only the config and the data's meta before refusing."""
    config = load_config(ROOT / "configs/tiny.yaml", [])
    char_data = SimpleNamespace(meta={"tokenizer": "char"}, path="data/shakespeare_char")
    assert hellaswag(SimpleNamespace(config=config, dataset=char_data)) is None
    config = load_config(ROOT / "configs/tiny.yaml", [f"train.hellaswag={ITEMS}"])
    with pytest.raises(InputError, match="GPT-2's BPE, but the training data .* 'char'"):
        hellaswag(SimpleNamespace(config=config, dataset=char_data))
