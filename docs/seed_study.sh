#!/bin/bash
# The baby-GPT recipe over seeds, ours against nanoGPT, on one many-core machine: eight
# lanes of two cores each (taskset), four lanes per program, each running its seeds in turn.
# One summary line per finished run goes to $OUT/logs/summary.txt.
#
# nanoGPT setup (a git-ignored clone; its code is never committed here):
#   git clone https://github.com/karpathy/nanoGPT third_party/nanoGPT
#   (cd third_party/nanoGPT && python data/shakespeare_char/prepare.py)
#   sed 's/^    seed_offset = 0$/    seed_offset = int(os.environ.get("NANO_SEED_OFFSET", "0"))/' \
#       third_party/nanoGPT/train.py > third_party/nanoGPT/train_seeded.py
# Run from the repository root: OUT=/tmp/study bash docs/seed_study.sh
set -u
LOGS=${OUT:-/tmp/seed_study}/logs; mkdir -p "$LOGS"
export JAX_PLATFORMS=cpu PYTHONPATH=$PWD
ROOT=$PWD
# Prepare the bundled data once, so the lanes do not race to write it.
python train.py --config configs/shakespeare_char_cpu.yaml train.device=cpu train.max_steps=1 \
    train.sample_tokens=0 train.out_dir=/tmp/seed_study_warm > "$LOGS/warm.log" 2>&1

ours_lane() { cores=$1; shift; for s in "$@"; do
  start=$(date +%s)
  taskset -c "$cores" python train.py --config configs/shakespeare_char_cpu.yaml train.seed=$s \
    train.device=cpu train.out_dir=/tmp/seed_study_runs/ours$s > "$LOGS/ours_$s.log" 2>&1
  v=$(python -c "import json,sys; print([r['val_loss'] for r in map(json.loads, open(sys.argv[1]))
                  if r.get('step') == 2000 and 'val_loss' in r][0])" /tmp/seed_study_runs/ours$s/metrics.jsonl)
  echo "ours seed=$s val2000=$v wall=$(( $(date +%s) - start ))s" >> "$LOGS/summary.txt"
done; }

nano_lane() { cores=$1; shift; for o in "$@"; do
  start=$(date +%s)
  (cd "$ROOT/third_party/nanoGPT" && OMP_NUM_THREADS=2 NANO_SEED_OFFSET=$o taskset -c "$cores" \
    python train_seeded.py config/train_shakespeare_char.py --device=cpu --compile=False \
    --eval_iters=20 --log_interval=50 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 \
    --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0 --out_dir=/tmp/nano$o \
    --always_save_checkpoint=False) > "$LOGS/nano_$o.log" 2>&1
  v=$(grep 'step 2000:' "$LOGS/nano_$o.log" | sed 's/.*val loss //')
  echo "nano seed=$((1337 + o)) val2000=$v wall=$(( $(date +%s) - start ))s" >> "$LOGS/summary.txt"
done; }

ours_lane 0,1 1337 5 6 &
ours_lane 2,3 7 8 9 &
ours_lane 4,5 10 11 12 &
ours_lane 6,7 13 14 15 &
nano_lane 8,9 4 5 6 &
nano_lane 10,11 7 8 9 &
nano_lane 12,13 10 11 12 &
nano_lane 14,15 13 14 15 &
wait
sort "$LOGS/summary.txt"
