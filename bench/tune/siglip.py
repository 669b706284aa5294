"""Sweep the SigLIP forward's tiles on a CUDA device (informs ``dcformer_kernels.siglip.tile_config``).

    python -m bench.tune.siglip [--out DIR] [--budget-s S] [--shard K/N] [--compile-only]

For each candidate of ``bench.static.sass_siglip.SWEEP`` (its static resources: ``python -m
bench.static.sass_siglip --sweep``) times, in bf16, the forward kernel on the whole batch and the
stripes backward's kernel on one stripe (the same tiles serve both; the stripe kernel builds the
stripe's logits and writes G), at B = 16k, 32k and 64k with d = 768 and at B = 32k with d = 256.
Reports ms and model TFLOP/s as % of an 8192^3 bf16 matmul measured in the same run; prints the
best candidate per case. Writes tune_siglip.csv.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from triton.runtime.errors import OutOfResources

import dcformer_kernels.siglip as sg
from dcformer_kernels.dispatch import compute_dtype

from ..common import DEFAULT_OUT, Row, compile_only, environment, time_fn, write_csv
from ..ops.siglip import matmul_tflops
from ..static.sass_siglip import SWEEP, forward_tiles

SHAPES = ((16384, 768), (32768, 768), (65536, 768), (32768, 256))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--budget-s", type=float, help="start no new shape after this many seconds")
    parser.add_argument("--shard", default="0/1", help="K/N: only the candidates whose index is K mod N (a GPU "
                        "session compiles the shards in parallel processes)")
    parser.add_argument("--compile-only", action="store_true",
                        help="call each candidate once (fills Triton's on-disk cache), time and write nothing")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.tune.siglip needs a CUDA device")
    with compile_only(args.compile_only):
        # One shape compiles every candidate: the kernels specialise on the same constexprs at all of them.
        rows = time_candidates(SHAPES[:1] if args.compile_only else SHAPES, args.budget_s,
                               ceiling=not args.compile_only, candidates=_shard(args.shard))
    if not args.compile_only:
        write_csv(rows, args.out / "tune_siglip.csv")


def _shard(spec: str) -> list:
    k, n = (int(v) for v in spec.split("/"))
    if not 0 <= k < n:
        raise SystemExit(f"--shard must be K/N with 0 <= K < N; got {spec!r}")
    return SWEEP[k::n]


def time_candidates(shapes, budget_s, ceiling=True, device="cuda", dtype=torch.bfloat16,
                    candidates=SWEEP) -> list[Row]:
    """Rows of the sweep: each candidate's forward and stripe-kernel times at each (B, d) of ``shapes``;
    ``device``/``dtype``/``candidates`` let the tests run it on the interpreter."""
    env = environment()
    ceiling = matmul_tflops(device, dtype) if ceiling else float("nan")
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 1
    label = str(dtype).replace("torch.", "")
    matmul = f"matmul_{8192 if device == 'cuda' else 1024}"
    rows = [Row("siglip", matmul, "ceiling", label, "torch", "tflops", ceiling, "TFLOP/s", env=env)]
    started = time.perf_counter()
    for batch, dim in shapes:
        name = f"B={batch} d={dim}"
        if budget_s is not None and time.perf_counter() - started > budget_s:
            print(f"{name}: skipped (time budget {budget_s:.0f} s)", flush=True)
            continue
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(batch, dim, device=device, dtype=dtype, generator=gen)
        y = torch.randn(batch, dim, device=device, dtype=dtype, generator=gen)
        scale = torch.tensor(2.3, device=device)
        bias = torch.tensor(-10.0, device=device)
        stripe = sg.stripe_bounds(batch, batch, x.device)[0][1]
        flops = {"forward": 2 * batch * batch * dim, "stripe G": 2 * stripe * batch * dim}
        calls = {
            "forward": lambda: sg.triton_block_forward(x, y, scale, bias, None, None, 0, 0, 1.0 / batch),
            "stripe G": lambda: sg.triton_stripe_grad(x[:stripe], y, scale, bias, None, None, 0, stripe, 0, 0,
                                                       compute_dtype(dtype)),
        }
        best = {}
        for cand in candidates:
            for kernel, fn in calls.items():
                try:
                    with forward_tiles(cand, sms):
                        ms = time_fn(fn, 10, 60).median_ms
                except OutOfResources as err:  # a candidate the device cannot hold (shared memory, registers)
                    print(f"{name} {kernel} {cand}: {type(err).__name__}: {err}"[:300], flush=True)
                    continue
                pct = 100 * flops[kernel] / (ms * 1e-3) / 1e12 / ceiling
                rows += [Row("siglip", str(cand), name, label, kernel, "time", round(ms, 4), "ms", env=env),
                         Row("siglip", str(cand), name, label, kernel, "pct_matmul", round(pct, 1), "%", env=env)]
                if kernel not in best or ms < best[kernel][0]:
                    best[kernel] = (ms, pct, str(cand))
        for kernel, (ms, pct, cand) in best.items():
            print(f"{name} {kernel}: best {cand} {ms:.3f} ms ({pct:.0f} % of the matmul)", flush=True)
    return rows


if __name__ == "__main__":
    main()
