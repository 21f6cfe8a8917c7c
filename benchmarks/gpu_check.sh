#!/usr/bin/env bash
# GPU readiness check (issue 16): folds and Stage 2 jobs with AMP on the device, AXIS at 1 and 20
# sources against aTLAS at 1, 5 and 20, one table (benchmarks/gpu_check.py says what is measured).
#
#   bash benchmarks/gpu_check.sh                                  # a GPU machine: ViT-B-32, CUDA, AMP
#   bash benchmarks/gpu_check.sh --device cpu --tiny --out DIR    # the same code, tiny CLIP, CPU (CI)
#
# Any argument goes on to gpu_check.py (--device, --tiny, --batch, --steps, --out).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
python - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"GPU: {torch.cuda.get_device_name()}, bf16 supported: {torch.cuda.is_bf16_supported()}")
PY
exec python benchmarks/gpu_check.py "$@"
