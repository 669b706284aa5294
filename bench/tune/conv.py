"""Sweep the fused conv's tile shapes on a CUDA device (informs ``conv_common.tile_config``'s heuristic).

    python -m bench.tune.conv [--out DIR] [--stages 1 3] [--formats ncdhw cl] [--compile-only]

For DCFormer's stage shapes (batch 2, bf16) and both memory formats, times the forward and the
backward of the direct kernels for each candidate tile (tensor cores off) and, where the shape
takes them, of the tensor-core kernels; prints the best per case. Writes tune_conv.csv.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import dcformer_kernels.decomposed_conv as dc
from dcformer_kernels.conv_common import TileConfig

from ..common import DEFAULT_OUT, Row, compile_only, environment, time_fn, write_csv
from ..ops.conv import GPU_SHAPES
from ..static.sass_conv import SWEEP

# The same candidates the static SASS model ranks (bench/static/sass_conv.py); every one is a fresh compile.
CANDIDATES = {fmt: [TileConfig(*t) for t in tiles] for fmt, tiles in SWEEP.items()}
SHAPES = [s for s in GPU_SHAPES if s[-1] in (13, 9)]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--stages", type=int, nargs="+", choices=(1, 3), help="DCFormer stages (default: 1 3)")
    parser.add_argument("--formats", nargs="+", choices=tuple(CANDIDATES), help="memory formats (default: both)")
    parser.add_argument("--budget-s", type=float, help="start no new shape/format after this many seconds")
    parser.add_argument("--compile-only", action="store_true",
                        help="call each candidate once (fills Triton's on-disk cache), time and write nothing")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.tune.conv needs a CUDA device")
    with compile_only(args.compile_only):
        rows = time_candidates([s for s in SHAPES if not args.stages or GPU_SHAPES.index(s) + 1 in args.stages],
                               [f for f in CANDIDATES if not args.formats or f in args.formats], args.budget_s)
    if not args.compile_only:
        write_csv(rows, args.out / "tune_conv.csv")


def time_candidates(shapes, formats, budget_s=None) -> list[Row]:
    """Rows of the sweep: each tile candidate of each format, forward and backward, at each stage shape."""
    env = environment()
    rows = []
    started = time.perf_counter()
    for c, d, h, w, k in shapes:
        for fmt in formats:
            if budget_s is not None and time.perf_counter() - started > budget_s:
                print(f"C={c} {d}x{h}x{w} k={k} {fmt}: skipped (time budget {budget_s:.0f} s)", flush=True)
                continue
            candidates = CANDIDATES[fmt]
            x = torch.randn(2, c, d, h, w, device="cuda", dtype=torch.bfloat16)
            if fmt == "cl":
                x = x.contiguous(memory_format=torch.channels_last_3d)
            ws = [torch.randn(c, k, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
            g = torch.randn_like(x)
            copy_ms = time_fn(lambda: torch.clone(x), 10, 40).median_ms
            results = []
            name = f"2x{c}x{d}x{h}x{w} k={k} {fmt}"
            variants = [(str(cfg), cfg, "direct") for cfg in candidates]  # the direct kernel's tiles
            if dc.use_tensor_cores(x, 1):
                variants.append(("tensor cores", None, "auto"))
            for label, cfg, impl in variants:
                fwd = time_fn(lambda: dc.decomposed_conv3d_forward(x, *ws, None, 1, impl, cfg), 10, 40).median_ms
                bwd = time_fn(lambda: dc.decomposed_conv3d_backward(g, x, *ws, 1, impl, cfg), 10, 40).median_ms
                results.append((fwd, bwd, label))
                for mode, ms in (("forward", fwd), ("backward", bwd)):
                    rows.append(Row("decomposed_conv3d", label, name, "bfloat16", mode, "time", round(ms, 4),
                                    "ms", env=env))
            best_f = min(results, key=lambda r: r[0])
            best_b = min(results, key=lambda r: r[1])
            print(f"{name}: copy {copy_ms:.3f} ms | best fwd {best_f[0]:.3f} ms "
                  f"({100 * copy_ms / best_f[0]:.0f}% of copy) {best_f[2]} | best bwd {best_b[1]:.3f} ms "
                  f"{best_b[2]}", flush=True)
    return rows


if __name__ == "__main__":
    main()
