#!/usr/bin/env bash
# One device call: jaxgpt2 against nanoGPT with the fused kernels on and off (biases on),
# the step's profile, then both programs without biases at batch 32, in priority order, each piece
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
piece compare_no_bias 150 python bench.py --preset gpt2 --tokens random --variants loop --no-bias --batch_size 32 --compare_nanogpt third_party/nanoGPT
# Not in the same call (each fits a call of its own): python tests/gpu_kernels.py (about
# 200 s) and python docs/kernel_bench.py [--tune].
for f in compare_bias profile compare_no_bias; do echo "== $f"; grep -v "WARNING" "$OUT/$f.log" | tail -n 40; done
