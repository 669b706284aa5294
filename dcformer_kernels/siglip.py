"""Fused SigLIP pairwise-sigmoid loss: Triton kernels, chunked PyTorch path, autograd, registration.

    S_ij = exp(t') <x_i, y_j> + b,    L = -(1/B) sum_i sum_j log sigmoid(z_ij S_ij)

z_ij = +1 on positive pairs (i == j, or equal group ids), -1 elsewhere; the 1/B is the paper's
(a sum over B*B pairs divided by B). The dense form is ``reference.siglip_loss_reference``.

Forward: each program walks one block of rows against a range of column blocks, builds S tile
by tile with ``tl.dot`` and writes one partial sum of log(1 + exp(-z S)); a fixed-order
``sum`` over the partials gives the loss. Backward recomputes the tiles, flash-attention style,
with G = dL/dS = -z sigmoid(-z S) / B: a row pass writes dX = t G Y (and per-program partial
sums for dt' = sum G (S - b) and db = sum G), a column pass - the same kernel with the roles of
X and Y swapped, since z is symmetric - writes dY = t G^T X. Every output element has exactly
one writer and every reduction has a fixed order: no atomics, bitwise-identical reruns.

That backward recomputes each S tile once per block of gradient features, so above d = 256 it
runs 7-10x the model FLOPs. The "stripes" backward computes S once: for a stripe of R rows
one kernel builds the R x B logits tile by tile (as the forward does, never storing them) and
writes G in the input dtype (a bounded buffer) with the stripe's partial sums for dt', db; two
matmuls give dX[stripe] = t G Y and add t G^T X[stripe] to dY (fp32, stripes in a fixed order):
6 B^2 d FLOPs, two thirds of them on cuBLAS, O(R B + B d) memory. ``backward_impl`` picks one;
"auto" takes the stripes above d = 256 or 8192^2 pairs. It is named apart from the conv ops' ``impl``
(a kernel family for the same computation, forward and backward alike) because it picks a backward
algorithm with its own memory bound, and the forward has one kernel. The PyTorch path (CPU) is the same
stripes algorithm with the logits of a stripe as one torch matmul and G in torch ops.
Saved for backward: x, y, t', b (and the group ids). Memory: the forward and the fused backward
hold no pair matrix at all; the stripes (and the PyTorch path) hold one stripe of at most
STRIPE_ELEMENTS pairs, bounded whatever B is (below 2^27 pairs on CUDA, B < 11.6k, and 2^22 on
CPU, B <= 2048, one stripe is the whole B x B).

The same block functions (rows of X against columns of Y, with global row/column offsets that
say where the diagonal lies) serve the single-process loss here and the two multi-process modes,
"gather" and "ring", in ``siglip_dist``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.flop_counter

from .dispatch import (HAS_TRITON, acc_dtype, cdiv, check_interpretable, compute_dtype, index_dtype,
                        next_power_of_2, resolve_backend, triton_interpreting)

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["siglip_loss", "SigLIPLossFunction", "check_siglip_args", "triton_block_forward", "triton_block_backward",
           "triton_stripe_grad", "stripes_block_backward", "block_forward", "block_backward", "tile_config"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_GROUP_DTYPES = (torch.int32, torch.int64)
BACKWARD_IMPLS = ("auto", "fused", "stripes")
# "auto" keeps the fused row/column backward up to this d and this many pairs (rows x columns of
# the block), where it was the faster of the two (measurements: docs/siglip_notes.md, "Constants").
FUSED_BACKWARD_MAX_DIM = 256
FUSED_BACKWARD_MAX_PAIRS = 8192**2
# The stripes' half-precision products need torch.mm(..., out_dtype=torch.float32) (torch >= 2.8);
# without it "auto" stays with the fused backward.
_MM_HAS_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()
# Logits per row stripe (one chunk of the PyTorch path, one stripe of the stripes backward) and the
# share of them in one dY column chunk: bounded buffers sized in docs/siglip_notes.md, "Constants".
STRIPE_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 27}
DY_CHUNK_FRACTION = 8
STRIPE_ROW_MULTIPLE = 128  # stripes of many rows start on a multiple of the matmul tile


# ----------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------
def check_siglip_args(x, y, logit_scale, logit_bias, group_ids=None) -> None:
    """Raise a TypeError/ValueError naming the argument, the expectation and what came in."""
    for name, emb in (("x", x), ("y", y)):
        if not isinstance(emb, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B, d); got {type(emb).__name__}")
        if emb.dim() != 2:
            raise ValueError(f"{name} must be 2-D (B, d); got shape {tuple(emb.shape)}")
        if emb.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64; got {emb.dtype}")
    batch, dim = x.shape
    if batch < 1 or dim < 1:
        raise ValueError(f"x must have at least one row and one feature, shape (B >= 1, d >= 1); "
                         f"got shape {tuple(x.shape)}")
    if y.shape != x.shape:
        raise ValueError(f"y must have the shape of x, (B={batch}, d={dim}); got {tuple(y.shape)}")
    if y.dtype != x.dtype:
        raise TypeError(f"y has dtype {y.dtype} but x has dtype {x.dtype}")
    if y.device != x.device:
        raise ValueError(f"y is on {y.device} but x is on {x.device}")
    for name, p in (("logit_scale", logit_scale), ("logit_bias", logit_bias)):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name} must be a 0-dim floating-point tensor (shape ()); got {type(p).__name__}")
        if p.dim() != 0:
            raise ValueError(f"{name} must be a 0-dim tensor (shape ()); got shape {tuple(p.shape)}")
        if not p.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got {p.dtype}")
        if p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but x is on {x.device}")
    if group_ids is not None:
        if not isinstance(group_ids, torch.Tensor):
            raise TypeError(f"group_ids must be a torch.Tensor of shape (B={batch},) or None; "
                            f"got {type(group_ids).__name__}")
        if group_ids.shape != (batch,):
            raise ValueError(f"group_ids must have shape (B={batch},); got {tuple(group_ids.shape)}")
        if group_ids.dtype not in _GROUP_DTYPES:
            raise TypeError(f"group_ids must be int32 or int64; got {group_ids.dtype}")
        if group_ids.device != x.device:
            raise ValueError(f"group_ids is on {group_ids.device} but x is on {x.device}")


# ----------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileConfig:
    block_rows: int  # rows of X per program
    block_cols: int  # columns (rows of Y) per tile
    block_d: int  # features per tl.dot step
    block_out: int  # backward: gradient features one program owns (acc stays in registers)
    splits: int  # forward: column ranges per row block, for enough programs when B is small
    num_warps: int
    num_stages: int
    max_registers: int | None = None  # ptxas's per-thread cap (None: its own choice)


def tile_config(n_rows: int, n_cols: int, dim: int, dtype: torch.dtype, device: torch.device,
                 backward: bool) -> TileConfig:
    if triton_interpreting():
        # The interpreter costs ~ms per program and per op: small tiles, and few programs. The
        # tests pick B and d so that partial row, column, feature and output blocks all occur.
        rows, cols, feats, outs, warps, stages, programs = 32, 32, 16, 32, 1, 1, 8
    else:
        programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
        if dtype in (torch.float16, torch.bfloat16):
            # The fastest of a GPU tile sweep (docs/siglip_notes.md, "Constants"): above d = 256 the
            # narrower gradient block wins despite recomputing S for twice as many blocks.
            if not backward:
                rows, cols, feats, outs, warps, stages = 64, 128, 64, 0, 4, 3
            elif dim > 256:
                rows, cols, feats, outs, warps, stages = 64, 64, 64, 128, 4, 3
            else:
                rows, cols, feats, outs, warps, stages = 64, 64, 64, 256, 8, 2
        elif dtype == torch.float32:
            rows, cols, feats, outs, warps, stages = 64, 64, 32, 128, 4, 2
        else:
            rows, cols, feats, outs, warps, stages = 32, 32, 16, 64, 4, 1
    feats = min(feats, max(16, next_power_of_2(dim)))
    outs = min(outs, max(16, next_power_of_2(dim)))
    splits = 1 if backward else forward_splits(n_rows, n_cols, rows, cols, programs)
    return TileConfig(rows, cols, feats, outs, splits, warps, stages)


def forward_splits(n_rows: int, n_cols: int, block_rows: int, block_cols: int, programs: int) -> int:
    """Column ranges per row block so that the forward launches about ``programs`` programs."""
    row_blocks, col_blocks = cdiv(n_rows, block_rows), cdiv(n_cols, block_cols)
    return max(1, min(col_blocks, cdiv(programs, row_blocks)))


def _dot_precision(dtype: torch.dtype) -> str:
    """IEEE fp32 products unless the caller allowed TF32 (torch.backends.cuda.matmul.allow_tf32)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"  # half inputs: ignored


if HAS_TRITON:

    @triton.jit
    def _pair_dots(a_ptr, b_ptr, rows, cols, row_ok, col_ok, D, sa0, sa1, sb0, sb1,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                   PREC: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr):
        """<a_i, b_j> for one BLOCK_R x BLOCK_C tile, BLOCK_D features per tl.dot."""
        feats = tl.arange(0, BLOCK_D)
        a_rows = a_ptr + rows.to(IDX)[:, None] * sa0
        b_cols = b_ptr + cols.to(IDX)[None, :] * sb0
        dots = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
        for k0 in range(0, D, BLOCK_D):
            k = k0 + feats
            k_ok = k < D
            a = tl.load(a_rows + k.to(IDX)[None, :] * sa1, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b_t = tl.load(b_cols + k.to(IDX)[:, None] * sb1, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            dots = tl.dot(a, b_t, dots, input_precision=PREC, out_dtype=ACC)
        return dots

    @triton.jit
    def _positive_pairs(rows, cols, col_ok, row_start, col_start, row_group, col_group_ptr,
                        HAS_GROUPS: tl.constexpr):
        """z_ij = +1: equal group ids, or the same global index (the diagonal)."""
        if HAS_GROUPS:
            col_group = tl.load(col_group_ptr + cols, mask=col_ok, other=0)
            positive = row_group[:, None] == col_group[None, :]
        else:
            positive = (rows + row_start)[:, None] == (cols + col_start)[None, :]
        return positive

    @triton.jit
    def _log1p_unit(e, ACC: tl.constexpr):
        """log(1 + e) for 0 <= e <= 1, accurate relative to e however small e is.

        fp32: 2 atanh(s) with s = e / (2 + e) <= 1/3, the odd series to s^17 (truncation below
        1e-9 relative): one approximate reciprocal and nine FMAs. (For subnormal e, |u| > 87, the
        relative error grows, but the absolute error stays below 1e-45.) libdevice's logf plus an IEEE
        division cost ~3x the instructions, and in the forward this runs once per pair against
        a d-long dot product (docs/siglip_notes.md). fp64: log with Goldberg's correction.
        """
        if ACC == tl.float64:
            one_plus = 1.0 + e
            exact = one_plus == 1.0
            return tl.where(exact, e, tl.log(one_plus) * (e / tl.where(exact, 1.0, one_plus - 1.0)))
        else:
            s = tl.fdiv(e, 2.0 + e, ieee_rounding=False)
            s2 = s * s
            p = 1.0 / 15.0 + s2 * (1.0 / 17.0)
            p = 1.0 / 13.0 + s2 * p
            p = 1.0 / 11.0 + s2 * p
            p = 1.0 / 9.0 + s2 * p
            p = 1.0 / 7.0 + s2 * p
            p = 1.0 / 5.0 + s2 * p
            p = 1.0 / 3.0 + s2 * p
            p = 1.0 + s2 * p
            return 2.0 * s * p

    @triton.jit
    def softplus(u, ACC: tl.constexpr):
        """log(1 + exp(u)) = max(u, 0) + log1p(exp(-|u|)); NaN in u stays NaN."""
        return tl.maximum(u, 0.0) + _log1p_unit(tl.exp(-tl.abs(u)), ACC)

    @triton.jit
    def sigmoid(u, ACC: tl.constexpr):
        e = tl.exp(-tl.abs(u))
        num = tl.where(u >= 0, 1.0, e)
        if ACC == tl.float64:
            return num / (1.0 + e)
        else:
            return tl.fdiv(num, 1.0 + e, ieee_rounding=False)  # approximate: ~2 ulp, no slow path

    @triton.jit
    def _siglip_fwd_kernel(
        x_ptr, y_ptr, scale_ptr, bias_ptr, gx_ptr, gy_ptr, part_ptr,
        NX, NY, D, sx0, sx1, sy0, sy1, row_start, col_start, col_blocks_per_split,
        HAS_GROUPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
        PREC: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < NX
        t = tl.exp(tl.load(scale_ptr).to(ACC))
        b = tl.load(bias_ptr).to(ACC)
        row_group = rows
        if HAS_GROUPS:
            row_group = tl.load(gx_ptr + rows, mask=row_ok, other=0)
        row_loss = tl.zeros([BLOCK_R], dtype=ACC)
        first = pid_s * col_blocks_per_split
        last = tl.minimum(first + col_blocks_per_split, tl.cdiv(NY, BLOCK_C))
        for cb in range(first, last):
            cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
            col_ok = cols < NY
            logits = t * _pair_dots(x_ptr, y_ptr, rows, cols, row_ok, col_ok, D, sx0, sx1, sy0, sy1,
                                    BLOCK_R, BLOCK_C, BLOCK_D, PREC, ACC, IDX) + b
            positive = _positive_pairs(rows, cols, col_ok, row_start, col_start, row_group, gy_ptr, HAS_GROUPS)
            pair_loss = softplus(tl.where(positive, -logits, logits), ACC)  # -log sigmoid(z S)
            row_loss += tl.sum(tl.where(row_ok[:, None] & col_ok[None, :], pair_loss, 0.0), axis=1)
        tl.store(part_ptr + pid_r * tl.num_programs(1) + pid_s, tl.sum(row_loss, axis=0))

    @triton.jit
    def _siglip_grad_kernel(
        a_ptr, b_ptr, scale_ptr, bias_ptr, gscale_ptr, ga_ptr, gb_ptr, da_ptr, part_ptr,
        NA, NB, D, sa0, sa1, sb0, sb1, sd0, sd1, a_start, b_start,
        HAS_GROUPS: tl.constexpr, PARAM_GRADS: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr,
        PREC: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
    ):
        # dA[rows, outs] = t * gscale * sum_j dlogit[rows, j] * B[j, outs], dlogit = -z sigmoid(-z S):
        # the row pass (A = X) or the column pass (A = Y) of the backward.
        pid_r = tl.program_id(0)
        pid_o = tl.program_id(1)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < NA
        outs = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        out_ok = outs < D
        t = tl.exp(tl.load(scale_ptr).to(ACC))
        b = tl.load(bias_ptr).to(ACC)
        g_scale = tl.load(gscale_ptr).to(ACC)  # upstream gradient times the 1/B normalisation
        row_group = rows
        if HAS_GROUPS:
            row_group = tl.load(ga_ptr + rows, mask=row_ok, other=0)
        da = tl.zeros([BLOCK_R, BLOCK_O], dtype=ACC)
        sum_g_dots = tl.zeros([BLOCK_R], dtype=ACC)
        sum_g = tl.zeros([BLOCK_R], dtype=ACC)
        b_outs = b_ptr + outs.to(IDX)[None, :] * sb1
        for cb in range(0, tl.cdiv(NB, BLOCK_C)):
            cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
            col_ok = cols < NB
            dots = _pair_dots(a_ptr, b_ptr, rows, cols, row_ok, col_ok, D, sa0, sa1, sb0, sb1,
                              BLOCK_R, BLOCK_C, BLOCK_D, PREC, ACC, IDX)
            logits = t * dots + b
            positive = _positive_pairs(rows, cols, col_ok, a_start, b_start, row_group, gb_ptr, HAS_GROUPS)
            sig = sigmoid(tl.where(positive, -logits, logits), ACC)
            # The 1/B stays out of the tile so that fp16 tiles do not underflow; applied below.
            ok = row_ok[:, None] & col_ok[None, :]
            dlogit = tl.where(ok, tl.where(positive, -sig, sig), 0.0)
            if PARAM_GRADS:
                # Masked again: a padded pair's dot is inf * 0 = NaN when its real row holds an inf.
                sum_g_dots += tl.sum(tl.where(ok, dlogit * dots, 0.0), axis=1)
                sum_g += tl.sum(dlogit, axis=1)
            b_tile = tl.load(b_outs + cols.to(IDX)[:, None] * sb0, mask=col_ok[:, None] & out_ok[None, :], other=0.0)
            da = tl.dot(dlogit.to(b_tile.dtype), b_tile, da, input_precision=PREC, out_dtype=ACC)
        da = da * (t * g_scale)
        tl.store(da_ptr + rows.to(IDX)[:, None] * sd0 + outs.to(IDX)[None, :] * sd1, da,
                 mask=row_ok[:, None] & out_ok[None, :])
        if PARAM_GRADS:
            if pid_o == 0:
                tl.store(part_ptr + 2 * pid_r, tl.sum(sum_g_dots, axis=0) * (t * g_scale))  # dt'
                tl.store(part_ptr + 2 * pid_r + 1, tl.sum(sum_g, axis=0) * g_scale)  # db

    @triton.jit
    def _siglip_stripe_grad_kernel(
        x_ptr, y_ptr, g_ptr, part_ptr, scale_ptr, bias_ptr, gx_ptr, gy_ptr,
        NR, NC, D, sx0, sx1, sy0, sy1, row_start, col_start,
        HAS_GROUPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
        PREC: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
    ):
        # One tile of a stripe: <x_i, y_j> by tl.dot (kept in registers, never stored), G = -z sigmoid(-z S)
        # written to the contiguous NR x NC buffer in its dtype (1/B and the upstream gradient left out,
        # as above), and the tile's sums of G <x_i, y_j> and of G for dt' and db. Consecutive programs
        # share a column tile: the stripe's rows of X stay in L2 while Y streams through once.
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        row_ok = rows < NR
        col_ok = cols < NC
        ok = row_ok[:, None] & col_ok[None, :]
        dots = _pair_dots(x_ptr, y_ptr, rows, cols, row_ok, col_ok, D, sx0, sx1, sy0, sy1,
                          BLOCK_R, BLOCK_C, BLOCK_D, PREC, ACC, IDX)
        logits = tl.exp(tl.load(scale_ptr).to(ACC)) * dots + tl.load(bias_ptr).to(ACC)
        row_group = rows
        if HAS_GROUPS:
            row_group = tl.load(gx_ptr + rows, mask=row_ok, other=0)
        positive = _positive_pairs(rows, cols, col_ok, row_start, col_start, row_group, gy_ptr, HAS_GROUPS)
        sig = sigmoid(tl.where(positive, -logits, logits), ACC)
        dlogit = tl.where(ok, tl.where(positive, -sig, sig), 0.0)
        tl.store(g_ptr + rows.to(IDX)[:, None] * NC + cols.to(IDX)[None, :], dlogit.to(g_ptr.dtype.element_ty),
                 mask=ok)
        part = part_ptr + 2 * (pid_r * tl.num_programs(1) + pid_c)
        tl.store(part, tl.sum(tl.sum(tl.where(ok, dlogit * dots, 0.0), axis=1), axis=0))  # see the grad kernel
        tl.store(part + 1, tl.sum(tl.sum(dlogit, axis=1), axis=0))


_KERNELS = "SigLIP kernels"  # for check_interpretable: their tl.dot computes in x's dtype


def triton_block_forward(x, y, logit_scale, logit_bias, row_groups, col_groups, row_start, col_start, loss_scale):
    check_interpretable(x, _KERNELS)
    n_rows, dim = x.shape
    n_cols = y.shape[0]
    cfg = tile_config(n_rows, n_cols, dim, x.dtype, x.device, backward=False)
    row_blocks = cdiv(n_rows, cfg.block_rows)
    per_split = cdiv(cdiv(n_cols, cfg.block_cols), cfg.splits)
    splits = cdiv(cdiv(n_cols, cfg.block_cols), per_split)
    partials = torch.empty((row_blocks, splits), dtype=compute_dtype(x.dtype), device=x.device)
    has_groups = row_groups is not None
    _siglip_fwd_kernel[(row_blocks, splits)](
        x, y, logit_scale, logit_bias, row_groups if has_groups else x, col_groups if has_groups else y, partials,
        n_rows, n_cols, dim, *x.stride(), *y.stride(), row_start, col_start, per_split,
        HAS_GROUPS=has_groups, BLOCK_R=cfg.block_rows, BLOCK_C=cfg.block_cols, BLOCK_D=cfg.block_d,
        PREC=_dot_precision(x.dtype), ACC=acc_dtype(x.dtype), IDX=index_dtype(x, y),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.max_registers,
    )
    # A fixed-order reduction over programs: deterministic run to run.
    return partials.sum() * loss_scale


def _launch_grad_pass(a, b, logit_scale, logit_bias, g_scale, a_groups, b_groups, a_start, b_start, param_grads):
    """dA (float32/float64) and, when param_grads, the per-program (dt', db) partials."""
    check_interpretable(a, _KERNELS)
    n_a, dim = a.shape
    cfg = tile_config(n_a, b.shape[0], dim, a.dtype, a.device, backward=True)
    grid = (cdiv(n_a, cfg.block_rows), cdiv(dim, cfg.block_out))
    da = torch.empty(a.shape, dtype=compute_dtype(a.dtype), device=a.device)
    partials = torch.empty((grid[0], 2) if param_grads else (1, 2), dtype=da.dtype, device=a.device)
    has_groups = a_groups is not None
    _siglip_grad_kernel[grid](
        a, b, logit_scale, logit_bias, g_scale, a_groups if has_groups else a, b_groups if has_groups else b,
        da, partials, n_a, b.shape[0], dim, *a.stride(), *b.stride(), *da.stride(), a_start, b_start,
        HAS_GROUPS=has_groups, PARAM_GRADS=param_grads,
        BLOCK_R=cfg.block_rows, BLOCK_C=cfg.block_cols, BLOCK_D=cfg.block_d, BLOCK_O=cfg.block_out,
        PREC=_dot_precision(a.dtype), ACC=acc_dtype(a.dtype), IDX=index_dtype(a, b, da),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.max_registers,
    )
    return da, partials


def triton_block_backward(grad, x, y, logit_scale, logit_bias, row_groups, col_groups, row_start, col_start,
                           loss_scale):
    g_scale = (grad * loss_scale).to(compute_dtype(x.dtype)).contiguous()
    dx, partials = _launch_grad_pass(x, y, logit_scale, logit_bias, g_scale, row_groups, col_groups,
                                     row_start, col_start, param_grads=True)
    dy, _ = _launch_grad_pass(y, x, logit_scale, logit_bias, g_scale, col_groups, row_groups,
                              col_start, row_start, param_grads=False)
    d_scale = partials[:, 0].sum().to(logit_scale.dtype)
    d_bias = partials[:, 1].sum().to(logit_bias.dtype)
    return dx, dy, d_scale, d_bias


def triton_stripe_grad(x_s, y, logit_scale, logit_bias, row_groups, col_groups, start, stop, row_start,
                        col_start, acc):
    """G (unscaled, in the dtype of x_s) for the stripe x_s against all of y, and its
    (sum G <x, y>, sum G) in ``acc``: one kernel that computes the logits itself."""
    check_interpretable(x_s, _KERNELS)
    n_rows, n_cols = x_s.shape[0], y.shape[0]
    cfg = tile_config(n_rows, n_cols, x_s.shape[1], x_s.dtype, x_s.device, backward=False)
    grid = (cdiv(n_rows, cfg.block_rows), cdiv(n_cols, cfg.block_cols))
    g = torch.empty((n_rows, n_cols), dtype=x_s.dtype, device=x_s.device)
    partials = torch.empty((grid[0] * grid[1], 2), dtype=acc, device=x_s.device)
    has_groups = row_groups is not None
    _siglip_stripe_grad_kernel[grid](
        x_s, y, g, partials, logit_scale, logit_bias, row_groups[start:stop] if has_groups else x_s,
        col_groups if has_groups else y, n_rows, n_cols, x_s.shape[1], *x_s.stride(), *y.stride(),
        row_start + start, col_start,
        HAS_GROUPS=has_groups, BLOCK_R=cfg.block_rows, BLOCK_C=cfg.block_cols, BLOCK_D=cfg.block_d,
        PREC=_dot_precision(x_s.dtype), ACC=acc_dtype(x_s.dtype), IDX=index_dtype(x_s, y, g),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.max_registers,
    )
    return g, partials.sum(dim=0)


# ----------------------------------------------------------------------------------------
# Row stripes, O(stripe * B) memory: the PyTorch path (forward and backward) and the
# stripes backward of the Triton path
# ----------------------------------------------------------------------------------------
def stripe_bounds(n_rows: int, n_cols: int, device: torch.device):
    """(start, stop) of row stripes holding about STRIPE_ELEMENTS logits each."""
    budget = STRIPE_ELEMENTS["cuda" if device.type == "cuda" else "cpu"]
    step = max(1, min(n_rows, budget // max(1, n_cols)))
    if STRIPE_ROW_MULTIPLE < step < n_rows:
        step -= step % STRIPE_ROW_MULTIPLE
    return [(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def _matmul_acc(a: torch.Tensor, b: torch.Tensor, acc_dtype: torch.dtype) -> torch.Tensor:
    """a @ b accumulated and returned in ``acc_dtype``: half operands stay half (tensor cores)."""
    if a.dtype == acc_dtype:
        return a @ b
    return torch.mm(a, b, out_dtype=acc_dtype)


def _torch_positive_pairs(start, stop, n_cols, row_groups, col_groups, row_start, col_start, device):
    if row_groups is not None:
        return row_groups[start:stop, None] == col_groups[None, :]
    rows = torch.arange(start + row_start, stop + row_start, device=device)
    return rows[:, None] == torch.arange(col_start, col_start + n_cols, device=device)[None, :]


def _torch_block_forward(x, y, logit_scale, logit_bias, row_groups, col_groups, row_start, col_start, loss_scale):
    dtype = compute_dtype(x.dtype)
    t, b = logit_scale.to(dtype).exp(), logit_bias.to(dtype)
    y_c = y.to(dtype)
    total = torch.zeros((), dtype=dtype, device=x.device)
    for start, stop in stripe_bounds(x.shape[0], y.shape[0], x.device):
        logits = x[start:stop].to(dtype) @ y_c.T * t + b
        positive = _torch_positive_pairs(start, stop, y.shape[0], row_groups, col_groups, row_start, col_start,
                                         x.device)
        total = total - F.logsigmoid(torch.where(positive, logits, -logits)).sum()
    return total * loss_scale


def _torch_stripe_grad(x_s, y, logit_scale, logit_bias, row_groups, col_groups, start, stop, row_start, col_start,
                       acc):
    """G (unscaled, in the dtype of x_s) for the stripe x_s against all of y, and its
    (sum G <x, y>, sum G) in ``acc``, in torch ops (the logits are a stripe-sized buffer)."""
    dots = _matmul_acc(x_s, y.T, acc)
    logits = dots * logit_scale.to(acc).exp() + logit_bias.to(acc)
    positive = _torch_positive_pairs(start, stop, y.shape[0], row_groups, col_groups, row_start, col_start,
                                     dots.device)
    sig = torch.sigmoid(torch.where(positive, -logits, logits))
    dlogit = torch.where(positive, -sig, sig)
    return dlogit.to(x_s.dtype), torch.stack([(dlogit * dots).sum(), dlogit.sum()])


def stripes_block_backward(grad, x, y, logit_scale, logit_bias, row_groups, col_groups, row_start, col_start,
                            loss_scale, stripe_grad=_torch_stripe_grad):
    """dX = t G Y, dY = t G^T X by row stripes: per stripe G from S = X_s Y^T, then
    dX_s = G Y and dY += G^T X_s (fixed stripe order), all accumulated in float32 (float64).

    On CUDA (and meta, for the compile check) the products take the input dtype (tensor cores,
    fp32 accumulation and output) and G is written in it, as the fused kernel does; elsewhere, and
    on torch releases without ``torch.mm(..., out_dtype=)``, everything runs in the compute dtype.
    1/B, t and the upstream gradient are applied to the sums, so fp16 G cannot underflow.
    dY's update runs over column chunks so that its fp32 product is a bounded temporary.
    """
    acc = compute_dtype(x.dtype)
    half_products = x.device.type in ("cuda", "meta") and _MM_HAS_OUT_DTYPE  # torch.mm(out_dtype=) kernels
    mm_dtype = x.dtype if half_products else acc
    x_m, y_m = x.to(mm_dtype), y.to(mm_dtype)
    dx = torch.empty(x.shape, dtype=acc, device=x.device)
    dy = torch.zeros(y.shape, dtype=acc, device=x.device)
    sums = torch.zeros(2, dtype=acc, device=x.device)  # sum G <x, y>, sum G
    budget = STRIPE_ELEMENTS["cuda" if x.is_cuda else "cpu"]
    chunk = max(1, budget // (DY_CHUNK_FRACTION * x.shape[1]))
    for start, stop in stripe_bounds(x.shape[0], y.shape[0], x.device):
        x_s = x_m[start:stop]
        g, stripe_sums = stripe_grad(x_s, y_m, logit_scale, logit_bias, row_groups, col_groups, start, stop,
                                     row_start, col_start, acc)
        dx[start:stop] = _matmul_acc(g, y_m, acc)
        for c0 in range(0, y.shape[0], chunk):
            dy[c0:c0 + chunk] += _matmul_acc(g[:, c0:c0 + chunk].T, x_s, acc)
        sums += stripe_sums
        del g  # the next stripe's G is allocated before this one would go out of scope
    g_scale = grad.to(acc) * loss_scale
    t_g_scale = logit_scale.to(acc).exp() * g_scale
    return (dx.mul_(t_g_scale), dy.mul_(t_g_scale), (sums[0] * t_g_scale).to(logit_scale.dtype),
            (sums[1] * g_scale).to(logit_bias.dtype))


# ----------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile, with fake (meta) kernels and FLOPs
# ----------------------------------------------------------------------------------------
@torch.library.custom_op("dcformer_kernels::siglip_loss", mutates_args=())
def _siglip_loss_op(x: torch.Tensor, y: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                    row_groups: torch.Tensor | None, col_groups: torch.Tensor | None,
                    row_start: int, col_start: int, loss_scale: float) -> torch.Tensor:
    return triton_block_forward(x, y, logit_scale, logit_bias, row_groups, col_groups, row_start, col_start,
                                 loss_scale)


@_siglip_loss_op.register_fake
def _(x, y, logit_scale, logit_bias, row_groups, col_groups, row_start, col_start, loss_scale):
    return x.new_empty((), dtype=compute_dtype(x.dtype))


@torch.library.custom_op("dcformer_kernels::siglip_loss_backward", mutates_args=())
def _siglip_loss_backward_op(
    grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
    row_groups: torch.Tensor | None, col_groups: torch.Tensor | None, row_start: int, col_start: int,
    loss_scale: float, backward_impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (grad, x, y, logit_scale, logit_bias, row_groups, col_groups, row_start, col_start, loss_scale)
    if backward_impl == "stripes":
        return stripes_block_backward(*args, stripe_grad=triton_stripe_grad)
    return triton_block_backward(*args)


@_siglip_loss_backward_op.register_fake
def _(grad, x, y, logit_scale, logit_bias, row_groups, col_groups, row_start, col_start, loss_scale, backward_impl):
    dtype = compute_dtype(x.dtype)
    return (x.new_empty(x.shape, dtype=dtype), y.new_empty(y.shape, dtype=dtype),
            torch.empty_like(logit_scale), torch.empty_like(logit_bias))


@torch.utils.flop_counter.register_flop_formula(torch.ops.dcformer_kernels.siglip_loss)
def _forward_flops(x_shape, y_shape, *args, out_shape=None, **kwargs) -> int:
    """2*B_x*B_y*d: the X Y^T products (the exp/log per pair is not counted)."""
    return 2 * x_shape[0] * y_shape[0] * x_shape[1]


@torch.utils.flop_counter.register_flop_formula(torch.ops.dcformer_kernels.siglip_loss_backward)
def _backward_flops(grad_shape, x_shape, y_shape, *args, out_shape=None, **kwargs) -> int:
    """4*B_x*B_y*d: dX = t G Y and dY = t G^T X, as for a matmul's backward, for either
    backward_impl. Both also recompute S, which is not model work: the stripes once
    (2*B_x*B_y*d), the fused passes once per output-feature block and pass."""
    return 4 * x_shape[0] * y_shape[0] * x_shape[1]


# ----------------------------------------------------------------------------------------
# Autograd and the functional form
# ----------------------------------------------------------------------------------------
def block_forward(backend: str, *args) -> torch.Tensor:
    """loss_scale * sum over the block's pairs of -log sigmoid(z S) (0-dim, float32/float64)."""
    if backend == "triton":
        return torch.ops.dcformer_kernels.siglip_loss(*args)
    return _torch_block_forward(*args)


def block_backward(backend: str, backward_impl: str, grad, *args):
    """(dx, dy) in float32/float64 and (d logit_scale, d logit_bias) for one block."""
    if backend == "triton":
        return torch.ops.dcformer_kernels.siglip_loss_backward(grad, *args, backward_impl)
    return stripes_block_backward(grad, *args)


def resolve_backward_impl(backward_impl: str, backend: str, dim: int, pairs: int) -> str:
    """Map ``backward_impl`` ("auto" | "fused" | "stripes") to the backward that runs.

    The PyTorch backend has only the stripes form. On the Triton backend "auto" keeps the fused
    row/column kernels up to d = FUSED_BACKWARD_MAX_DIM and FUSED_BACKWARD_MAX_PAIRS pairs per
    block, and takes the stripes beyond either.
    """
    if backward_impl not in BACKWARD_IMPLS:
        raise ValueError(f"backward_impl must be one of {BACKWARD_IMPLS}; got {backward_impl!r}")
    if backend == "torch":
        return "stripes"
    if backward_impl == "auto":
        large = dim > FUSED_BACKWARD_MAX_DIM or pairs > FUSED_BACKWARD_MAX_PAIRS
        return "stripes" if large and _MM_HAS_OUT_DTYPE else "fused"
    return backward_impl


class SigLIPLossFunction(torch.autograd.Function):
    """Autograd over one block of pairs: rows of x against rows of y.

    Positives are pairs with equal group ids, or (without group ids) with equal global index
    row_start + i == col_start + j. col_groups=None with row_groups given means the columns
    carry the rows' ids (one process; Dynamo rejects one tensor passed as two inputs).
    Saves x, y, the two scalars and the group ids only.
    """

    @staticmethod
    def forward(ctx, x, y, logit_scale, logit_bias, row_groups, col_groups, row_start, col_start, loss_scale,
                backend, backward_impl):
        if col_groups is None:
            col_groups = row_groups
        ctx.save_for_backward(x, y, logit_scale, logit_bias, row_groups, col_groups)
        ctx.pairs = (row_start, col_start, loss_scale)
        ctx.backend, ctx.backward_impl = backend, backward_impl
        return block_forward(backend, x, y, logit_scale, logit_bias, row_groups, col_groups,
                              row_start, col_start, loss_scale)

    @staticmethod
    def backward(ctx, grad):
        x, y, logit_scale, logit_bias, row_groups, col_groups = ctx.saved_tensors
        dx, dy, d_scale, d_bias = block_backward(ctx.backend, ctx.backward_impl, grad, x, y, logit_scale,
                                                  logit_bias, row_groups, col_groups, *ctx.pairs)
        return dx.to(x.dtype), dy.to(y.dtype), d_scale, d_bias, None, None, None, None, None, None, None


def siglip_loss(x: torch.Tensor, y: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                group_ids: torch.Tensor | None = None, backend: str = "auto",
                backward_impl: str = "auto") -> torch.Tensor:
    """SigLIP pairwise-sigmoid loss, fused: memory bounded whatever B is (no B x B matrix beyond a
    stripe of at most 2^27 pairs; see ``backward_impl``).

        L = -(1/B) sum_i sum_j log sigmoid(z_ij * (exp(logit_scale) * <x_i, y_j> + logit_bias))

    The sum over all B*B pairs is divided by B (the paper's normalisation), not by B*B.

    Args:
        x, y: (B, d) image and text embeddings, same dtype (float16/bfloat16/float32/float64);
            used as given (normalise them beforehand if the model calls for it).
        logit_scale: 0-dim tensor t'; the temperature is t = exp(t').
        logit_bias: 0-dim tensor b.
        group_ids: optional (B,) int32/int64; every pair with equal ids is positive
            (z_ij = +1). Without it the positives are the diagonal i == j.
        backend: "auto" (Triton on CUDA, the chunked PyTorch path on CPU unless
            TRITON_INTERPRET=1), "triton" or "torch".
        backward_impl: the Triton backend's backward. "fused": row and column kernels that
            recompute logit tiles (O(B d) memory; fast for d <= 256 and B up to ~8k, 7-10x the
            model FLOPs above d = 256). "stripes": row stripes of at most 2^27 pairs (256 MiB of
            bf16 G), S and G computed once per stripe in one kernel and the two products on
            cuBLAS (6 B^2 d FLOPs; ~0.7 GiB beyond inputs and gradients at B = 64k, d = 768,
            by count of its buffers). "auto": fused up to d = 256 and 8192^2 pairs, stripes
            beyond. The PyTorch backend always runs the stripes.

    Returns:
        0-dim loss, float32 (float64 for float64 inputs); products accumulate in float32 (fp64).
        fp32 products are IEEE unless torch.backends.cuda.matmul.allow_tf32 is set.
    """
    check_siglip_args(x, y, logit_scale, logit_bias, group_ids)
    backend = resolve_backend(backend, x.device)
    backward_impl = resolve_backward_impl(backward_impl, backend, x.shape[1], x.shape[0] * y.shape[0])
    return SigLIPLossFunction.apply(x, y, logit_scale, logit_bias, unit_stride(group_ids), None, 0, 0,
                                    1.0 / x.shape[0], backend, backward_impl)


def unit_stride(group_ids: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels index group ids with stride 1."""
    return None if group_ids is None else group_ids.contiguous()
