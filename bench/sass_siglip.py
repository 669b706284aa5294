"""Static SASS count of the fused SigLIP forward kernel for an H100 (sm_90), on any machine.

    python -m bench.sass_siglip [--batch 16384] [--dim 768]

Compiles the forward launch of ``siglip_loss`` (bf16) as an H100 would specialise it and counts
its SASS instructions. The kernel's column loop runs the pair epilogue (logit, sign, softplus,
masks, row sum) once per BLOCK_R x BLOCK_C tile, so ``instructions / pairs per thread`` bounds
the epilogue's cost per pair from above (the count also holds the feature loop's body once).
Against it stands the tile's d-long dot product: d multiply-adds per pair on the tensor cores,
~2,100 per clock per SM on an H100. A static count, not a timing.
"""
from __future__ import annotations

import argparse
from unittest import mock

import torch

import dcformer_kernels.siglip as sg

from .sass import capture_launches, compile_launch, sass_counts, summarize

SMS = 132


def forward_counts(batch: int, dim: int, dtype=torch.bfloat16):
    x = torch.empty(batch, dim, dtype=dtype, device="meta")
    scalar = torch.empty((), dtype=torch.float32, device="meta")
    props = type("Props", (), {"multi_processor_count": SMS})
    with mock.patch.object(torch.cuda, "get_device_properties", lambda *a: props), \
            capture_launches(sg, "_siglip_fwd_kernel") as launches:
        sg._triton_block_forward(x, torch.empty_like(x), scalar, scalar, None, None, 0, 0, 1.0)
    launch = launches[0]
    counts = sass_counts(compile_launch(launch))
    kw = launch.kwargs
    pairs_per_thread = kw["BLOCK_R"] * kw["BLOCK_C"] / (32 * kw["num_warps"])
    return counts, pairs_per_thread, kw


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=768)
    args = parser.parse_args(argv)
    counts, pairs, kw = forward_counts(args.batch, args.dim)
    summary = summarize(counts)
    mufu = sum(v for k, v in counts.items() if k.startswith("MUFU"))
    print(f"B={args.batch} d={args.dim} bf16, tiles {kw['BLOCK_R']}x{kw['BLOCK_C']}x{kw['BLOCK_D']}, "
          f"{kw['num_warps']} warps: {summary['instructions']} SASS instructions, {pairs:.0f} pairs per thread "
          f"per tile -> <= {summary['instructions'] / pairs:.1f} instructions and {mufu / pairs:.1f} MUFU per pair")
    print("most frequent:", ", ".join(f"{k} {v}" for k, v in counts.most_common(10)))


if __name__ == "__main__":
    main()
