"""Benchmark ``python -m jaxgpt2.prepare``: tokens/s and peak memory per worker count.

    python docs/prepare_bench.py [--gigabytes 1] [--workers 1 2 16] [--keep DIR]

Writes a synthetic JSONL corpus (documents of 5-80 random Tiny Shakespeare lines: English-
like text whose size is chosen freely) to a temporary folder, prepares it once per worker
count, each in its own process, and prints a markdown table: wall time (the interpreter's
start included), tokens/s, speed-up over the first count, CPU seconds of the main
process, and peak RSS (see ``run_prepare``). It also checks that every worker count wrote
identical files. The temporary folder is deleted at the end unless ``--keep`` names one
to use instead.
Results from the project's machines are in ``docs/performance.md``, "Preparing corpora".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from jaxgpt2.prepare import bundled_corpus


def write_corpus(path: Path, gigabytes: float, seed: int = 0) -> int:
    """A JSONL file of about ``gigabytes`` of text; returns its size in bytes."""
    lines = np.asarray(bundled_corpus().read_text().splitlines(), dtype=object)
    rng = np.random.default_rng(seed)
    target = int(gigabytes * 1e9)
    with open(path, "w", encoding="utf-8") as out:
        while out.tell() < target:
            picks = rng.integers(0, lines.size, size=(1000, 80))
            lengths = rng.integers(5, 81, size=1000)
            out.write("".join(json.dumps({"text": "\n".join(lines[row[:n]])}) + "\n"
                              for row, n in zip(picks, lengths)))
    return path.stat().st_size


def run_prepare(corpus: Path, out: Path, workers: int) -> dict:
    """One prepare in a child process: wall seconds, tokens, CPU seconds, the peak RSS of
    its main process (``ru_maxrss``, what ``/usr/bin/time -v`` reports) and the peak of
    the RSS summed over it and its worker processes (sampled; shared pages counted once
    per process, so an upper bound)."""
    cmd = [sys.executable, "-m", "jaxgpt2.prepare", str(corpus), "--out", str(out),
           "--workers", str(workers)]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    peak = [0]
    sampler = threading.Thread(target=sample_tree_rss, args=(child.pid, peak), daemon=True)
    sampler.start()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise SystemExit(f"{' '.join(cmd)} failed with exit status {code}")
    meta = json.loads((out / "meta.json").read_text())
    return {"seconds": seconds, "tokens": meta["train_tokens"] + meta["val_tokens"],
            "rss_mb": usage.ru_maxrss / 1024, "tree_mb": peak[0] / 1024,
            "cpu_s": usage.ru_utime + usage.ru_stime}


def sample_tree_rss(root: int, peak: list[int]) -> None:
    """Every 0.2 s until ``root`` ends: the summed VmRSS (kB) of it and its descendants."""
    while Path(f"/proc/{root}").exists():
        parents = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
        tree, total = {root}, 0
        for pid in sorted(parents):  # children have higher pids, almost always
            if parents[pid] in tree:
                tree.add(pid)
        for pid in tree:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                total += int(status.split("VmRSS:")[1].split()[0])
            except (OSError, IndexError):
                continue
        peak[0] = max(peak[0], total)
        time.sleep(0.2)


def digest(folder: Path) -> str:
    """One hash over every file of a prepared folder, to compare worker counts."""
    h = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        h.update(file.name.encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, os.cpu_count()])
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temp one)")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="prepare_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        corpus = work / "corpus.jsonl"
        if not corpus.exists():
            print(f"writing {corpus} ...", flush=True)
        size = corpus.stat().st_size if corpus.exists() else write_corpus(corpus, args.gigabytes)
        print(f"corpus: {size / 1e9:.2f} GB of JSONL, {os.cpu_count()} CPUs\n")
        print("| workers | wall s | tokens | tokens/s | speed-up | CPU s, main | peak RSS MB, main "
              "| peak RSS MB, all processes |")
        print("|---|---|---|---|---|---|---|---|")
        digests, first = set(), None
        for workers in args.workers:
            out = work / f"out_{workers}"
            shutil.rmtree(out, ignore_errors=True)
            r = run_prepare(corpus, out, workers)
            first = first or r
            print(f"| {workers} | {r['seconds']:.1f} | {r['tokens']:,} | "
                  f"{r['tokens'] / r['seconds']:,.0f} | {first['seconds'] / r['seconds']:.2f}x | "
                  f"{r['cpu_s']:.1f} | {r['rss_mb']:,.0f} | {r['tree_mb']:,.0f} |", flush=True)
            digests.add(digest(out))
            shutil.rmtree(out)
        print(f"\nidentical output for every worker count: {len(digests) == 1}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
