#!/usr/bin/env bash
# GPU performance sweep (tools/gpu_perf.py): training tokens/s + MFU of the small DiT at L = 1024 bf16
# over micro-batch / engine.compile / fused AdamW / attention backend, and every sampler's NFE/s at
# batch 64; JSON in ${OUT:-gpu_perf_out}/, the table in docs/perf.md. ~8 min on one H200.
#   bash tools/gpu_perf.sh            (extra arguments go to tools/gpu_perf.py, e.g. --budget-s 300)
# Wheels in .whl/ (deepspeed, webdataset) are installed to /tmp/site by gpu_perf.py --wheels, as
# tools/gpu_check.sh does.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_perf_out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 tools/gpu_perf.py --wheels --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_perf.txt"
