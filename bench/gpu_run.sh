#!/usr/bin/env bash
# The one prepared device check: GPU tests, then the kernel and model benchmarks, within ~5 minutes
# on an H100. Results go to $OUT (default bench/results/gpu) and are also packed into results.tgz.
# Needs a CUDA machine with torch and triton installed; runs from the repository root.
set -u
OUT=${OUT:-bench/results/gpu}
WORK=$(mktemp -d)
mkdir -p "$OUT"
export TRITON_INTERPRET=0 PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} | tee "$WORK/gpu_env.txt"
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider -k "not 2_31" \
  tests/test_decomposed_conv_bn.py tests/test_decomposed_conv.py tests/test_siglip.py 2>&1 \
  | tail -15 | tee "$WORK/gpu_tests.txt"
timeout 100 python3 -m bench.bench_conv --quick --out "$WORK" > "$WORK/bench_conv.log" 2>&1
timeout 45 python3 -m bench.bench_siglip --quick --budget-s 30 --out "$WORK" > "$WORK/bench_siglip.log" 2>&1
timeout 70 python3 -m bench.run_all --gpu --budget-s 50 --no-progress --out "$WORK" > "$WORK/bench_models.log" 2>&1
tar czf "$OUT/results.tgz" -C "$WORK" .
for f in "$WORK"/*.md; do echo "== $f"; cat "$f"; done | cut -c1-220 | tail -c 9000
