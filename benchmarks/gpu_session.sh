#!/usr/bin/env bash
# One GPU machine, one prepared run: the CUDA checks, pirate throughput, the smoke test's
# paper files on the GPU, and the grids named in GRIDS with concurrent workers, stopped after
# LIMIT seconds and packed into one archive, OUT_DIR/session.tgz (logs and results; no
# images or checkpoints), so a short lease still brings back whole columns.
#
#   benchmarks/gpu_session.sh [OUT_DIR]          # default runs/gpu_session
#
# Environment: LIMIT (seconds, default 470), GRIDS (default "standard"; also "ablation" and
# "quick"), W_STANDARD / W_ABLATION / W_QUICK (workers per grid, default 12 / 6 / 5),
# RAEG_DATA_DIR and RAEG_CACHE_DIR as for every run; DATA_TGZ: a .tgz of a data root (holding
# cifar10/), unpacked into RAEG_DATA_DIR first when that folder does not exist (a machine that
# can take no more than a few tens of MB along: CIFAR-10's JPEG folder packs to about 20 MB).
# Grids resume: run it again on the same machine to continue them; on a fresh machine, RECORDS
# (folders of kept records, e.g. "docs/tables/quick_ablation/records") resumes them from what
# earlier runs kept. The archive holds OUT_DIR/records: every finished result kept as by
# `raeg table --keep-records` (commit them beside the tables).
set -u
T0=$(date +%s)
LIMIT=${LIMIT:-470}
OUT=${1:-runs/gpu_session}
GRIDS=${GRIDS:-standard}
LOGS="$OUT/logs"
mkdir -p "$LOGS"
el() { echo $(( $(date +%s) - T0 )); }
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 WANDB_MODE=${WANDB_MODE:-disabled}
PY=${PYTHON:-python3}
if [ -n "${DATA_TGZ:-}" ] && [ ! -d "${RAEG_DATA_DIR:?set RAEG_DATA_DIR}" ]; then
  mkdir -p "$RAEG_DATA_DIR" && tar xzf "$DATA_TGZ" -C "$RAEG_DATA_DIR" || exit 3
fi

{ git log -1 --format='%H %s' 2>/dev/null; echo "dirty files: $(git status --porcelain 2>/dev/null | wc -l)"
  nvidia-smi -L 2>/dev/null
  $PY -c "import torch, lightning, timm, kornia; print(torch.__version__, lightning.__version__, timm.__version__, kornia.__version__)"
} > "$LOGS/env.txt" 2>&1
cat "$LOGS/env.txt"

timeout 60 $PY benchmarks/cuda_check.py --out "$LOGS/cuda_check.json" > "$LOGS/cuda_check.log" 2>&1
echo "cuda_check rc=$? at $(el) s"; tail -3 "$LOGS/cuda_check.log"
timeout 90 $PY benchmarks/bench_pirate.py --device cuda --rounds 1 --profile-steps 0 --steps 40 \
  --arch resnet_air_small_cifar --batch-size 512 --workers 4 --out "$LOGS/bench_pirate.json" \
  > "$LOGS/bench_pirate.log" 2>&1
echo "bench_pirate rc=$? at $(el) s"; grep -E "img/s|/plain|/fast" "$LOGS/bench_pirate.log"

declare -A CONFIG=([standard]=experiments/main/standard.yaml
                   [ablation]=experiments/ablation/quick.yaml
                   [quick]=experiments/main/quick.yaml)
declare -A WORKERS=([standard]=${W_STANDARD:-12} [ablation]=${W_ABLATION:-6} [quick]=${W_QUICK:-5})
declare -A EXTRA=([standard]="surrogates.0.data.on_device=true" [ablation]="" [quick]="")
PIDS=()
for g in $GRIDS; do
  # shellcheck disable=SC2086
  $PY -m raeg_pl.cli grid --config "${CONFIG[$g]}" --workers "${WORKERS[$g]}" \
    ${RECORDS:+--records $RECORDS} trainer.accelerator=gpu ${EXTRA[$g]} > "$LOGS/grid_$g.log" 2>&1 &
  PIDS+=($!)
done
(RAEG_SMOKE_ACCELERATOR=gpu timeout 270 $PY -m pytest -q -p no:cacheprovider \
   tests/configs/test_smoke.py -k paper > "$LOGS/smoke_gpu.log" 2>&1
 echo "smoke rc=$? at $(el) s" >> "$LOGS/smoke_gpu.log") &

running() { for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
while [ "$(el)" -lt "$LIMIT" ] && running; do sleep 5; done
echo "stopped at $(el) s"
pkill -f "raeg_pl.cli grid"; pkill -f "tests/configs/test_smoke.py"; sleep 3
pkill -9 -f "raeg_pl.cli grid"; pkill -9 -f "tests/configs/test_smoke.py"
for d in runs/tables/standard runs/tables/quick_ablation runs/tables/quick; do
  [ -d "$d" ] && $PY -m raeg_pl.cli table --runs "$d" --out "$OUT/tables/$(basename "$d")" \
    --allow-mixed --keep-records "$OUT/records" >> "$LOGS/records.log" 2>&1
done
tar czf "$OUT/session.tgz" --exclude='*.png' --exclude='*.jpg' --exclude='*.ckpt' \
  --exclude='*.pt' --exclude='*.npy' "$LOGS" "$OUT/records" "$OUT/tables" runs/tables/standard runs/tables/quick_ablation \
  runs/tables/quick 2>/dev/null
tail -n 3 "$LOGS"/grid_*.log "$LOGS/smoke_gpu.log"
echo "stage results: $(find runs/tables -name results.json 2>/dev/null | wc -l); packed in $OUT/session.tgz"
