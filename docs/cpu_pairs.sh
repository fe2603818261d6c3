#!/bin/bash
# README's main command against nanoGPT's CPU recipe on this machine, in alternating pairs
# (ours, then nanoGPT, one seed each), so drift of a shared machine hits both alike: wall
# time and step-2000 validation loss of every run, one line each, in $OUT/summary.txt.
#
# nanoGPT setup (a git-ignored clone; its code is never committed here), as in
# docs/seed_study.sh. Run from the repository root:
#   OUT=/tmp/pairs [PY=python] [NANO_PY=python] bash docs/cpu_pairs.sh 1337 1 2 3 4 5 6 7
# Seed S runs ours with train.seed=S and nanoGPT with seed offset S (seed 1337 + S).
set -u
OUT=${OUT:-/tmp/cpu_pairs}; mkdir -p "$OUT"
ROOT=$PWD
for s in "$@"; do
  rm -rf "$OUT/ours$s" "$OUT/nano$s"
  start=$(date +%s.%N)
  ${PY:-python} train.py --config configs/shakespeare_char_cpu.yaml train.seed=$s \
    train.out_dir="$OUT/ours$s" > "$OUT/ours_$s.log" 2>&1
  wall=$(echo "$(date +%s.%N) - $start" | bc)
  v=$(${PY:-python} -c "import json,sys; print([r['val_loss'] for r in map(json.loads, open(sys.argv[1]))
                  if r.get('step') == 2000 and 'val_loss' in r][0])" "$OUT/ours$s/metrics.jsonl")
  echo "ours seed=$s val2000=$v wall=${wall}s" >> "$OUT/summary.txt"
  o=$(( s == 1337 ? 0 : s ))
  start=$(date +%s.%N)
  (cd "$ROOT/third_party/nanoGPT" && NANO_SEED_OFFSET=$o ${NANO_PY:-python} train_seeded.py \
    config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 \
    --log_interval=50 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 \
    --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0 --out_dir="$OUT/nano$s" \
    --always_save_checkpoint=False) > "$OUT/nano_$s.log" 2>&1
  wall=$(echo "$(date +%s.%N) - $start" | bc)
  v=$(grep 'step 2000:' "$OUT/nano_$s.log" | sed 's/.*val loss //')
  echo "nano seed=$((1337 + o)) val2000=$v wall=${wall}s" >> "$OUT/summary.txt"
done
cat "$OUT/summary.txt"
