"""Devices, the mesh, and where every array lives.

One mesh with axes ``data`` and ``fsdp`` covers every case from one CPU to many hosts:
batches are split over both axes; parameters and optimizer state are split over
``fsdp`` along their largest dimension that divides evenly (replicated otherwise). The
step is jitted with these shardings (no ``pmap``: sharded ``jit`` is JAX's replacement).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxgpt2.config import ConfigError, MeshConfig

BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed(coordinator: str = "", num_processes: int = 0,
                                 process_id: int = -1) -> None:
    """Join a multi-host run when the environment describes one (explicit arguments,
    JAX's ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``, or a
    cluster JAX detects itself, such as SLURM); do nothing for a single process, or when
    already joined (a second Trainer in the same process).

    On CPU, cross-process collectives go through gloo, JAX's default since 0.5.1
    (``JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi`` picks MPI instead); nothing to set here.
    """
    if jax.distributed.is_initialized():
        return
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num_processes = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
    if process_id < 0:
        process_id = int(os.environ.get("JAX_PROCESS_ID", "-1"))
    if coordinator and num_processes > 1:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()


def select_devices(kind: str) -> list[jax.Device]:
    """``auto``: JAX's default backend (GPU/TPU when present, else CPU); or a named one."""
    if kind == "auto":
        return jax.devices()
    try:
        return jax.devices(kind)
    except RuntimeError as err:
        raise ConfigError(f"train.device={kind!r} but JAX sees no {kind} ({err}); "
                          "use train.device=auto") from None


def make_mesh(config: MeshConfig, devices: list[jax.Device]) -> Mesh:
    n = len(devices)
    data, fsdp = config.data, config.fsdp
    if data == -1 and fsdp == -1:
        raise ConfigError("only one of mesh.data and mesh.fsdp may be -1")
    if data == -1:
        data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
    if fsdp == -1:
        fsdp = n // data if data > 0 and n % data == 0 else 0
    if data * fsdp != n or data <= 0 or fsdp <= 0:
        raise ConfigError(f"mesh.data={config.data} x mesh.fsdp={config.fsdp} does not cover "
                          f"the {n} devices; make their product {n} (or use -1 for one)")
    return Mesh(np.asarray(devices).reshape(data, fsdp), ("data", "fsdp"))


def leaf_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
    """Shard the largest dimension divisible by the fsdp axis; replicate the rest."""
    if fsdp_size > 1:
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % fsdp_size == 0 and shape[dim] >= fsdp_size:
                spec = [None] * len(shape)
                spec[dim] = "fsdp"
                return P(*spec)
    return P()


def state_shardings(tree: Any, mesh: Mesh) -> Any:
    """A NamedSharding for every leaf of params, optimizer state or a whole train state."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(tuple(x.shape), fsdp)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are (grad_accum, batch, T): rows split over every device."""
    return NamedSharding(mesh, P(None, BATCH_AXES, None))


def check_batch_divides(batch_size: int, mesh: Mesh) -> None:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % n:
        raise ConfigError(f"data.batch_size={batch_size} cannot be split evenly across {n} "
                          f"devices; use a multiple of {n}")
    if batch_size % jax.process_count():
        raise ConfigError(f"data.batch_size={batch_size} must divide across "
                          f"{jax.process_count()} processes")


def process_rows(batch_size: int) -> tuple[int, int]:
    """The rows of each global micro-batch this process loads."""
    per_process = batch_size // jax.process_count()
    start = jax.process_index() * per_process
    return start, start + per_process


def to_host(tree: Any) -> Any:
    """Whole numpy copies of (possibly sharded, possibly multi-host) arrays, on every
    process; ``jax.device_get`` fails on arrays with shards in other processes."""
    return multihost_utils.process_allgather(tree, tiled=True)


def place_batch(batch: dict[str, np.ndarray], sharding: NamedSharding,
                global_batch_size: int) -> dict[str, jax.Array]:
    """Assemble global arrays from each process' rows."""
    def place(x: np.ndarray) -> jax.Array:
        shape = (x.shape[0], global_batch_size, *x.shape[2:])
        return jax.make_array_from_process_local_data(sharding, x, shape)
    return {k: place(v) for k, v in batch.items()}
