"""Sweep the fused conv's tile shapes on a CUDA device (informs ``_tile_config``'s heuristic).

    python -m bench.tune_conv [--out DIR]

For DCFormer's stage shapes (batch 2, bf16) and both memory formats, times the forward and the
backward of the direct kernels for each candidate tile (tensor cores off) and, where the shape
takes them, of the tensor-core kernels; prints the best per case. Writes tune_conv.csv.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from unittest import mock

import torch

import dcformer_kernels.decomposed_conv as dc

from .bench_conv import GPU_SHAPES
from .common import Row, environment, time_fn, write_csv
from .sass_conv import SWEEP

# The same candidates the static SASS model ranks (bench/sass_conv.py); every one is a fresh compile.
CANDIDATES = {fmt: [dc._TileConfig(*t) for t in tiles] for fmt, tiles in SWEEP.items()}
SHAPES = [s for s in GPU_SHAPES if s[-1] in (13, 9)]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tune_conv needs a CUDA device")
    env = environment()
    rows = []
    for c, d, h, w, k in SHAPES:
        for fmt, candidates in CANDIDATES.items():
            x = torch.randn(2, c, d, h, w, device="cuda", dtype=torch.bfloat16)
            if fmt == "cl":
                x = x.contiguous(memory_format=torch.channels_last_3d)
            ws = [torch.randn(c, k, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
            g = torch.randn_like(x)
            copy_ms = time_fn(lambda: torch.clone(x), 10, 40).median_ms
            results = []
            name = f"2x{c}x{d}x{h}x{w} k={k}"
            variants = [(str(cfg), cfg, "never") for cfg in candidates]  # the direct kernel's tiles
            if dc._use_tensor_cores(x, 1):
                variants.append(("tensor cores", None, "auto"))
            for label, cfg, tensor_cores in variants:
                tiles = (lambda *a, cfg=cfg, **kw: cfg) if cfg else dc._tile_config
                with mock.patch.object(dc, "_tile_config", tiles), mock.patch.object(dc, "TENSOR_CORES", tensor_cores):
                    fwd = time_fn(lambda: dc._triton_forward(x, *ws, None, 1), 10, 40).median_ms
                    bwd = time_fn(lambda: dc._triton_backward(g, x, *ws, 1), 10, 40).median_ms
                results.append((fwd, bwd, label))
                for mode, ms in (("forward", fwd), ("backward", bwd)):
                    rows.append(Row("decomposed_conv3d", label, name, "bfloat16", mode, "time", round(ms, 4),
                                    "ms", env=env))
            best_f = min(results, key=lambda r: r[0])
            best_b = min(results, key=lambda r: r[1])
            print(f"C={c} {d}x{h}x{w} k={k} {fmt}: copy {copy_ms:.3f} ms | best fwd {best_f[0]:.3f} ms "
                  f"({100 * copy_ms / best_f[0]:.0f}% of copy) {best_f[2]} | best bwd {best_b[1]:.3f} ms "
                  f"{best_b[2]}", flush=True)
    write_csv(rows, args.out / "tune_conv.csv")


if __name__ == "__main__":
    main()
