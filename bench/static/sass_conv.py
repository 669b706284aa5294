"""Static SASS analysis of the decomposed-conv kernels for an H100 (sm_90), on any machine.

    python -m bench.static.sass_conv [--out DIR] [--tile BC,DT,RH,RW,WARPS] [--sweep]

Compiles every kernel launch of the fused op (forward, backward) and of the fused training-mode
BatchNorm (stats, grad sums, dx) for DCFormer's stage shapes, exactly as a launch on an H100 would
specialise it, and counts the SASS instructions of one program. These kernels have no runtime
loops, so every thread runs each instruction once; with the block size that gives thread
instructions per element. Two model times follow (a MODEL, not a measurement):

- issue-bound: warp instructions / (4 per clock per SM x 132 SMs x 1.755 GHz);
- bandwidth floor: the op's floor bytes at 2.65 TB/s (what ``torch.clone`` reached on the H100,
  bench/results/tune_conv.csv);

and ``model % of copy`` = floor / max(both). Two cold paths are left out of the counts (their
tests are counted): the tensor-core forward's recompute of cubes whose result is not finite, and
the direct backward's masked products in blocks that hold a non-finite x. Tensor-core time (HMMA
issue) is not modelled separately. On 2026-11-27 the issue-bound model put the old
stage-1 forward (NCDHW, bf16, k=13) at 0.17 ms against 0.19 ms measured on that H100.
The table also gives ptxas's registers (and spill bytes) per thread and the warps an SM can hold
with them (registers, shared memory and the 32-program limit): the model assumes enough warps
to hide memory latency, which one-warp programs (at most 32 resident warps of 64) may not give.
``--sweep`` ranks the candidate tiles of ``bench.tune.conv`` by the model; the GPU tuner then
times the few best.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import dcformer_kernels.conv_common as conv_common
import dcformer_kernels.decomposed_conv as dc
import dcformer_kernels.decomposed_conv_bn as dcbn

from ..common import DEFAULT_OUT, Row, environment, markdown_table, write_csv
from ..ops.conv import GPU_SHAPES
from .sass import capture_launches, compile_launch, programs_per_sm, resources, sass_counts, summarize

SMS, ISSUE_PER_CLOCK, CLOCK_HZ, COPY_BYTES_PER_S = 132, 4, 1.755e9, 2.65e12
KERNELS = {  # kernel -> (module, floor bytes per element in units of the element size)
    "_decomposed_conv3d_fwd_kernel": (dc, 2),  # read x, write y
    "_decomposed_conv3d_tc_fwd_kernel": (dc, 2),
    "_decomposed_conv3d_tc_dweight_kernel": (dc, 2),  # read x and g (its dx is a tc_fwd of g)
    "_decomposed_conv3d_bwd_kernel": (dc, 3),  # read x and g, write dx
    "_bn_stats_kernel": (dcbn, 1),
    "_bn_grad_sums_kernel": (dcbn, 2),
    "_bn_dx_kernel": (dcbn, 3),
}


def _launches(c, d, h, w, k, dtype, layout, bn=True, tiles=None):
    """The kernel launches of the fused op (and of the fused training-mode BN), recorded on meta tensors."""
    x = torch.empty(2, c, d, h, w, dtype=dtype, device="meta")
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    ws = [torch.empty(c, k, dtype=dtype, device="meta") for _ in range(3)]
    g = torch.empty_like(x)
    gamma = torch.empty(3, c, dtype=dtype, device="meta")
    bn_launches = []
    # (the partial-sum reductions, the BN tables and coefficients: small, not modelled)
    with capture_launches(dc, *[n for n, (m, _) in KERNELS.items() if m is dc]) as conv, \
            capture_launches(conv_common, "_weight_grads_kernel"):
        dc.decomposed_conv3d_forward(x, *ws, None, 1, "direct", tiles)
        if min(d, h, w) >= dc.TC_CUBE:  # the tensor-core forward too (on CUDA: bf16/fp16 NCDHW)
            dc.decomposed_conv3d_forward(x, *ws, None, 1, "tensor_cores")
        dc.decomposed_conv3d_backward(g, x, *ws, 1, "direct", tiles)
        if min(d, h, w) >= dc.TC_CUBE:
            dc.decomposed_conv3d_backward(g, x, *ws, 1, "tensor_cores")
            tc_dx = [i for i, la in enumerate(conv) if la.kernel.fn.__name__ == "_decomposed_conv3d_tc_fwd_kernel"]
            del conv[tc_dx[-1]]  # the backward's dx launch: the forward kernel again, on g
    if bn:  # the fused BN unit's forward ends with the conv forward above: not counted twice
        with capture_launches(dcbn, *[n for n, (m, _) in KERNELS.items() if m is dcbn]) as bn_launches, \
                capture_launches(dc, *[n for n, (m, _) in KERNELS.items() if m is dc]), \
                capture_launches(conv_common, "_weight_grads_kernel"), \
                capture_launches(dcbn, "_bn_table_kernel", "_bn_fold_kernel", "_bn_coef_kernel"):
            _, mean, _, std = dcbn.decomposed_conv3d_bn_forward(x, *ws, gamma, gamma, 1e-5, "direct", tiles)
            dcbn.decomposed_conv3d_bn_backward(g, x, *ws, gamma, mean, std, tiles)
    return conv + bn_launches, x


def analyse(shape, dtype, layout, cfg=None, bn=True):
    """Model numbers for every kernel launched at this shape; ``cfg`` (a TileConfig) overrides the tiles."""
    c, d, h, w, k = shape
    launches, x = _launches(c, d, h, w, k, dtype, layout, bn, cfg)
    out = []
    for launch in launches:
        name = launch.kernel.fn.__name__
        kw = launch.kwargs
        for cold in ("RECOMPUTE", "EXACT_BLOCKS"):  # paths only blocks holding Inf/NaN take (their tests count)
            if cold in kw:
                kw[cold] = False
        compiled = compile_launch(launch)
        counts = summarize(sass_counts(compiled))
        res = resources(compiled)
        warps = kw["num_warps"]
        block = kw["BLOCK_C"] * (kw["T"] ** 3 if "T" in kw else kw["DT"] * kw["RH"] * kw["RW"])
        threads_per_element = 32 * warps / block
        issue_s = counts["instructions"] * warps * launch.grid[0] * launch.grid[1] / (ISSUE_PER_CLOCK * SMS * CLOCK_HZ)
        floor_s = KERNELS[name][1] * x.numel() * x.element_size() / COPY_BYTES_PER_S
        out.append(dict(kernel=name.strip("_").replace("_kernel", ""),
                        tiles=(f"cube {kw['T']} x C{kw['BLOCK_C']} w{warps}" if "T" in kw  # as launched
                               else f"C{kw['BLOCK_C']} D{kw['DT']} H{kw['RH']} W{kw['RW']} w{warps}"),
                        instructions=counts["instructions"],
                        per_element=counts["instructions"] * threads_per_element,
                        loads_per_element=(counts["ldg_vector"] + counts["ldg_scalar"]) * threads_per_element,
                        issue_us=issue_s * 1e6, floor_us=floor_s * 1e6, registers=res["registers"],
                        spill_bytes=res["spill_bytes"], warps_per_sm=programs_per_sm(res, warps) * warps,
                        pct_of_copy=100 * floor_s / max(issue_s, floor_s)))
    return out


def _tile_label(cfg) -> str:
    return f"C{cfg.block_c} D{cfg.d_tile} H{cfg.rows_h} W{cfg.cols_w} w{cfg.num_warps}"


SWEEP = {  # (block_c, d_tile, rows_h, cols_w, num_warps) candidates per layout; the first is the default
    "ncdhw": [(1, 2, 4, 64, 1), (1, 1, 4, 64, 1), (4, 1, 2, 64, 1), (1, 4, 4, 64, 2), (1, 4, 4, 64, 4),
              (4, 1, 4, 64, 4), (1, 8, 4, 64, 8), (1, 2, 8, 64, 4)],
    "cl": [(32, 2, 4, 4, 1), (32, 1, 4, 4, 1), (32, 4, 4, 4, 1), (64, 2, 2, 4, 1), (32, 4, 4, 4, 4),
           (32, 8, 4, 4, 8), (32, 4, 4, 8, 8), (32, 1, 4, 8, 4)],
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--tile", help="BC,DT,RH,RW,WARPS: analyse this tile instead of tile_config's")
    parser.add_argument("--sweep", action="store_true", help="rank SWEEP's tiles by the model (stage 1 and 3)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.sweep:
        for shape in (GPU_SHAPES[0], GPU_SHAPES[2]):
            for layout, cands in SWEEP.items():
                ranked = []
                for t in cands:
                    cfg = conv_common.TileConfig(*t)
                    rows = analyse(shape, dtype, layout, cfg, bn=False)
                    fwd, bwd = [r for r in rows if not r["kernel"].startswith("decomposed_conv3d_tc")][:2]
                    ranked.append((fwd["issue_us"] + bwd["issue_us"], fwd, bwd, cfg))
                ranked.sort(key=lambda r: r[0])
                print(f"{shape} {layout}: fwd+bwd by the issue model (registers, resident warps / SM)")
                for _, fwd, bwd, cfg in ranked:
                    print(f"  {_tile_label(cfg)}: " + ", ".join(
                        f"{name} {r['issue_us']:.1f} us ({r['registers']} regs, {r['warps_per_sm']} warps)"
                        for name, r in (("fwd", fwd), ("bwd", bwd))))
        return
    cfg = conv_common.TileConfig(*map(int, args.tile.split(","))) if args.tile else None
    env = environment()
    env["device"] = "model of an H100 SXM (sm_90 SASS compiled here; no GPU ran)"
    rows, lines = [], []
    for shape in GPU_SHAPES:
        for layout in ("ncdhw", "cl"):
            for r in analyse(shape, dtype, layout, cfg):
                name = f"2x{shape[0]}x{shape[1]}x{shape[2]}x{shape[3]} k={shape[4]}"
                lines.append([r["kernel"], layout, name, r["tiles"], f"{r['per_element']:.1f}",
                              f"{r['loads_per_element']:.2f}", f"{r['registers']} / {r['spill_bytes']}",
                              str(r["warps_per_sm"]), f"{r['issue_us']:.1f}", f"{r['floor_us']:.1f}",
                              f"{r['pct_of_copy']:.0f}%"])
                for metric, unit in (("per_element", "SASS instr/element"), ("warps_per_sm", "resident warps/SM"),
                                     ("issue_us", "us (issue model)"),
                                     ("floor_us", "us (bandwidth floor)"), ("pct_of_copy", "% of copy (model)")):
                    rows.append(Row(r["kernel"], f"{layout} {r['tiles']}", name, args.dtype, "triton",
                                    metric, round(r[metric], 2), unit, env=env))
                print(" | ".join(lines[-1]), flush=True)
    suffix = "" if args.dtype == "bfloat16" else f"_{args.dtype}"
    write_csv(rows, args.out / f"sass_conv{suffix}.csv")
    header = ["kernel", "layout", "input", "tiles", "SASS instr / element", "loads / element",
              "registers / spill B", "resident warps / SM", "issue model us", "bandwidth floor us", "model % of copy"]
    (args.out / f"sass_conv{suffix}.md").write_text(markdown_table(
        f"Decomposed conv kernels, {args.dtype}: static SASS model for an H100 (not a measurement)",
        header, lines, env))


if __name__ == "__main__":
    main()
