#!/usr/bin/env bash
# One GPU machine, one prepared run: the CUDA checks, pirate throughput, the smoke test's
# paper files on the GPU, then the standard main grid, the quick ablation grid and the quick
# main grid with concurrent workers, stopped after LIMIT seconds and packed (results, logs,
# tables; no images or checkpoints), so a short lease still brings back whole columns.
#
#   benchmarks/gpu_session.sh [OUT_DIR]          # default runs/gpu_session
#
# Environment: LIMIT (seconds, default 540), W_STANDARD / W_ABLATION / W_QUICK (workers per
# grid, default 12 / 6 / 5), GRIDS (default "standard ablation quick"), RAEG_DATA_DIR and
# RAEG_CACHE_DIR as for every run. Grids resume: run it again to continue them.
set -u
T0=$(date +%s)
LIMIT=${LIMIT:-540}
OUT=${1:-runs/gpu_session}
GRIDS=${GRIDS:-standard ablation quick}
mkdir -p "$OUT"
el() { echo $(( $(date +%s) - T0 )); }
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 WANDB_MODE=${WANDB_MODE:-disabled}
PY=${PYTHON:-python3}

{ git log -1 --format='%H %s' 2>/dev/null; echo "dirty files: $(git status --porcelain 2>/dev/null | wc -l)"
  nvidia-smi -L 2>/dev/null
  $PY -c "import torch, lightning, timm; print(torch.__version__, lightning.__version__, timm.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

timeout 60 $PY benchmarks/cuda_check.py --out "$OUT/cuda_check.json" > "$OUT/cuda_check.log" 2>&1
echo "cuda_check rc=$? at $(el) s"
timeout 70 $PY benchmarks/bench_pirate.py --device cuda --rounds 1 --profile-steps 0 --steps 40 \
  --arch resnet_air_small_cifar --batch-size 512 --workers 4 --out "$OUT/bench_pirate.json" \
  > "$OUT/bench_pirate.log" 2>&1
echo "bench_pirate rc=$? at $(el) s"

declare -A CONFIG=([standard]=experiments/main/standard.yaml
                   [ablation]=experiments/ablation/quick.yaml
                   [quick]=experiments/main/quick.yaml)
declare -A WORKERS=([standard]=${W_STANDARD:-12} [ablation]=${W_ABLATION:-6} [quick]=${W_QUICK:-5})
declare -A EXTRA=([standard]="surrogates.0.data.on_device=true" [ablation]="" [quick]="")
PIDS=()
for g in $GRIDS; do
  # shellcheck disable=SC2086
  $PY -m raeg_pl.cli grid --config "${CONFIG[$g]}" --workers "${WORKERS[$g]}" \
    trainer.accelerator=gpu ${EXTRA[$g]} > "$OUT/grid_$g.log" 2>&1 &
  PIDS+=($!)
done
(RAEG_SMOKE_ACCELERATOR=gpu timeout 240 $PY -m pytest -q -p no:cacheprovider \
   tests/configs/test_smoke.py -k paper > "$OUT/smoke_gpu.log" 2>&1
 echo "smoke rc=$? at $(el) s" >> "$OUT/smoke_gpu.log") &

running() { for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
while [ "$(el)" -lt "$LIMIT" ] && running; do sleep 5; done
echo "stopped at $(el) s"
pkill -f "raeg_pl.cli grid"; pkill -f "tests/configs/test_smoke.py"; sleep 3
pkill -9 -f "raeg_pl.cli grid"; pkill -9 -f "tests/configs/test_smoke.py"
for dir in runs/tables/standard runs/tables/quick_ablation runs/tables/quick; do
  [ -d "$dir" ] && tar czf "$OUT/$(basename "$dir").tgz" --exclude='*.png' --exclude='*.ckpt' \
    --exclude='*.pt' --exclude='*.npy' "$dir"
done
echo "results: $(find runs/tables -name results.json 2>/dev/null | wc -l) stage results; packed in $OUT"
