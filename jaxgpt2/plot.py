"""Loss curves of one or more runs: ``python -m jaxgpt2.plot RUN_DIR [RUN_DIR ...] [--out FILE]``.

Draws training and validation loss against steps and against tokens (PNG, matplotlib
from the optional ``[plot]`` extra), one colour per run, labelled with the run folder's
name, so runs compare at a glance. Each run also redraws its own ``loss.png`` at every
evaluation and at the end (``train.plot``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from jaxgpt2.errors import InputError, NotFoundError, report_errors


def read_run(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], int]:
    """``{"train_loss": [(step, loss)...], "val_loss": [...]}`` from ``metrics.jsonl``,
    and the run's tokens per step from its ``config.yaml``."""
    metrics, config = run_dir / "metrics.jsonl", run_dir / "config.yaml"
    if not metrics.is_file() or not config.is_file():
        raise NotFoundError(f"{run_dir}: not a run folder (it needs metrics.jsonl and "
                            "config.yaml, which train.py writes)")
    curves: dict[str, list[tuple[int, float]]] = {"train_loss": [], "val_loss": []}
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed run
            continue
        for key, points in curves.items():
            if isinstance(row.get(key), (int, float)):
                points.append((row["step"], row[key]))
    resolved = yaml.safe_load(config.read_text())
    tokens = (resolved["data"]["batch_size"] * resolved["train"]["grad_accum"]
              * resolved["model"]["block_size"])
    return curves, tokens


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise InputError("plotting needs matplotlib: pip install 'jaxgpt2[plot]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot

    return matplotlib.pyplot


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    """Draw every run's train (line) and validation (line with dots) loss into ``out``."""
    plt = _pyplot()
    fig, (by_step, by_token) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for i, run_dir in enumerate(run_dirs):
        curves, tokens_per_step = read_run(run_dir)
        colour = f"C{i % 10}"
        for key, style in (("train_loss", dict(lw=1, alpha=0.6)),
                           ("val_loss", dict(lw=1.5, marker="o", ms=3))):
            if not curves[key]:
                continue
            steps, losses = zip(*curves[key])
            label = f"{run_dir.name} {key.split('_')[0]}"
            by_step.plot(steps, losses, color=colour, label=label, **style)
            by_token.plot([s * tokens_per_step for s in steps], losses, color=colour, **style)
    by_step.set(xlabel="step", ylabel="loss")
    by_token.set(xlabel="tokens")
    by_step.legend(fontsize=8)
    for ax in (by_step, by_token):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)  # a reader never sees half a PNG
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (train.out_dir)")
    parser.add_argument("--out", type=Path, default=Path("loss.png"), help="PNG to write")
    args = parser.parse_args(argv)
    return report_errors(lambda: print(f"wrote {plot_runs(args.runs, args.out)}"))


if __name__ == "__main__":
    sys.exit(main())
