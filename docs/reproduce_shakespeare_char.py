"""nanoGPT's shakespeare_char recipe on one GPU: jaxgpt2 against nanoGPT's own train.py.

    python docs/reproduce_shakespeare_char.py --out OUT ours:1337 nano:1337 ours:1 nano:1 ...

Runs are made one after the other, in the order given (alternate the programs so drift
in the machine hits both). ``ours:S`` is ``python train.py --config
configs/shakespeare_char.yaml train.seed=S``; ``nano:S`` is nanoGPT's ``train.py
config/train_shakespeare_char.py`` from a git-ignored clone in ``third_party/nanoGPT``
(its code is never committed here), with its seed set to S (nanoGPT seeds with
``1337 + seed_offset``; ``train_seeded.py`` reads the offset from ``NANO_SEED_OFFSET``):

    git clone https://github.com/karpathy/nanoGPT third_party/nanoGPT
    cp jaxgpt2/assets/tinyshakespeare.txt third_party/nanoGPT/data/shakespeare_char/input.txt
    (cd third_party/nanoGPT && python data/shakespeare_char/prepare.py)
    sed 's/^    seed_offset = 0$/    seed_offset = int(os.environ.get("NANO_SEED_OFFSET", "0"))/' \\
        third_party/nanoGPT/train.py > third_party/nanoGPT/train_seeded.py

Both use the same split (first 90% of the characters to train, the last 10% to val),
the same model (6 layers, 384 wide, no biases, dropout 0.2), batch 64 x 256 and schedule.
Each finished run appends one JSON line to ``OUT/runs.jsonl``: its best validation loss
and step, final validation loss, wall time, median tokens/s and both loss curves.
``--plot FILE`` draws the validation curves of a ``runs.jsonl`` instead of running.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NANO = ROOT / "third_party" / "nanoGPT"
TOKENS_PER_STEP = 64 * 256


def run_ours(seed: int, work: Path) -> dict:
    out_dir = work / f"ours_{seed}"
    cmd = [sys.executable, "train.py", "--config", "configs/shakespeare_char.yaml",
           f"train.seed={seed}", f"train.out_dir={out_dir}", f"data.cache_dir={work / 'data'}",
           "train.progress=false"]
    wall = _timed(cmd, ROOT, work / f"ours_{seed}.log", {})
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
    rates = [r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r]
    return _result("jaxgpt2", seed, wall, val, train, statistics.median(rates))


def run_nano(seed: int, work: Path) -> dict:
    log = work / f"nano_{seed}.log"
    cmd = [sys.executable, "train_seeded.py", "config/train_shakespeare_char.py",
           f"--out_dir={work / f'nano_{seed}'}"]
    wall = _timed(cmd, NANO, log, {"NANO_SEED_OFFSET": str(seed - 1337)})
    text = log.read_text()
    val = [(int(s), float(v)) for s, v in
           re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", text)]
    train = [(int(s), float(v)) for s, v in re.findall(r"iter (\d+): loss ([\d.]+)", text)]
    times = [float(t) for t in re.findall(r"iter \d+: loss [\d.]+, time ([\d.]+)ms", text)]
    steady = times[len(times) // 10:] or times  # past compilation and warm-up
    return _result("nanoGPT", seed, wall, val, train, TOKENS_PER_STEP / (statistics.median(steady) / 1e3))


def _timed(cmd: list[str], cwd: Path, log: Path, env: dict[str, str]) -> float:
    began = time.perf_counter()
    with open(log, "w") as file:
        subprocess.run(cmd, cwd=cwd, stdout=file, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    return time.perf_counter() - began


def _result(program: str, seed: int, wall: float, val: list, train: list, rate: float) -> dict:
    best_step, best = min(val, key=lambda point: point[1])
    return {"program": program, "seed": seed, "best_val": best, "best_step": best_step,
            "final_val": val[-1][1], "wall_s": round(wall, 1), "tokens_per_sec": round(rate),
            "val": val, "train": train}


def plot(runs_file: Path, out: Path) -> None:
    """Validation loss against step, one colour per program, one line per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for line in runs_file.read_text().splitlines():
        run = json.loads(line)
        steps, losses = zip(*run["val"])
        ax.plot(steps, losses, color="C0" if run["program"] == "jaxgpt2" else "C1", lw=1.2,
                label=f"{run['program']} seed {run['seed']}", alpha=0.9)
    ax.set(xlabel="step", ylabel="validation loss", ylim=(1.4, 2.6),
           title="shakespeare_char on one H200")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path, metavar="FILE")
    parser.add_argument("runs", nargs="+", help="ours:SEED or nano:SEED (with --plot: runs.jsonl)")
    args = parser.parse_args()
    if args.plot:
        plot(Path(args.runs[0]), args.plot)
        return
    work = Path("/tmp/reproduce_shakespeare_char")
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        program, seed = run.split(":")
        result = (run_ours if program == "ours" else run_nano)(int(seed), work)
        with open(args.out / "runs.jsonl", "a") as file:
            file.write(json.dumps(result) + "\n")
        print(f"{result['program']:8} seed {seed:>5}: best val {result['best_val']:.4f} at "
              f"{result['best_step']}, final {result['final_val']:.4f}, {result['wall_s']:.0f} s, "
              f"{result['tokens_per_sec']:,} tok/s", flush=True)


if __name__ == "__main__":
    main()
