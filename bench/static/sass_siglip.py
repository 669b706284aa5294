"""Static SASS count of the fused SigLIP forward kernel for an H100 (sm_90), on any machine.

    python -m bench.static.sass_siglip [--batch 16384] [--dim 768]

Compiles the forward launch of ``siglip_loss`` (bf16) as an H100 would specialise it and counts
its SASS instructions. The kernel's column loop runs the pair epilogue (logit, sign, softplus,
masks, row sum) once per BLOCK_R x BLOCK_C tile, so ``instructions / pairs per thread`` bounds
the epilogue's cost per pair from above (the count also holds the feature loop's body once).
Against it stands the tile's d-long dot product: d multiply-adds per pair on the tensor cores,
~2,100 per clock per SM on an H100. A static count, not a timing.

    python -m bench.static.sass_siglip --sweep

compiles the forward for each tile candidate of ``SWEEP`` (the candidates ``bench.tune.siglip``
times on a GPU) and prints what ptxas allocated (registers, spills, shared memory), the programs
an SM can hold, the tile's arithmetic intensity against L2 (FLOPs per byte loaded per feature
step: every program re-reads its X rows and a Y tile for each column tile) and how many waves
the launch makes at B = 16k, 32k and 64k. Static numbers, to prune the GPU sweep.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
from unittest import mock

import torch

import dcformer_kernels.siglip as sg
from dcformer_kernels.dispatch import cdiv, next_power_of_2

from .sass import capture_launches, compile_launch, programs_per_sm, resources, sass_counts, summarize

SMS = 132


@dataclasses.dataclass(frozen=True)
class Candidate:
    """Forward (and stripe-kernel) tiles; tiles_per_program=None keeps the heuristic's column
    ranges (about two programs per SM), 1 gives each program one column tile; max_registers caps
    ptxas's registers per thread (more programs per SM, perhaps spills)."""

    rows: int
    cols: int
    feats: int
    warps: int
    stages: int
    tiles_per_program: int | None = None
    max_registers: int | None = None

    def __str__(self) -> str:
        split = "" if self.tiles_per_program is None else f" {self.tiles_per_program} tile/prog"
        regs = "" if self.max_registers is None else f" r{self.max_registers}"
        return f"{self.rows}x{self.cols}x{self.feats} w{self.warps} s{self.stages}{split}{regs}"


SWEEP = [  # bf16; the first is tile_config's choice
    Candidate(64, 128, 64, 4, 3), Candidate(64, 128, 64, 4, 3, 1), Candidate(64, 128, 64, 4, 2, None, 128),
    Candidate(128, 128, 64, 8, 3), Candidate(128, 128, 64, 8, 3, None, 128),
    Candidate(128, 128, 32, 8, 3, None, 128), Candidate(128, 128, 32, 8, 3, 1, 128),
    Candidate(128, 128, 32, 8, 4, None, 128), Candidate(128, 256, 64, 8, 3), Candidate(64, 256, 64, 8, 3),
    Candidate(128, 64, 64, 4, 3),
]


@contextlib.contextmanager
def forward_tiles(candidate: Candidate | None, sms: int = SMS):
    """Within the block, the forward and stripe kernels take ``candidate``'s tiles (None: unchanged)."""
    if candidate is None:
        yield
        return
    base = sg.tile_config

    def tiles(n_rows, n_cols, dim, dtype, device, backward):
        cfg = base(n_rows, n_cols, dim, dtype, device, backward)
        if backward:
            return cfg
        c = candidate
        splits = (cdiv(cdiv(n_cols, c.cols), c.tiles_per_program) if c.tiles_per_program
                  else sg.forward_splits(n_rows, n_cols, c.rows, c.cols, 2 * sms))
        return dataclasses.replace(cfg, block_rows=c.rows, block_cols=c.cols,
                                   block_d=min(c.feats, max(16, next_power_of_2(dim))), splits=splits,
                                   num_warps=c.warps, num_stages=c.stages, max_registers=c.max_registers)

    with mock.patch.object(sg, "tile_config", tiles):
        yield


def forward_launch(batch: int, dim: int, dtype=torch.bfloat16, candidate: Candidate | None = None):
    x = torch.empty(batch, dim, dtype=dtype, device="meta")
    scalar = torch.empty((), dtype=torch.float32, device="meta")
    props = type("Props", (), {"multi_processor_count": SMS})
    with mock.patch.object(torch.cuda, "get_device_properties", lambda *a: props), forward_tiles(candidate), \
            capture_launches(sg, "_siglip_fwd_kernel") as launches:
        sg.triton_block_forward(x, torch.empty_like(x), scalar, scalar, None, None, 0, 0, 1.0)
    return launches[0]


def forward_counts(batch: int, dim: int, dtype=torch.bfloat16):
    launch = forward_launch(batch, dim, dtype)
    counts = sass_counts(compile_launch(launch))
    kw = launch.kwargs
    pairs_per_thread = kw["BLOCK_R"] * kw["BLOCK_C"] / (32 * kw["num_warps"])
    return counts, pairs_per_thread, kw


def sweep(dim: int = 768) -> list[str]:
    """One Markdown row per SWEEP candidate (bf16): what ptxas allocated and what follows from it."""
    lines = ["| tiles | registers | spill B | shared KiB | programs / SM | L2 FLOP/B | waves at 16k / 32k / 64k |",
             "|---|---|---|---|---|---|---|"]
    for cand in SWEEP:
        compiled = compile_launch(forward_launch(16384, dim, candidate=cand))
        res = resources(compiled)
        per_sm = programs_per_sm(res, cand.warps)
        intensity = cand.rows * cand.cols / (cand.rows + cand.cols)  # 2 R C F FLOPs over 2 (R + C) F bytes
        waves = []
        for batch in (16384, 32768, 65536):
            grid = forward_launch(batch, dim, candidate=cand).grid
            waves.append(f"{grid[0] * grid[1] / (per_sm * SMS):.2f}" if per_sm else "-")
        lines.append(f"| {cand} | {res['registers']} | {res['spill_bytes']} | {res['shared_bytes'] / 1024:.0f} | "
                     f"{per_sm} | {intensity:.0f} | {' / '.join(waves)} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--sweep", action="store_true", help="static resources of every SWEEP candidate")
    args = parser.parse_args(argv)
    if args.sweep:
        print(f"SigLIP forward tile candidates, bf16, d = {args.dim}, sm_90 (static: ptxas allocation, no GPU)")
        print("\n".join(sweep(args.dim)))
        return
    counts, pairs, kw = forward_counts(args.batch, args.dim)
    summary = summarize(counts)
    mufu = sum(v for k, v in counts.items() if k.startswith("MUFU"))
    print(f"B={args.batch} d={args.dim} bf16, tiles {kw['BLOCK_R']}x{kw['BLOCK_C']}x{kw['BLOCK_D']}, "
          f"{kw['num_warps']} warps: {summary['instructions']} SASS instructions, {pairs:.0f} pairs per thread "
          f"per tile -> <= {summary['instructions'] / pairs:.1f} instructions and {mufu / pairs:.1f} MUFU per pair")
    print("most frequent:", ", ".join(f"{k} {v}" for k, v in counts.most_common(10)))


if __name__ == "__main__":
    main()
