#!/usr/bin/env bash
# One device call: unpack the FER+ pack, train the teachers side by side on the GPU with
# `fer-batch train` (vote targets only, from scratch), read each on every face (mirror-image
# average) and leave in $OUT: teacher_probs.npz, every run's history.jsonl and log.
#
#   device run:  bash examples/ferplus/device/teacher.sh      (carry: [".devdata"], timeout_s 570)
#   smoke here:  SMOKE=1 DEV=cpu OUT=/tmp/t PACK=/tmp/small.npz bash examples/ferplus/device/teacher.sh
#
# MIN is each teacher's time budget in minutes: `--time-budget` re-plans the cosine schedule
# when the measured pace would overrun it, so every run ends with a finished schedule.
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=${OUT:?set OUT to the folder for the results}
PY=${PY:-python3}
DEV=${DEV:-cuda}
MIN=${MIN:-5.5}
PACK=${PACK:-.devdata/ferplus_dev.npz}
WORK=${WORK:-/tmp/fer_teachers}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
[ "$DEV" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' | tee -a "$OUT/gpu.txt"
"$PY" examples/ferplus/device/pack.py unpack --pack "$PACK" --out "$WORK/fp.parquet"

fb() { "$PY" -c 'import sys; sys.argv[0] = "fer-batch"; from fer_batch.cli import main; main()' "$@"; }
common=(--where fer_usage=Training --val "$WORK/fp.parquet" --val-where fer_usage=PublicTest --size 48 --crop 40
        --device "$DEV" --label-smoothing 0.05 --class-balance sqrt --patience 1000 --time-budget "$MIN" --threads 4)
if [ "${SMOKE:-0}" = 1 ]; then  # a tiny run of the same path, for a CPU check of the script
  teachers=("smoke_resnet --arch resnet --widths 8,8,8,8 --blocks 1,1,1,1 --epochs 2 --max-steps-per-epoch 2 --batch-size 16"
            "smoke_vgg --arch vgg --widths 8,8,8,8 --depth 1 --epochs 1 --max-steps-per-epoch 2 --batch-size 16")
  common+=(--threads 1)
else
  teachers=("resnet18_s0 --arch resnet --widths 64,128,256,512 --blocks 2,2,2,2 --epochs 60 --batch-size 128 --lr 0.1 --seed 0"
            "vgg13w64_s0 --arch vgg --widths 64,128,256,512 --depth 3 --epochs 60 --batch-size 128 --lr 0.05 --seed 0"
            "resnet18_s1 --arch resnet --widths 64,128,256,512 --blocks 2,2,2,2 --epochs 60 --batch-size 128 --lr 0.1 --seed 1 --mixup 0.3")
fi
pids=()
for t in "${teachers[@]}"; do
  set -- $t
  name=$1; shift
  fb train "$WORK/fp.parquet" --out "$WORK/$name" "${common[@]}" "$@" >"$OUT/$name.log" 2>&1 &
  pids+=($!)
done
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done
for t in "${teachers[@]}"; do
  name=${t%% *}
  cp "$WORK/$name/history.jsonl" "$OUT/$name.history.jsonl" 2>/dev/null || true
  tail -n 3 "$OUT/$name.log"
done
[ "$fail" = 0 ] || { echo "a teacher run failed: see its log in $OUT"; exit 1; }
"$PY" examples/ferplus/device/teacher_probs.py "$WORK"/*/best.pt --data "$WORK/fp.parquet" --out "$OUT/teacher_probs.npz" --device "$DEV"
