"""Train in a fresh process on fake CPU devices; print what happened as one JSON line.

    python tests/sharding_worker.py DEVICES 'RUNS_JSON'

``DEVICES`` is how many CPU devices this process gets (fixed before JAX is imported,
which is why this is a separate process: pytest's own JAX already has one device).
``RUNS_JSON`` is a list of ``{"name": ..., "overrides": [...]}``; each is trained with
``configs/tiny.yaml`` in turn, one start-up amortised over all of them. Multi-process
runs take their coordinator from ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/
``JAX_PROCESS_ID``, exactly as ``train.py`` would. The last stdout line is
``RESULT {...}`` with this process's view: every run's per-step losses, the rows it
loaded, and the placement of a few arrays.
"""

import json
import os
import re
import sys

from runs import ROOT, TINY  # tests/runs.py (this script's folder): no JAX imported

# Leaves whose placement the tests inspect: a matmul kernel, its Adam moment, the embedding.
WATCHED = {
    "kernel": lambda s: s.params["h"]["mlp"]["c_fc"]["kernel"],
    "kernel_mu": lambda s: adam_moment(s.opt_state, "h/mlp/c_fc/kernel"),
    "wte": lambda s: s.params["wte"]["embedding"],
}


def adam_moment(opt_state, param_path: str):
    import jax
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        names = [str(getattr(k, "name", getattr(k, "key", k))) for k in path]
        if "mu" in names and "/".join(names).endswith(param_path):
            return leaf
    raise KeyError(param_path)


def placement(x) -> dict:
    shard = x.addressable_shards[0]
    return {"spec": [a if a is None or isinstance(a, str) else list(a)
                     for a in x.sharding.spec],
            "shape": list(x.shape), "shard_shape": list(shard.data.shape)}


def train(spec: dict) -> dict:
    """One run, recording the loss of every step as this process sees it."""
    from jaxgpt2.config import load_config
    from jaxgpt2.trainer import Trainer

    config = load_config(TINY, spec["overrides"])
    trainer = Trainer(config)
    start = int(trainer.state.step)
    losses = []
    step_fn = trainer.train_step

    def recording_step(state, batch):  # every process records the loss it computed
        state, metrics = step_fn(state, batch)
        losses.append(metrics["loss"])
        return state, metrics

    trainer.train_step = recording_step
    summary = trainer.run()
    sample = trainer.sample() if config.train.sample_tokens else None  # as train.py ends
    rows = trainer.train_source.rows  # the rows of each global batch this process loads
    return {"name": spec["name"], "start_step": start, "losses": [float(l) for l in losses],
            "val_loss": summary.get("val_loss"), "sample": sample,
            "mesh": dict(trainer.mesh.shape), "rows": [rows.start, rows.stop],
            "placement": {k: placement(get(trainer.state)) for k, get in WATCHED.items()}}


def main() -> None:
    devices, runs = int(sys.argv[1]), json.loads(sys.argv[2])
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(ROOT))
    results = [train(spec) for spec in runs]  # the first Trainer joins the distributed run

    import jax
    print("RESULT " + json.dumps({"process_index": jax.process_index(),
                                  "process_count": jax.process_count(),
                                  "device_count": jax.device_count(),
                                  "local_device_count": jax.local_device_count(),
                                  "runs": results}), flush=True)


if __name__ == "__main__":
    main()
