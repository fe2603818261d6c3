"""Rerun the study in docs/optimizers.md: the CPU baby GPT on Tiny Shakespeare, shortened
to 400 steps (307k tokens), under each optimizer (learning rate swept over three values)
and, with AdamW at its best rate, under each schedule.

    python docs/optimizer_study.py --out /tmp/optimizer_study            # one run at a time
    python docs/optimizer_study.py --out /tmp/optimizer_study --lanes 8  # 8 at once, 2 cores each
    python docs/optimizer_study.py --out /tmp/optimizer_study --report   # table and plots only
    python docs/optimizer_study.py --out /tmp/optimizer_study --report --time_steps

Run from the repository root. A run already finished in ``--out`` is kept, not rerun, so
an interrupted study continues. After the runs, each optimizer's step is timed alone
(``step_times.json``). ``--lanes N`` pins each run to its own cores with ``taskset`` (a
many-core machine). The report needs matplotlib (``pip install -e ".[plot]"``) and
writes its plots into ``docs/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 400
# Every run decays weights by the recipe's lr * weight_decay = 1e-3 * 0.1 a step, so a
# rule run at another rate is not also run at another decay strength.
DECAY_PER_STEP = 1e-4
BASE = ("configs/shakespeare_char_cpu.yaml", f"train.max_steps={STEPS}",
        f"optim.decay_steps={STEPS}", f"optim.warmup_steps={STEPS // 10}",
        f"train.eval_interval={STEPS // 4}", "train.eval_steps=40",
        f"train.save_interval={STEPS}", "train.sample_tokens=0", "train.progress=false",
        "train.device=cpu")
# The swept field and its three values per optimizer: around AdamW's 1e-3, Lion's 3-10x
# smaller rate, Adafactor's relative step, SGD's larger rate, Muon's 0.02.
SWEEPS = {
    "adamw": ("lr", (1e-3, 2e-3, 4e-3)),
    "lion": ("lr", (2e-4, 4e-4, 8e-4)),
    "adafactor": ("lr", (1e-2, 3e-2, 1e-1)),
    "sgd": ("lr", (0.1, 0.3, 1.0)),
    "muon": ("muon_lr", (0.01, 0.02, 0.05)),
}
# Each schedule under AdamW (cosine is the AdamW sweep itself).
SCHEDULES = {
    "constant": ("optim.schedule=constant",),
    "linear": ("optim.schedule=linear",),
    "wsd (linear)": ("optim.schedule=wsd", "optim.decay_shape=linear"),
    "wsd (1-sqrt)": ("optim.schedule=wsd", "optim.decay_shape=1-sqrt"),
    "inverse_sqrt": ("optim.schedule=inverse_sqrt",),
}
# Schedules with neither a floor nor an end: the base config sets both, so they are unset
# (min_lr equal to lr reads as "no decay").
ENDLESS = ("constant", "inverse_sqrt")


@dataclass(frozen=True)
class Run:
    folder: str
    group: str  # "optimizer", "beyond" (a check past the grid's edge) or "schedule"
    label: str
    lr: float  # optim.lr
    overrides: tuple[str, ...]


def optimizer_run(name: str, value: float, adamw_lr: float, group: str = "optimizer") -> Run:
    """``name`` with its swept field at ``value``; Muon's AdamW part runs at ``adamw_lr``."""
    key, _ = SWEEPS[name]
    lr = value if key == "lr" else adamw_lr
    overrides = [f"optim.name={name}", f"optim.lr={lr}", f"optim.min_lr={lr / 10:.6g}",
                 f"optim.weight_decay={DECAY_PER_STEP / lr:.6g}"]
    if key != "lr":
        overrides.append(f"optim.{key}={value}")
    if name not in ("adamw", "muon"):
        overrides.append("optim.b2=0.95")  # the base config's b2 is AdamW's; back to default
    return Run(f"{name}_{key}{value:g}", group, name, lr, tuple(overrides))


def schedule_run(label: str, adamw_lr: float) -> Run:
    """AdamW at its best rate under the schedule ``label`` names."""
    base = optimizer_run("adamw", adamw_lr, adamw_lr)
    endless = (f"optim.min_lr={adamw_lr}", "optim.decay_steps=null") if label in ENDLESS else ()
    folder = "schedule_" + label.replace(" ", "").replace("(", "_").replace(")", "")
    return Run(folder, "schedule", label, adamw_lr, base.overrides + SCHEDULES[label] + endless)


def sweep(name: str, adamw_lr: float = 0.0) -> list[Run]:
    return [optimizer_run(name, v, adamw_lr) for v in SWEEPS[name][1]]


def plan(out: Path) -> list[list[Run]]:
    """The phases, each planned once the one before it has finished: the sweeps that need
    nothing else; Muon's sweep (its AdamW part at AdamW's best rate) and the schedules;
    then one value past the grid for each optimizer whose best value is at its edge."""
    phases = [[r for name in ("adamw", "lion", "adafactor", "sgd") for r in sweep(name)]]
    if not all(finished(out, r) for r in phases[0]):
        return phases
    adamw_lr = best(out, sweep("adamw")).lr
    phases.append(sweep("muon", adamw_lr) + [schedule_run(s, adamw_lr) for s in SCHEDULES])
    if all(finished(out, r) for r in phases[1]):
        phases.append([run for name in SWEEPS if (run := beyond(out, name, adamw_lr))])
    return phases


def beyond(out: Path, name: str, adamw_lr: float) -> Run | None:
    """One step past the grid's edge (x2 or /2) when the best value sits on that edge."""
    key, values = SWEEPS[name]
    runs = sweep(name, adamw_lr)
    at = runs.index(best(out, runs))
    if 0 < at < len(values) - 1:
        return None
    value = values[at] * (2 if at else 0.5)
    return optimizer_run(name, value, adamw_lr, group="beyond")


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def final_val_loss(run_dir: Path) -> float | None:
    found = [r["val_loss"] for r in read_metrics(run_dir)
             if r.get("step") == STEPS and r.get("val_loss") is not None]
    return found[-1] if found else None


def finished(out: Path, run: Run) -> bool:
    run_dir = out / run.folder
    return (run_dir / "wall.json").exists() and final_val_loss(run_dir) is not None


def best(out: Path, runs: list[Run]) -> Run:
    return min(runs, key=lambda r: final_val_loss(out / r.folder) or float("inf"))


def train(out: Path, run: Run, cores: str | None) -> None:
    """One training run, its wall time (compile and evaluation included) saved beside it."""
    run_dir = out / run.folder
    command = [sys.executable, "train.py", "--config", *BASE, *run.overrides,
               f"train.out_dir={run_dir}"]
    if cores:
        command = ["taskset", "-c", cores, *command]
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(run_dir / "train.log", "w") as log:
        code = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"}).returncode
    wall = time.time() - start
    if code == 0:
        (run_dir / "wall.json").write_text(json.dumps({"wall_s": wall, "cores": cores}))
    print(f"{run.folder}: exit {code}, {wall:.0f} s, val {final_val_loss(run_dir)}", flush=True)


def train_all(out: Path, runs: list[Run], lanes: int, cores_per_run: int) -> None:
    """The unfinished ``runs``, ``lanes`` at a time, each on its own cores when lanes > 1."""
    free: queue.Queue = queue.Queue()
    for lane in range(lanes):
        first = lane * cores_per_run
        free.put(",".join(map(str, range(first, first + cores_per_run))) if lanes > 1 else None)

    def on_free_cores(run: Run) -> None:
        cores = free.get()
        try:
            train(out, run, cores)
        finally:
            free.put(cores)

    with ThreadPoolExecutor(lanes) as pool:
        list(pool.map(on_free_cores, [r for r in runs if not finished(out, r)]))


def time_steps(out: Path, repeats: int = 5, steps: int = 30) -> None:
    """Each optimizer's jitted train step at its best setting, timed alone on one fixed
    batch: the runs' wall times also hold compilation, evaluation and whatever else
    shared the machine. The optimizers take turns, ``repeats`` rounds of ``steps`` steps,
    so a busy spell on a shared machine hits them all; each keeps its fastest round."""
    import jax

    steppers = {name: compiled_step(best(out, sweep(name, best(out, sweep("adamw")).lr)))
                for name in SWEEPS}
    times = {name: float("inf") for name in SWEEPS}
    for _ in range(repeats):
        for name, run_steps in steppers.items():
            start = time.perf_counter()
            jax.block_until_ready(run_steps(steps))
            times[name] = min(times[name], (time.perf_counter() - start) / steps * 1e3)
    print(", ".join(f"{name} {ms:.1f}" for name, ms in times.items()), "ms/step", flush=True)
    (out / "step_times.json").write_text(json.dumps(times, indent=1))


def compiled_step(run: Run):
    """``run_steps(n)``: ``n`` more jitted train steps of ``run``'s model and optimizer on
    one fixed batch (compiled and warmed up here)."""
    import jax
    import numpy as np

    from jaxgpt2.config import load_config
    from jaxgpt2.model import GPT
    from jaxgpt2.optim import build_optimizer
    from jaxgpt2.step import create_train_state, jit_train_step, make_train_step

    config = load_config(ROOT / BASE[0], [*BASE[1:], *run.overrides])
    model = GPT(dataclasses.replace(config.model.gpt_config(), vocab_size=65, dtype="float32"))
    optimizer = build_optimizer(config.optim, STEPS)
    step = jit_train_step(make_train_step(model, optimizer))
    ids = np.random.default_rng(0).integers(0, 65, (1, 12, 65)).astype(np.int32)
    batch = {"input_ids": ids[..., :-1], "targets": ids[..., 1:],
             "loss_mask": np.ones((1, 12, 64), np.float32)}
    holder = [create_train_state(model.init_params(jax.random.PRNGKey(0)), optimizer, 0)]

    def run_steps(n: int):
        for _ in range(n):
            holder[0] = step(holder[0], batch)[0]
        return holder[0]

    jax.block_until_ready(run_steps(3))
    return run_steps


def report(out: Path) -> None:
    """Print the tables of docs/optimizers.md and draw its plots."""
    phases = plan(out)
    optimizers = [r for phase in phases for r in phase if r.group != "schedule"]
    grid = [r for r in optimizers if r.group == "optimizer"]
    winners = [best(out, [r for r in grid if r.label == name]) for name in SWEEPS]
    times = out / "step_times.json"
    step_ms = json.loads(times.read_text()) if times.exists() else {}
    print(f"| optimizer | run | swept value | val loss, step {STEPS} | run wall (s) "
          "| step alone (ms) |\n|---|---|---|---|---|---|")
    for run in optimizers:
        past = " (past the grid)" if run.group == "beyond" else ""
        swept = ", ".join(o.removeprefix("optim.") for o in run.overrides
                          if o.split("=")[0] in ("optim.lr", "optim.muon_lr"))
        ms = f"{step_ms[run.label]:.1f}" if run in winners and run.label in step_ms else ""
        print(f"| {run.label}{past} | `{run.folder}` | {swept} | "
              f"{val_text(out, run, run in winners)} | {wall_text(out, run)} | {ms} |")
    adamw = best(out, sweep("adamw"))
    schedules = [dataclasses.replace(adamw, label="cosine")] + [
        r for phase in phases for r in phase if r.group == "schedule"]
    top = best(out, schedules)
    print(f"\n| schedule (AdamW, lr {adamw.lr:g}) | run | val loss, step {STEPS} "
          "| run wall (s) |\n|---|---|---|---|")
    for run in schedules:
        print(f"| {run.label} | `{run.folder}` | {val_text(out, run, run == top)} "
              f"| {wall_text(out, run)} |")
    plot(out, winners, ROOT / "docs/optimizers_optimizers.png", "each optimizer at its best rate",
         (1.8, 3.0))
    plot(out, schedules, ROOT / "docs/optimizers_schedules.png", "AdamW under each schedule",
         (2.1, 2.8))


def val_text(out: Path, run: Run, bold: bool) -> str:
    val = final_val_loss(out / run.folder)
    return "-" if val is None else (f"**{val:.4f}**" if bold else f"{val:.4f}")


def wall_text(out: Path, run: Run) -> str:
    if not finished(out, run):
        return "-"
    return f"{json.loads((out / run.folder / 'wall.json').read_text())['wall_s']:.0f}"


def plot(out: Path, runs: list[Run], path: Path, title: str,
         loss_range: tuple[float, float]) -> None:
    """Train loss (lines, a 30-step moving mean), validation loss (dots) and the rate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=90)
    for run in runs:
        records = read_metrics(out / run.folder)
        train_records = [r for r in records if r.get("train_loss") is not None]
        val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
        steps = [r["step"] for r in train_records]
        line, = ax_loss.plot(steps, moving_mean([r["train_loss"] for r in train_records], 3),
                             lw=1.2, label=run.label)
        ax_loss.plot(*zip(*val), "o", color=line.get_color(), ms=4)
        ax_lr.plot(steps, [r["lr"] for r in train_records], lw=1.2, color=line.get_color())
    ax_loss.set(xlabel="step", ylabel="loss (train: line, val: dots)", ylim=loss_range,
                title=title)
    ax_lr.set(xlabel="step", ylabel="optim.lr (Muon: its AdamW part)", yscale="log",
              title="learning rate")
    ax_loss.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size // 1024} KB)")


def moving_mean(values: list[float], window: int) -> list[float]:
    windows = [values[max(0, i - window + 1): i + 1] for i in range(len(values))]
    return [sum(w) / len(w) for w in windows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/optimizer_study"))
    parser.add_argument("--lanes", type=int, default=1, help="runs at once (default one)")
    parser.add_argument("--cores_per_run", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="only the tables and the plots")
    parser.add_argument("--time_steps", action="store_true",
                        help="with --report: time the steps again first")
    args = parser.parse_args()
    out = args.out.resolve()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if not args.report:
        from jaxgpt2.data import resolve_dataset_dir
        resolve_dataset_dir("shakespeare_char", str(ROOT / "data"))  # once, before the lanes race
        for phase in range(3):
            phases = plan(out)
            if phase < len(phases):
                train_all(out, phases[phase], args.lanes, args.cores_per_run)
        time_steps(out)
    elif args.time_steps:
        time_steps(out)
    report(out)


if __name__ == "__main__":
    main()
