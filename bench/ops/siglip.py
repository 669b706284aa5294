"""Kernel benchmark: fused SigLIP loss against the dense PyTorch form.

GPU (bf16 by default): B in {1k, 4k, 16k, 32k, 64k} x d in {256, 768, 1152}; three variants:
  "fused" (fused forward, fused row/column backward), "stripes" (the same forward, the stripes
  backward: cuBLAS products over row stripes of the logits) and "dense". Forward and
  backward medians (do_bench), model TFLOP/s (2*B^2*d forward, 4*B^2*d backward) and their
  share of an 8192^3 matmul in the same dtype measured in the same run, and the peak memory
  beyond inputs and gradients. The dense form is what training code usually writes: a matmul
  in the input dtype to B x B logits, then float32 log-sigmoid. It is skipped where its B x B
  float32 buffers would pass ~40 GiB; an OOM is recorded as such. A time budget (--budget-s)
  stops starting new sizes, so a run stays inside a fixed slot (the rest is marked skipped).
CPU: the chunked PyTorch path (variant "fused", backend torch: its backward is the stripes
  algorithm) against the dense reference at small sizes, labelled CPU.

    python -m bench.ops.siglip [--out DIR] [--quick] [--budget-s 120] [--batches ..] [--dims ..]

Writes siglip.csv (long format, bench/common.py), then siglip.md made from the CSV.
"""
from __future__ import annotations

import argparse
import functools
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dcformer_kernels import siglip_loss

from ..common import (DEFAULT_OUT, Row, compile_only, environment, markdown_pivot, peak_memory_bytes, read_csv,
                     time_fn, write_csv)

GPU_BATCHES = (1024, 4096, 16384, 32768, 65536)
GPU_QUICK_BATCHES = (1024, 4096, 16384)
GPU_DIMS = (256, 768, 1152)
GPU_QUICK_DIMS = (256, 768)
CPU_BATCHES = (256, 1024)
CPU_DIMS = (256,)
DENSE_FP32_MATRICES = 6  # B x B fp32 buffers the dense form holds at its peak (CPU profile: 6.25)
DENSE_LIMIT_BYTES = 40 * 2**30


def dense_siglip(x, y, logit_scale, logit_bias):
    """The usual dense form: B x B logits from a matmul in the input dtype, float32 loss."""
    logits = (x @ y.T).float() * logit_scale.exp() + logit_bias
    signs = 2 * torch.eye(x.shape[0], device=x.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / x.shape[0]


def fused_siglip(x, y, logit_scale, logit_bias, backward_impl="fused"):
    return siglip_loss(x, y, logit_scale, logit_bias, backend="triton" if x.is_cuda else "torch",
                       backward_impl=backward_impl)


GPU_VARIANTS = (("fused", fused_siglip), ("stripes", functools.partial(fused_siglip, backward_impl="stripes")),
                ("dense", dense_siglip))
CPU_VARIANTS = (("fused", fused_siglip), ("dense", dense_siglip))


def matmul_tflops(device: str, dtype: torch.dtype) -> float:
    """The measured ceiling: an n x n x n matmul in ``dtype`` on random data."""
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / time_fn(lambda: a @ b).median_ms / 1e9


def _inputs(batch, dim, dtype, device):
    x = F.normalize(torch.randn(batch, dim, device=device), dim=1).to(dtype).requires_grad_()
    y = F.normalize(torch.randn(batch, dim, device=device), dim=1).to(dtype).requires_grad_()
    scale = torch.tensor(math.log(10.0), device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    return x, y, scale, bias


def bench_one(impl, fn, batch, dim, dtype, device, ceiling, env) -> list[Row]:
    def row(metric, value, unit, p20="", p80=""):
        return Row("siglip", impl, f"B={batch} d={dim}", str(dtype).replace("torch.", ""),
                   "triton" if impl != "dense" and device == "cuda" else "torch", metric, value, unit, p20, p80, env)

    if impl == "dense" and DENSE_FP32_MATRICES * 4 * batch * batch > DENSE_LIMIT_BYTES:
        return [row("fwd_ms", f"skipped: ~{DENSE_FP32_MATRICES} B^2 fp32 buffers > 40 GiB", "")]
    args = _inputs(batch, dim, dtype, device)
    rows = []
    try:
        grad_bytes = []

        def forward_backward():
            grads = torch.autograd.grad(fn(*args), args)
            grad_bytes.append(sum(g.numel() * g.element_size() for g in grads))

        peak = peak_memory_bytes(forward_backward)
        fwd = time_fn(lambda: fn(*args))
        loss = fn(*args)
        bwd = time_fn(lambda: torch.autograd.grad(loss, args, retain_graph=True))
        del loss
    except torch.OutOfMemoryError:
        return [row("fwd_ms", "OOM", "")]
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    flops = 2 * batch * batch * dim
    for name, timing, factor in (("fwd", fwd, 1), ("bwd", bwd, 2)):
        tflops = factor * flops / timing.median_ms / 1e9
        rows += [row(f"{name}_ms", timing.median_ms, "ms", timing.p20_ms, timing.p80_ms),
                 row(f"{name}_tflops", tflops, "TFLOP/s"),
                 row(f"{name}_pct_matmul", 100 * tflops / ceiling, "%")]
    if peak is not None:
        rows.append(row("peak_extra_mib", (peak - grad_bytes[0]) / 2**20, "MiB"))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="fused SigLIP loss vs the dense PyTorch form")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help="GPU: B <= 16k and d in {256, 768}")
    parser.add_argument("--budget-s", type=float, default=120.0,
                        help="start no new size after this many seconds; the rest is recorded as skipped")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--batches", type=int, nargs="+", help="override the batch sizes")
    parser.add_argument("--dims", type=int, nargs="+", help="override the embedding widths")
    parser.add_argument("--compile-only", action="store_true",
                        help="call the fused variants once per size (fills Triton's on-disk cache), time and write "
                             "nothing: lets a GPU session compile in parallel processes before timing")
    args = parser.parse_args(argv)

    if torch.cuda.is_available():
        device, dtype = "cuda", getattr(torch, args.dtype)
        batches = GPU_QUICK_BATCHES if args.quick else GPU_BATCHES
        dims = GPU_QUICK_DIMS if args.quick else GPU_DIMS
        variants = GPU_VARIANTS
    else:
        print("bench.ops.siglip: the Triton kernels need CUDA; timing the chunked PyTorch path on CPU instead")
        device, dtype, batches, dims = "cpu", torch.float32, CPU_BATCHES, CPU_DIMS
        variants = CPU_VARIANTS
    batches, dims = args.batches or batches, args.dims or dims
    if args.compile_only:
        with compile_only():
            for batch in batches:
                for dim in dims:
                    for impl, fn in variants:
                        if impl != "dense":
                            bench_one(impl, fn, batch, dim, dtype, device, math.nan, {})
        return 0
    env = environment()
    ceiling = matmul_tflops(device, dtype)
    rows = [Row("siglip", "matmul_8192" if device == "cuda" else "matmul_1024", "ceiling",
                str(dtype).replace("torch.", ""), "torch", "tflops", ceiling, "TFLOP/s", env=env)]
    print(f"{env['device']}: {dtype} matmul {ceiling:.4g} TFLOP/s", flush=True)

    start = time.perf_counter()
    for batch in batches:
        for dim in dims:
            for impl, fn in variants:
                if time.perf_counter() - start > args.budget_s:
                    new = [Row("siglip", impl, f"B={batch} d={dim}", str(dtype).replace("torch.", ""), "",
                               "fwd_ms", "skipped: time budget", "", env=env)]
                else:
                    new = bench_one(impl, fn, batch, dim, dtype, device, ceiling, env)
                rows += new
                print(f"{impl} B={batch} d={dim}: " + ", ".join(
                    f"{r.metric}={r.value:.4g}" if isinstance(r.value, float) else f"{r.metric}={r.value}"
                    for r in new if not r.metric.endswith("pct_matmul")), flush=True)

    csv_path = write_csv(rows, args.out / "siglip.csv")
    table = read_csv(csv_path)
    md = markdown_pivot([r for r in table if r["input"] != "ceiling"], ["input", "variant"], "metric",
                        f"SigLIP loss, {dtype}: fused (fused or stripes backward) vs dense "
                        "(peak = memory beyond inputs and gradients)")
    ceiling_row = next(r for r in table if r["input"] == "ceiling")
    md += f"\nMeasured ceiling: {ceiling_row['variant']} at {float(ceiling_row['value']):.4g} TFLOP/s.\n"
    (args.out / "siglip.md").write_text(md)
    print(f"wrote {csv_path} and {args.out / 'siglip.md'} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
