#!/usr/bin/env bash
# GPU figures of issue 12, in one run of under ~6 minutes on one H200 with 16 CPU cores (fresh machine).
# Writes everything to $OUT/gpu_results.txt (or ./gpu_results.txt without $OUT). Every step has its own timeout and
# a failing step is reported and skipped, so the file always holds what could be measured.
#   1. ViT-S/16, paper views (1 anchor 224 px masked 0.15 + 10 focal 96 px + target), batch 64, bf16 autocast:
#      images/s, GFLOP/step, MFU against the H200's dense BF16 peak (989 TFLOP/s, NVIDIA's H200 SXM spec without
#      sparsity), peak torch.cuda.max_memory_allocated; msn_hf and the bare timm baseline of the same work.
#   2. The same with --torch_compile (msn_hf).
#   3. Views/s: 16 CPU DataLoader workers drawing the views against the views drawn on the GPU from canvases.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-.}"
RESULTS="$OUT_DIR/gpu_results.txt"
PEAK_TFLOPS=989
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=python3

log() { echo "$@" | tee -a "$RESULTS"; }
step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  log ""; log "=== $name ($(date +%T), limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" > >(tee -a "$RESULTS") 2> "$OUT_DIR/stderr_${name}.txt"
  local rc=$?
  log "--- $name: exit $rc after $((SECONDS - start)) s"
  [ $rc -ne 0 ] && tail -n 20 "$OUT_DIR/stderr_${name}.txt" | tee -a "$RESULTS"
  return 0
}

: > "$RESULTS"
log "msn_hf GPU check, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$RESULTS"
# Dependencies: use what is installed; try pip for what is missing (may fail offline: reported, not fatal).
missing=$($PY - <<'PY'
import importlib.util
print(" ".join(m for m in ("torch", "torchvision", "timm", "transformers", "accelerate", "datasets", "safetensors")
               if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  log "missing: $missing; trying pip"
  timeout 120 $PY -m pip install -q $missing 2>&1 | tail -n 3 | tee -a "$RESULTS"
fi
timeout 60 $PY -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || log "(editable install skipped; using PYTHONPATH=src)"
$PY -c "import torch, timm, transformers, msn_hf; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'timm', timm.__version__, 'transformers', transformers.__version__, 'gpu', torch.cuda.get_device_name(0))" 2>&1 | tee -a "$RESULTS"

COMMON=(--work paper --device cuda --backbone vit_small_patch16_224 --batch_size 64 --precision bf16 --flops
        --peak_tflops $PEAK_TFLOPS --rounds 1 --warmup 3)
step train_step_eager 150 $PY benchmarks/train_step.py "${COMMON[@]}" --impls msn_hf,timm --steps 20
step train_step_compiled 200 $PY benchmarks/train_step.py "${COMMON[@]}" --impls msn_hf --steps 20 --torch_compile
step views 120 $PY benchmarks/views_throughput.py --workers 16 --device cuda --device_workers 16 --batch_size 64 \
  --batches 48
log ""; log "done $(date +%T)"
