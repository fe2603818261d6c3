#!/usr/bin/env bash
# One device call: the fused kernels' GPU checks, then their speed, in priority order,
# each piece under its own time limit so a slow one cannot take the others' logs.
# Usage (on the GPU machine, from the repository root): OUT=/some/dir bash docs/gpu_kernels_session.sh
set -u
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD
piece() { local name=$1 limit=$2; shift 2; echo "== $name"; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "   rc $? in $((SECONDS - t0)) s"; }
piece gpu_kernels 150 python tests/gpu_kernels.py
piece bench_bias 170 python bench.py --preset gpt2 --tokens random --variants loop,loop_xla_kernels --bias --batch_size 32 --repeats 2
piece profile 80 python docs/gpu_step_profile.py --bias --kernels pallas --out "$OUT/trace"
rm -rf "$OUT/trace"
piece kernel_bench 150 python docs/kernel_bench.py --tune
for f in gpu_kernels bench_bias profile kernel_bench; do echo "== $f"; grep -v "^step\|WARNING" "$OUT/$f.log" | tail -n 45; done
