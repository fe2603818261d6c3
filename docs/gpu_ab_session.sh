#!/usr/bin/env bash
# One device call: the GPT-2 124M step of several source trees in interleaved rounds
# (each tree's bench in its own process), then the GELU's numerics and the training
# check of the last tree. Trees are `git archive` copies under third_party/trees/<name>
# (docs/make_ab_trees.sh makes them), carried; a tree's optional `xla_flags` file holds
# the XLA_FLAGS it runs under.
# Usage on the GPU machine, from the repository root:
#   OUT=/some/dir ROUNDS=2 [CHECK=0] [KERNELS=1] bash docs/gpu_ab_session.sh main fold ln2 both
set -u
export XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ "${KERNELS:-0}" = 1 ]; then  # each tree's kernels alone first (docs/kernel_bench.py)
  for tree in "$@"; do
    echo "== kernels $tree"
    (cd "third_party/trees/$tree" && PYTHONPATH=$PWD timeout 120 python docs/kernel_bench.py) \
      > "$OUT/$tree.kernels.log" 2>&1
    grep -E "\| kernel \|" "$OUT/$tree.kernels.log" || tail -n 3 "$OUT/$tree.kernels.log"
  done
fi
step="python bench.py --preset gpt2 --tokens random --bias --batch_size 32 --repeats 2 --variants loop"
for round in $(seq "${ROUNDS:-2}"); do
  for tree in "$@"; do
    echo "== round $round $tree"
    flags=$(cat "third_party/trees/$tree/xla_flags" 2>/dev/null)
    (cd "third_party/trees/$tree" && XLA_FLAGS="$flags" PYTHONPATH=$PWD timeout 90 $step) \
      > "$OUT/$tree.$round.log" 2>&1
    grep -E "^loop " "$OUT/$tree.$round.log" || tail -n 3 "$OUT/$tree.$round.log"
  done
done
[ "${CHECK:-1}" = 1 ] || exit 0
last="${!#}"
echo "== training check, $last"
(cd "third_party/trees/$last" && PYTHONPATH=$PWD timeout 150 python -c \
  "import sys; sys.path.insert(0, 'tests'); import gpu_kernels as g; print(g.check_bias_gelu(32768, 3072), g.compare_training())") \
  2>&1 | grep -v WARNING | tail -n 8
