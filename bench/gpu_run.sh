#!/usr/bin/env bash
# Device checks on a CUDA machine that already has torch + triton, from the repository root:
#   bash bench/gpu_run.sh tests    # GPU-marked tests of the fused ops            (~2-3 min, mostly compiles)
#   bash bench/gpu_run.sh conv     # bench_conv --quick: kernel vs PyTorch convs   (~2 min)
#   bash bench/gpu_run.sh siglip   # bench_siglip --quick                          (~1 min)
#   bash bench/gpu_run.sh models   # model suite, --budget-s 80                    (~1.5 min)
#   bash bench/gpu_run.sh tune     # tune_conv: time the SASS model's candidate tiles (~3-5 min, compiles)
# One stage per call: on 2026-11-27 all four in one 340 s call overran and returned nothing
# (bench/results/gpu_runs.md). Results go to $OUT (default bench/results/gpu).
set -u
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export TRITON_INTERPRET=0 PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} | tee "$OUT/gpu_env.txt"
case "${1:-}" in
  tests) python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.txt" | tail -30 ;;
  conv) python3 -m bench.bench_conv --quick --out "$OUT" ;;
  siglip) python3 -m bench.bench_siglip --quick --out "$OUT" ;;
  models) python3 -m bench.run_all --gpu --budget-s 80 --no-progress --out "$OUT" ;;
  tune) python3 -m bench.tune_conv --out "$OUT" ;;
  *) echo "usage: bash bench/gpu_run.sh tests|conv|siglip|models|tune" >&2; exit 2 ;;
esac
