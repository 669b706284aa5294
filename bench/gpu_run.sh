#!/usr/bin/env bash
# One prepared device check: GPU tests, then the kernel benchmarks; results under $OUT (or bench/results).
# Usage on a CUDA machine that already has torch + triton:  bash bench/gpu_run.sh [tune]
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export TRITON_INTERPRET=0 PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu_env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu_env.txt"
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider ${GPU_TESTS:-tests} 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
if [ "${1:-}" = "tune" ]; then
  timeout 200 python3 -m bench.tune_conv --out "$OUT" 2>&1 | grep -v Warning | tail -12
fi
timeout 240 python3 -m bench.bench_conv --out "$OUT" --quick 2>&1 | tail -40
