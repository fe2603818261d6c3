"""Every device, every host: data, fsdp and mixed meshes, accumulation, resharded
resumes and two processes all reproduce the losses of one device.

Each scenario runs in fresh processes (``tests/sharding_worker.py``) with a fixed number
of fake CPU devices, because this process's JAX was started with one. The trainings are
shared by module-scoped fixtures, one process start per group, and the tests compare them.
Float32 sums in another order differ in the last bits, hence a relative tolerance.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxgpt2.prepare import ensure_bundled
from runs import ROOT, tiny_overrides

WORKER = Path(__file__).with_name("sharding_worker.py")
STEPS, SAVED = 20, 10
RTOL = 1e-5


# -- running the worker --------------------------------------------------------------------
def spec(base: Path, name: str, *extra: str) -> dict:
    return {"name": name, "overrides": tiny_overrides(
        base, name, "train.sample_tokens=0", "train.eval_steps=1", "train.log_interval=1",
        f"train.max_steps={STEPS}", f"train.eval_interval={STEPS}",
        f"train.save_interval={STEPS}", *extra)}


def worker_env(base: Path, **extra: str) -> dict:
    """A clean environment sharing one compilation cache: every Trainer jits fresh
    closures, so identical programs (a run and its resumes, orbax's slicing) would
    otherwise compile again in every run and every process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_"))}
    return {**env, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(base / "jax_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1", **extra}


def parse(out: str) -> dict:
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    assert lines, f"worker printed no result:\n{out[-4000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    result["runs"] = {r["name"]: r for r in result["runs"]}
    return result


def run_worker(base: Path, devices: int, runs: list[dict]) -> dict:
    proc = subprocess.run([sys.executable, str(WORKER), str(devices), json.dumps(runs)],
                          cwd=ROOT, env=worker_env(base), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return parse(proc.stdout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(base: Path, count: int, devices_each: int, runs: list[dict]) -> list[dict]:
    """``count`` workers joined through jax.distributed on localhost, as on a cluster."""
    address = f"127.0.0.1:{free_port()}"
    logs = [base / f"process_{i}.log" for i in range(count)]
    procs = []
    for i, log in enumerate(logs):
        with open(log, "w") as out:
            procs.append(subprocess.Popen(
                [sys.executable, str(WORKER), str(devices_each), json.dumps(runs)], cwd=ROOT,
                env=worker_env(base, JAX_COORDINATOR_ADDRESS=address,
                               JAX_NUM_PROCESSES=str(count), JAX_PROCESS_ID=str(i)),
                stdout=out, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + 600
    try:  # stop at the first failure: the other processes would wait for it until timeout
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            if any(p.poll() for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outs = [log.read_text() for log in logs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-6000:]
    return [parse(out) for out in outs]


def copy_checkpoint(source_run: Path, step: int, target_run: Path) -> None:
    """Start a fresh run folder holding only ``step`` of another run's checkpoints."""
    shutil.copytree(source_run / "checkpoints" / str(step), target_run / "checkpoints" / str(step))


# -- the trainings, once per module ---------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("sharding")
    ensure_bundled("shakespeare_char", base / "data")  # once, not raced by processes
    return base


@pytest.fixture(scope="module")
def eight(base) -> dict:
    """One process, 8 devices: three meshes, and accumulation against a 4x batch."""
    accum = ["mesh.data=4", "mesh.fsdp=2", "train.max_steps=10", "train.eval_interval=10",
             "train.save_interval=10", "train.eval_steps=0"]
    return run_worker(base, 8, [
        spec(base, "data8"),  # mesh defaults: data=-1 (all), fsdp=1
        spec(base, "data4_fsdp2", "mesh.data=4", "mesh.fsdp=2"),
        spec(base, "fsdp8", "mesh.fsdp=8", f"train.save_interval={SAVED}"),  # data -1 -> 1
        spec(base, "accum4", *accum, "data.batch_size=8", "train.grad_accum=4"),
        spec(base, "batch32", *accum, "data.batch_size=32"),
    ])


@pytest.fixture(scope="module")
def two_processes(base) -> list[dict]:
    """Two processes with 2 devices each, fsdp over all 4: parameters, batches and
    checkpoint shards are all split across the processes."""
    return run_processes(base, 2, 2, [spec(base, "two_processes", "mesh.fsdp=-1", "mesh.data=1",
                                           f"train.save_interval={SAVED}", "train.sample_tokens=8")])


@pytest.fixture(scope="module")
def one(base, eight, two_processes) -> dict:
    """One device: the reference run, and resumes of checkpoints made on 8 devices and
    by two processes."""
    copy_checkpoint(base / "fsdp8", SAVED, base / "fsdp8_on_1")
    copy_checkpoint(base / "two_processes", SAVED, base / "two_processes_on_1")
    return run_worker(base, 1, [
        spec(base, "reference"),
        spec(base, "fsdp8_on_1", f"train.resume_step={SAVED}"),
        spec(base, "two_processes_on_1", f"train.resume_step={SAVED}"),
    ])


@pytest.fixture(scope="module")
def four(base, eight) -> dict:
    copy_checkpoint(base / "fsdp8", SAVED, base / "fsdp8_on_4")
    return run_worker(base, 4, [
        spec(base, "fsdp8_on_4", f"train.resume_step={SAVED}", "mesh.data=2", "mesh.fsdp=2"),
    ])


def assert_split(placement: dict, ways: int) -> None:
    """The array is cut ``ways`` times along one dimension named fsdp (or whole)."""
    shape, shard, axes = placement["shape"], placement["shard_shape"], placement["spec"]
    if ways == 1:
        assert "fsdp" not in axes and shard == shape
        return
    dim = axes.index("fsdp")
    assert shard[dim] * ways == shape[dim]
    assert shard[:dim] + shard[dim + 1:] == shape[:dim] + shape[dim + 1:]


# -- the specifications ---------------------------------------------------------------------
@pytest.mark.parametrize("name, mesh", [("data8", {"data": 8, "fsdp": 1}),
                                        ("data4_fsdp2", {"data": 4, "fsdp": 2}),
                                        ("fsdp8", {"data": 1, "fsdp": 8})])
def test_mesh_of_8_devices_gives_the_losses_of_one_device(eight, one, name, mesh):
    run = eight["runs"][name]
    assert eight["device_count"] == 8 and run["mesh"] == mesh
    reference = one["runs"]["reference"]
    assert len(run["losses"]) == len(reference["losses"]) == STEPS
    np.testing.assert_allclose(run["losses"], reference["losses"], rtol=RTOL, atol=0)
    np.testing.assert_allclose(run["val_loss"], reference["val_loss"], rtol=RTOL, atol=0)


@pytest.mark.parametrize("name, ways", [("data8", 1), ("data4_fsdp2", 2), ("fsdp8", 8)])
def test_params_and_adam_moments_are_split_over_the_fsdp_axis(eight, name, ways):
    placement = eight["runs"][name]["placement"]
    for leaf in ("kernel", "kernel_mu", "wte"):
        assert_split(placement[leaf], ways)
    assert placement["kernel_mu"]["spec"] == placement["kernel"]["spec"]


def test_accumulating_4_micro_batches_of_8_equals_one_batch_of_32_on_8_devices(eight):
    accum, whole = eight["runs"]["accum4"], eight["runs"]["batch32"]
    assert len(accum["losses"]) == 10
    np.testing.assert_allclose(accum["losses"], whole["losses"], rtol=RTOL, atol=0)


@pytest.mark.parametrize("devices", [1, 4])
def test_checkpoint_saved_on_8_devices_continues_on_fewer_with_the_same_losses(
        request, eight, devices):
    group = request.getfixturevalue("one" if devices == 1 else "four")
    resumed = group["runs"][f"fsdp8_on_{devices}"]
    assert resumed["start_step"] == SAVED
    straight = eight["runs"]["fsdp8"]["losses"][SAVED:]
    np.testing.assert_allclose(resumed["losses"], straight, rtol=RTOL, atol=0)
    assert_split(resumed["placement"]["kernel"], 1 if devices == 1 else 2)


def test_two_processes_train_together_and_match_one_process(two_processes, one):
    first, second = two_processes
    assert [r["process_index"] for r in two_processes] == [0, 1]
    assert all(r["process_count"] == 2 and r["device_count"] == 4
               and r["local_device_count"] == 2 for r in two_processes)
    a, b = first["runs"]["two_processes"], second["runs"]["two_processes"]
    assert a["losses"] == b["losses"]  # one replicated value, read by each process
    np.testing.assert_allclose(a["losses"], one["runs"]["reference"]["losses"], rtol=RTOL, atol=0)
    assert_split(a["placement"]["kernel"], 4)
    assert a["rows"] == [0, 4] and b["rows"] == [4, 8]  # each loads only its half


def test_two_processes_sample_the_same_text_from_fsdp_split_params(two_processes):
    first, second = (r["runs"]["two_processes"]["sample"] for r in two_processes)
    assert first and first == second


def test_only_process_0_writes_the_metrics_log(base, two_processes):
    records = [json.loads(l) for l in (base / "two_processes/metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train_loss" in r]
    assert steps == list(range(1, STEPS + 1))
    assert [r["step"] for r in records if "val_loss" in r] == [STEPS]


def test_checkpoint_written_by_two_processes_restores_on_one_device(base, two_processes, one):
    state = base / "two_processes" / "checkpoints" / str(SAVED) / "state"
    assert sorted(p.name for p in state.glob("ocdbt.process_*")) == ["ocdbt.process_0",
                                                                      "ocdbt.process_1"]
    resumed = one["runs"]["two_processes_on_1"]
    straight = two_processes[0]["runs"]["two_processes"]["losses"][SAVED:]
    np.testing.assert_allclose(resumed["losses"], straight, rtol=RTOL, atol=0)
