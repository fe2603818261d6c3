#!/usr/bin/env bash
# One device call: jaxgpt2 against nanoGPT with the fused kernels on and off, the step's
# profile, the kernels' GPU checks and their speed alone, in priority order, each piece
# under its own time limit so a slow one cannot take the others' logs.
# Usage (on the GPU machine, from the repository root, nanoGPT cloned in third_party):
#   OUT=/some/dir bash docs/gpu_kernels_session.sh
set -u
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD
piece() { local name=$1 limit=$2; shift 2; echo "== $name"; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "   rc $? in $((SECONDS - t0)) s"; }
piece compare_bias 330 python bench.py --preset gpt2 --tokens random --variants loop,loop_xla_kernels --bias --batch_size 32,64 --compare_nanogpt third_party/nanoGPT
piece profile 45 python docs/gpu_step_profile.py --bias --kernels pallas --out "$OUT/trace"
rm -rf "$OUT/trace"
piece gpu_kernels 240 python tests/gpu_kernels.py
piece kernel_bench 40 python docs/kernel_bench.py
for f in compare_bias profile gpu_kernels kernel_bench; do echo "== $f"; grep -v "WARNING" "$OUT/$f.log" | tail -n 40; done
