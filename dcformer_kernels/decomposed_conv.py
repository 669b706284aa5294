"""Fused decomposed depthwise 3D convolution: Triton kernels, autograd and registration.

    y[n,c,o] = b[c] + sum_i wd[c,i] x[n,c, s*od+i-kd//2, s*oh, s*ow]
                    + sum_j wh[c,j] x[n,c, s*od, s*oh+j-kh//2, s*ow]
                    + sum_l ww[c,l] x[n,c, s*od, s*oh, s*ow+l-kw//2]

(zero padding; the PyTorch form is ``reference.decomposed_conv3d_reference``).

Forward: one kernel reads x once and writes y once; the three centre taps share one load. On
CUDA, fp16/bf16 NCDHW inputs with D, H, W >= 16 take tensor-core kernels instead, forward and
backward: each branch is a batched product with the branch's banded matrix
(``TENSOR_CORES``; bench/conv_notes.md).
Backward: one kernel walks the input positions, applies the transposed stencil to the output
gradient to write dx, and in the same pass accumulates per-program fp32 partial sums of
x*g for every tap and of g for the bias; a deterministic ``sum`` over programs finishes
dweight/dbias (no atomics, so two backward runs are bitwise identical). Saved for backward:
x and the three weight vectors only.

Both kernels take arbitrary strides, so NCDHW-contiguous, channels_last_3d and strided views
run without copies of x; outputs keep x's memory format.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.utils.flop_counter
from torch.autograd.function import once_differentiable

from ._dispatch import HAS_TRITON, cdiv, launch_directly, next_power_of_2, resolve_backend, triton_interpreting
from ._dispatch import acc_dtype as _acc_dtype
from ._dispatch import compute_dtype as _compute_dtype
from ._dispatch import index_dtype as _index_dtype
from .reference import decomposed_conv3d_reference

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["decomposed_conv3d", "DecomposedConv3dFunction", "check_decomposed_conv3d_args", "output_size"]

MAX_KERNEL_SIZE = 31
SUPPORTED_STRIDES = (1, 2)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------
def output_size(size: int, kernel_size: int, stride: int) -> int:
    """Length of one output axis, as nn.Conv3d gives with padding kernel_size // 2."""
    return (size + 2 * (kernel_size // 2) - kernel_size) // stride + 1


def check_decomposed_conv3d_args(x, weight_d, weight_h, weight_w, bias, stride) -> None:
    """Raise a TypeError/ValueError naming the argument, the expectation and what came in."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() != 5:
        raise ValueError(f"x must be 5-D (N, C, D, H, W); got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64; got {x.dtype}")
    channels = x.shape[1]
    if channels < 1 or min(x.shape[2:]) < 1:
        raise ValueError(f"x must have C >= 1 and non-empty D, H, W; got shape {tuple(x.shape)}")
    for name, w in (("weight_d", weight_d), ("weight_h", weight_h), ("weight_w", weight_w)):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (C, k); got {type(w).__name__}")
        if w.dim() != 2 or w.shape[0] != channels:
            raise ValueError(f"{name} must have shape (C={channels}, k); got {tuple(w.shape)}")
        k = w.shape[1]
        if k < 1 or k % 2 == 0 or k > MAX_KERNEL_SIZE:
            raise ValueError(f"{name}: kernel size must be odd and in 1..{MAX_KERNEL_SIZE}; got {k}")
        if w.device != x.device:
            raise ValueError(f"{name} is on {w.device} but x is on {x.device}")
        if w.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {w.dtype} but x has dtype {x.dtype}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor of shape (C,) or None; got {type(bias).__name__}")
        if bias.dim() != 1 or bias.shape[0] != channels:
            raise ValueError(f"bias must have shape (C={channels},); got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but x has dtype {x.dtype}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride not in SUPPORTED_STRIDES:
        raise ValueError(f"stride must be one of {SUPPORTED_STRIDES}; got {stride!r}")


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last_3d when C is x's fastest-varying axis, else NCDHW-contiguous."""
    if x.shape[1] > 1 and x.stride(1) < x.stride(4):
        return torch.channels_last_3d
    return torch.contiguous_format


def _output_shape(x, kd, kh, kw, stride):
    n, c, d, h, w = x.shape
    return (n, c, output_size(d, kd, stride), output_size(h, kh, stride), output_size(w, kw, stride))


# ----------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _TileConfig:
    block_c: int  # channels per program
    d_tile: int  # D planes per program
    rows_h: int  # tile rows along H
    cols_w: int  # tile columns along W
    num_warps: int


def _tile_config(x: torch.Tensor, out_h: int, out_w: int, depth: int) -> _TileConfig:
    """A program's block: W-major for NCDHW (vector loads along W), C-major for channels-last.

    Each program computes one block of d_tile x block_c x rows_h x cols_w outputs with no runtime
    loop. The GPU blocks are the best of ``bench.sass_conv --sweep`` (SASS instructions per
    element for sm_90, compiled without a GPU; a model, not a timing): one warp per program, so the
    per-tap weight-gradient sums need no cross-warp reduction (half the backward's instructions
    at 4 warps). ``python -m bench.tune_conv`` times the same candidates on a GPU.
    """
    return _tiles(triton_interpreting(), _memory_format(x) == torch.channels_last_3d, x.shape[1], out_h, out_w, depth)


@functools.lru_cache(maxsize=4096)  # a pure function of the shape: host time per call at small stages
def _tiles(interpreting: bool, channels_last: bool, channels: int, out_h: int, out_w: int, depth: int) -> _TileConfig:
    if interpreting:
        # The interpreter costs ~ms per program and per op: small blocks, and shapes in the tests
        # are chosen so that several blocks and partial blocks occur on every axis.
        block_c, d_tile, rows_h, cols_w, warps = 4, 2, 4, 8, 1
    elif channels_last:
        block_c, d_tile, rows_h, cols_w, warps = min(32, next_power_of_2(channels)), 2, 4, 4, 1
    else:
        cols_w = min(64, next_power_of_2(out_w))
        block_c, d_tile, rows_h, warps = 1, 2, max(1, 256 // cols_w), 1
    return _TileConfig(block_c, min(d_tile, next_power_of_2(depth)), min(rows_h, next_power_of_2(out_h)),
                       min(cols_w, next_power_of_2(out_w)), warps)


if HAS_TRITON:

    @triton.jit
    def _at(ptr, n, c, d, h, w, sn, sc, sd, sh, sw, IDX: tl.constexpr):
        """Pointers to ptr[n, c, d, h, w] for broadcastable index blocks, offsets in IDX."""
        return ptr + n.to(IDX) * sn + c.to(IDX) * sc + d.to(IDX) * sd + (h.to(IDX) * sh + w.to(IDX) * sw)

    @triton.jit
    def _tap_weight(w_ptr, c, c_ok, tap, K: tl.constexpr, ACC: tl.constexpr):
        """Weight ``tap`` of channels c from a row-major (C, K) weight, as ACC."""
        return tl.load(w_ptr + c * K + tap, mask=c_ok, other=0.0).to(ACC)

    @triton.jit
    def _split_pid(pid_s, n_db, n_hb, n_wb):
        """Spatial program id -> (n, block index along D, along H, along W)."""
        wb = pid_s % n_wb
        t = pid_s // n_wb
        hb = t % n_hb
        t = t // n_hb
        return t // n_db, t % n_db, hb, wb

    @triton.jit
    def _block_coords(pid_s, pid_c, n_db, n_hb, n_wb,
                      BLOCK_C: tl.constexpr, DT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr):
        """Program -> n and the block's coordinates, as broadcastable [DT, BLOCK_C, RH*RW] vectors.

        Returns (n, d [DT,1,1], c [1,BLOCK_C,1], h [1,1,S], w [1,1,S]); every per-axis mask is then
        computed on a small vector and broadcast once.
        """
        n, db, hb, wb = _split_pid(pid_s, n_db, n_hb, n_wb)
        d = db * DT + tl.arange(0, DT)[:, None, None]
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)[None, :, None]
        s = tl.arange(0, RH * RW)[None, None, :]
        return n, d, c, hb * RH + s // RW, wb * RW + s % RW

    @triton.jit
    def _direct_forward(x_ptr, wd_ptr, wh_ptr, ww_ptr, b_ptr, y_ptr, n, od, c, oh, ow,
                        C, D, H, W, DO, HO, WO, sxn, sxc, sxd, sxh, sxw, syn, syc, syd, syh, syw,
                        KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr,
                        HAS_BIAS: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr):
        """The stencil on the CUDA cores for one block (coordinates as _block_coords gives them)."""
        c_ok = c < C
        ok = c_ok & (od < DO) & ((oh < HO) & (ow < WO))
        idp = od * STRIDE
        ihp = oh * STRIDE
        iwp = ow * STRIDE
        # Pointers at the centre tap; every other tap is this block plus one scalar offset.
        x0 = _at(x_ptr, n, c, idp, ihp, iwp, sxn, sxc, sxd, sxh, sxw, IDX)
        # The three centre taps read the same element: one load. Their products are added
        # separately (not one summed weight) so Inf/NaN propagate exactly as in the reference.
        xc = tl.load(x0, mask=ok, other=0.0).to(ACC)
        acc = (_tap_weight(wd_ptr, c, c_ok, KD // 2, KD, ACC) * xc
               + _tap_weight(wh_ptr, c, c_ok, KH // 2, KH, ACC) * xc
               + _tap_weight(ww_ptr, c, c_ok, KW // 2, KW, ACC) * xc)
        for i in tl.static_range(KD):
            if i != KD // 2:
                pos = idp + (i - KD // 2)
                xv = tl.load(x0 + tl.cast(i - KD // 2, IDX) * sxd, mask=ok & ((pos >= 0) & (pos < D)), other=0.0)
                acc += _tap_weight(wd_ptr, c, c_ok, i, KD, ACC) * xv.to(ACC)
        for j in tl.static_range(KH):
            if j != KH // 2:
                pos = ihp + (j - KH // 2)
                xv = tl.load(x0 + tl.cast(j - KH // 2, IDX) * sxh, mask=ok & ((pos >= 0) & (pos < H)), other=0.0)
                acc += _tap_weight(wh_ptr, c, c_ok, j, KH, ACC) * xv.to(ACC)
        for l in tl.static_range(KW):
            if l != KW // 2:
                pos = iwp + (l - KW // 2)
                xv = tl.load(x0 + tl.cast(l - KW // 2, IDX) * sxw, mask=ok & ((pos >= 0) & (pos < W)), other=0.0)
                acc += _tap_weight(ww_ptr, c, c_ok, l, KW, ACC) * xv.to(ACC)
        if HAS_BIAS:
            acc += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(ACC)
        y0 = _at(y_ptr, n, c, od, oh, ow, syn, syc, syd, syh, syw, IDX)
        tl.store(y0, acc.to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _decomposed_conv3d_fwd_kernel(
        x_ptr, wd_ptr, wh_ptr, ww_ptr, b_ptr, y_ptr,
        C, D, H, W, DO, HO, WO,
        sxn, sxc, sxd, sxh, sxw,
        syn, syc, syd, syh, syw,
        n_db, n_hb, n_wb,
        KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr,
        HAS_BIAS: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
        BLOCK_C: tl.constexpr, DT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
    ):
        n, od, c, oh, ow = _block_coords(tl.program_id(0), tl.program_id(1), n_db, n_hb, n_wb, BLOCK_C, DT, RH, RW)
        _direct_forward(x_ptr, wd_ptr, wh_ptr, ww_ptr, b_ptr, y_ptr, n, od, c, oh, ow,
                        C, D, H, W, DO, HO, WO, sxn, sxc, sxd, sxh, sxw, syn, syc, syd, syh, syw,
                        KD, KH, KW, STRIDE, HAS_BIAS, ACC, IDX)

    @triton.jit
    def _x_rows_w_halo(xn, c3, d0, h0, w0, C, D, H, W, sxc, sxd, sxh, sxw, T: tl.constexpr, KPW: tl.constexpr,
                       W_HALO: tl.constexpr, KW: tl.constexpr, IDX: tl.constexpr):
        """x over the cube's rows (d, h) and the W axis from w0 - W_HALO to w0 + T + KW//2:
        [BC, T*T, KPW], 0 outside the volume and past the halo."""
        r = tl.arange(0, T * T)[None, :, None]
        d, h, w = d0 + r // T, h0 + r % T, w0 - W_HALO + tl.arange(0, KPW)[None, None, :]
        return tl.load(xn + c3.to(IDX) * sxc + d.to(IDX) * sxd + h.to(IDX) * sxh + w.to(IDX) * sxw,
                       mask=(c3 < C) & (d < D) & (h < H) & (w >= 0) & (w < W) & (w < w0 + T + KW // 2),
                       other=0.0)

    @triton.jit
    def _x_planes_h_halo(xn, c3, d0, h0, w0, C, D, H, W, sxc, sxd, sxh, sxw,
                         T: tl.constexpr, KPH: tl.constexpr, KH: tl.constexpr, IDX: tl.constexpr):
        """x over the cube's planes d, the H axis from h0 - KH//2, the cube's columns w: [BC, T, KPH, T]."""
        c4 = c3[:, :, :, None]
        t_m = tl.arange(0, T)
        d = d0 + t_m[None, :, None, None]
        h = h0 - KH // 2 + tl.arange(0, KPH)[None, None, :, None]
        w = w0 + t_m[None, None, None, :]
        return tl.load(xn + c4.to(IDX) * sxc + d.to(IDX) * sxd + h.to(IDX) * sxh + w.to(IDX) * sxw,
                       mask=(c4 < C) & (d < D) & (h >= 0) & (h < H) & (h < h0 + T + KH // 2) & (w < W), other=0.0)

    @triton.jit
    def _x_d_halo_columns(xn, c3, d0, h0, w0, C, D, H, W, sxc, sxd, sxh, sxw,
                          T: tl.constexpr, KPD: tl.constexpr, KD: tl.constexpr, IDX: tl.constexpr):
        """x over the D axis from d0 - KD//2 and the cube's columns (h, w): [BC, KPD, T*T]."""
        s = tl.arange(0, T * T)[None, None, :]
        d = d0 - KD // 2 + tl.arange(0, KPD)[None, :, None]
        h, w = h0 + s // T, w0 + s % T
        return tl.load(xn + c3.to(IDX) * sxc + d.to(IDX) * sxd + h.to(IDX) * sxh + w.to(IDX) * sxw,
                       mask=(c3 < C) & (d >= 0) & (d < D) & (d < d0 + T + KD // 2) & (h < H) & (w < W), other=0.0)

    @triton.jit
    def _band(w_ptr, c, tap, C, K: tl.constexpr):
        """Banded (Toeplitz) matrix of one branch: entry w[c, tap] where 0 <= tap < K, else 0."""
        return tl.load(w_ptr + c * K + tap, mask=(c < C) & (tap >= 0) & (tap < K), other=0.0)

    @triton.jit
    def _decomposed_conv3d_tc_fwd_kernel(
        x_ptr, wd_ptr, wh_ptr, ww_ptr, b_ptr, y_ptr,
        C, D, H, W,
        sxn, sxc, sxd, sxh, sxw,
        syn, syc, syd, syh, syw,
        n_db, n_hb, n_wb,
        KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        HAS_BIAS: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr, PREC: tl.constexpr,
        BLOCK_C: tl.constexpr, T: tl.constexpr, KPD: tl.constexpr, KPH: tl.constexpr, KPW: tl.constexpr,
        W_HALO: tl.constexpr, RECOMPUTE: tl.constexpr,
    ):
        # Stride 1. A program owns BLOCK_C channels x a T x T x T cube (T = 16) and computes each
        # branch as a batched matrix product on the tensor cores with the branch's banded matrix:
        #   W: X[c, (d,h), w' halo] @ Bw[c, w', w]        (batch c)
        #   H: Bh[c, h, h'] @ X[c, d, h' halo, w]         (batch (c, d))
        #   D: Bd[c, d, d'] @ X[c, d' halo, (h,w)]        (batch c)
        # The band's zeros multiply every halo element, so a non-finite x would turn other outputs
        # into NaN: blocks whose result is not finite are recomputed by the direct stencil, which
        # propagates Inf/NaN exactly as the reference does. The test is the sum of the cube's results
        # (outputs outside the volume are finite: their loads are masked to 0): NaN or Inf there
        # means a non-finite value somewhere (or an overflow: recomputed too, correctly). The host
        # always passes RECOMPUTE=True; False leaves the (cold) recompute out of the code, only for
        # counting the fast path's instructions (bench/sass_conv.py). The W halo starts
        # W_HALO >= KW//2 columns before the cube, so NCDHW rows load from aligned addresses.
        pid_s = tl.program_id(0)
        n, db, hb, wb = _split_pid(pid_s, n_db, n_hb, n_wb)
        d0, h0, w0 = db * T, hb * T, wb * T
        c0 = tl.program_id(1) * BLOCK_C
        xn = x_ptr + n.to(IDX) * sxn
        c3 = c0 + tl.arange(0, BLOCK_C)[:, None, None]  # [BC, 1, 1]
        t_m = tl.arange(0, T)
        # W branch: rows r = (d, h) of the cube, columns k of the halo'd W axis.
        a_w = _x_rows_w_halo(xn, c3, d0, h0, w0, C, D, H, W, sxc, sxd, sxh, sxw, T, KPW, W_HALO, KW, IDX)
        band_w = _band(ww_ptr, c3, tl.arange(0, KPW)[None, :, None] - t_m[None, None, :] - (W_HALO - KW // 2), C,
                       KW)  # [BC, KPW, T]
        acc = tl.dot(a_w, band_w.to(a_w.dtype), input_precision=PREC, out_dtype=ACC)  # [BC, T*T, T]
        # H branch: batch (c, d); the band [BC, T, KPH] is shared by the T planes.
        kh_ = tl.arange(0, KPH)
        band_h = _band(wh_ptr, c3, kh_[None, None, :] - t_m[None, :, None], C, KH)  # [BC, T, KPH]
        band_h = tl.reshape(tl.broadcast_to(band_h[:, None, :, :], [BLOCK_C, T, T, KPH]), [BLOCK_C * T, T, KPH])
        b_h = _x_planes_h_halo(xn, c3, d0, h0, w0, C, D, H, W, sxc, sxd, sxh, sxw, T, KPH, KH, IDX)
        y_h = tl.dot(band_h.to(b_h.dtype), tl.reshape(b_h, [BLOCK_C * T, KPH, T]), input_precision=PREC,
                     out_dtype=ACC)  # [BC*T, T, T]
        acc += tl.reshape(y_h, [BLOCK_C, T * T, T])
        # D branch: columns s = (h, w) of the cube.
        kd_ = tl.arange(0, KPD)
        band_d = _band(wd_ptr, c3, kd_[None, None, :] - t_m[None, :, None], C, KD)  # [BC, T, KPD]
        b_d = _x_d_halo_columns(xn, c3, d0, h0, w0, C, D, H, W, sxc, sxd, sxh, sxw, T, KPD, KD, IDX)
        y_d = tl.dot(band_d.to(b_d.dtype), b_d, input_precision=PREC, out_dtype=ACC)  # [BC, T, T*T]
        acc += tl.reshape(y_d, [BLOCK_C, T * T, T])
        if HAS_BIAS:
            acc += tl.load(b_ptr + c3, mask=c3 < C, other=0.0).to(ACC)
        # Output rows r = (d, h), columns w.
        r = tl.arange(0, T * T)[None, :, None]
        da, ha, wo = d0 + r // T, h0 + r % T, w0 + t_m[None, None, :]
        ok = (c3 < C) & (da < D) & (ha < H) & (wo < W)
        finite = tl.abs(tl.sum(tl.sum(tl.sum(acc, axis=2), axis=1), axis=0)) < float("inf")
        y0 = _at(y_ptr, n, c3, da, ha, wo, syn, syc, syd, syh, syw, IDX)
        if RECOMPUTE:
            if finite:
                tl.store(y0, acc.to(y_ptr.dtype.element_ty), mask=ok)
            else:
                s1 = tl.arange(0, T * T)[None, None, :]
                _direct_forward(x_ptr, wd_ptr, wh_ptr, ww_ptr, b_ptr, y_ptr, n,
                                d0 + tl.arange(0, T)[:, None, None], c0 + tl.arange(0, BLOCK_C)[None, :, None],
                                h0 + s1 // T, w0 + s1 % T, C, D, H, W, D, H, W, sxn, sxc, sxd, sxh, sxw,
                                syn, syc, syd, syh, syw, KD, KH, KW, 1, HAS_BIAS, ACC, IDX)
        else:
            tl.store(y0, acc.to(y_ptr.dtype.element_ty), mask=ok & finite)  # counting only: the same test

    @triton.jit
    def _diagonal_sums(part, prod, valid_rows, C, ch_ok, OFFSET: tl.constexpr, K: tl.constexpr):
        """Store part[tap] = sum of prod[c, m, q] over q - m == OFFSET + tap, rows m where valid_rows."""
        m = tl.arange(0, prod.shape[1])[None, :, None]
        q = tl.arange(0, prod.shape[2])[None, None, :]
        for tap in tl.static_range(K):
            on_diagonal = (q - m == OFFSET + tap) & valid_rows
            tl.store(part + tap * C, tl.sum(tl.sum(tl.where(on_diagonal, prod, 0.0), axis=2), axis=1), mask=ch_ok)

    @triton.jit
    def _decomposed_conv3d_tc_dweight_kernel(
        x_ptr, g_ptr, part_ptr,
        C, D, H, W,
        sxn, sxc, sxd, sxh, sxw,
        sgn, sgc, sgd, sgh, sgw,
        n_db, n_hb, n_wb,
        KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
        PREC: tl.constexpr, BLOCK_C: tl.constexpr, T: tl.constexpr, KPD: tl.constexpr, KPH: tl.constexpr,
        KPW: tl.constexpr, W_HALO: tl.constexpr,
    ):
        # Stride 1. Weight and bias gradients of one 16-cube (the tensor-core forward's blocks) as
        # products on the tensor cores: for the W branch P[c, w, w'] = sum over the cube's rows of
        # g[c, row, w] x[c, row, w' in halo], and dweight_w[c, l] is the sum of P's diagonal
        # w' - w = l - KW//2 (rows w inside the volume only: outside, g is 0 but x may be Inf);
        # H and D alike. Partials (P, KD+KH+KW+1, C) as in the direct backward.
        pid_s = tl.program_id(0)
        n, db, hb, wb = _split_pid(pid_s, n_db, n_hb, n_wb)
        d0, h0, w0 = db * T, hb * T, wb * T
        c0 = tl.program_id(1) * BLOCK_C
        xn = x_ptr + n.to(IDX) * sxn
        c3 = c0 + tl.arange(0, BLOCK_C)[:, None, None]
        ch = c0 + tl.arange(0, BLOCK_C)
        part = part_ptr + pid_s.to(tl.int64) * ((KD + KH + KW + 1) * C) + ch
        t_m = tl.arange(0, T)
        # The cube of g as rows (d, h) x columns w.
        r = tl.arange(0, T * T)[None, :, None]
        dr, hr, wr = d0 + r // T, h0 + r % T, w0 + t_m[None, None, :]
        g_cube = tl.load(_at(g_ptr, n, c3, dr, hr, wr, sgn, sgc, sgd, sgh, sgw, IDX),
                         mask=(c3 < C) & (dr < D) & (hr < H) & (wr < W), other=0.0)
        tl.store(part + (KD + KH + KW) * C, tl.sum(tl.sum(g_cube.to(ACC), axis=2), axis=1), mask=ch < C)
        # W branch.
        a_w = _x_rows_w_halo(xn, c3, d0, h0, w0, C, D, H, W, sxc, sxd, sxh, sxw, T, KPW, W_HALO, KW, IDX)
        p_w = tl.dot(tl.trans(g_cube, (0, 2, 1)), a_w, input_precision=PREC, out_dtype=ACC)  # [BC, T, KPW]
        _diagonal_sums(part + (KD + KH) * C, p_w, w0 + t_m[None, :, None] < W, C, ch < C, W_HALO - KW // 2, KW)
        # H branch: batch (c, d), summed over d afterwards.
        b_h = _x_planes_h_halo(xn, c3, d0, h0, w0, C, D, H, W, sxc, sxd, sxh, sxw, T, KPH, KH, IDX)
        p_h = tl.dot(tl.reshape(g_cube, [BLOCK_C * T, T, T]),
                     tl.trans(tl.reshape(b_h, [BLOCK_C * T, KPH, T]), (0, 2, 1)),
                     input_precision=PREC, out_dtype=ACC)  # [BC*T, T(h), KPH]
        p_h = tl.sum(tl.reshape(p_h, [BLOCK_C, T, T, KPH]), axis=1)
        _diagonal_sums(part + KD * C, p_h, h0 + t_m[None, :, None] < H, C, ch < C, 0, KH)
        # D branch: columns s = (h, w).
        b_d = _x_d_halo_columns(xn, c3, d0, h0, w0, C, D, H, W, sxc, sxd, sxh, sxw, T, KPD, KD, IDX)
        p_d = tl.dot(tl.reshape(g_cube, [BLOCK_C, T, T * T]), tl.trans(b_d, (0, 2, 1)),
                     input_precision=PREC, out_dtype=ACC)  # [BC, T(d), KPD]
        _diagonal_sums(part, p_d, d0 + t_m[None, :, None] < D, C, ch < C, 0, KD)

    @triton.jit
    def _grad_tap(g_centre, g_rest, pos, sg, n_out, ok_rest, SHIFT: tl.constexpr, STRIDE: tl.constexpr,
                  IDX: tl.constexpr):
        """(g, reached) at the output that reaches input position pos through a tap, SHIFT = k//2 - tap.

        Along this axis the output index is (pos + SHIFT) / STRIDE where that divides; g_centre
        points at the stride-1 output at pos, g_rest at the output with this axis' offset left out.
        ``reached`` is False where no output exists: g is 0 there, and x * g must be left out, not
        added as 0 (x may be Inf).
        """
        t = pos + SHIFT
        if STRIDE == 1:
            m = ok_rest & ((t >= 0) & (t < n_out))
            return tl.load(g_centre + tl.cast(SHIFT, IDX) * sg, mask=m, other=0.0), m
        else:
            m = ok_rest & ((t >= 0) & (t % STRIDE == 0) & (t // STRIDE < n_out))
            return tl.load(g_rest + (t // STRIDE).to(IDX) * sg, mask=m, other=0.0), m

    @triton.jit
    def _tap_sum(v):
        """[DT, BLOCK_C, S] -> [BLOCK_C]: the sum over the block's positions."""
        return tl.sum(tl.sum(v, axis=2), axis=0)

    @triton.jit
    def _masked_product(x, g, reached, EXACT: tl.constexpr):
        """x * g, and 0 where the tap reaches no output if EXACT (x may hold Inf or NaN there)."""
        if EXACT:
            return tl.where(reached, x * g, 0.0)
        else:
            return x * g

    @triton.jit
    def _axis_taps(dx, xv, g0, g_rest, pos, sg, n_out, ok_rest, w_ptr, c, c_ok, part, part_ok, C,
                   K: tl.constexpr, STRIDE: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
                   EXACT: tl.constexpr):
        """One branch's off-centre taps: their terms of dx (returned) and their partials of sum x * g
        (stored at part + tap * C); pos, sg and n_out are the branch axis' position, grad stride and
        output size, g_rest and ok_rest the grad pointer and mask with that axis left out."""
        for j in tl.static_range(K):
            if j != K // 2:
                gv, m = _grad_tap(g0, g_rest, pos, sg, n_out, ok_rest, K // 2 - j, STRIDE, IDX)
                gv = gv.to(ACC)
                dx += _tap_weight(w_ptr, c, c_ok, j, K, ACC) * gv
                tl.store(part + j * C, _tap_sum(_masked_product(xv, gv, m, EXACT)), mask=part_ok)
        return dx

    @triton.jit
    def _bwd_taps(xv, g0, g_c, g_d, g_hw, wd_ptr, wh_ptr, ww_ptr, part, part_ok, c, c_ok, ok, d_on, hw_on,
                  d, h, w, C, DO, HO, WO, sgd, sgh, sgw,
                  KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, ACC: tl.constexpr,
                  IDX: tl.constexpr, EXACT: tl.constexpr):
        """dx of the block (returned) and the per-tap partials of sum x * g (stored)."""
        centre = ok & d_on & hw_on
        gv = tl.load(g0, mask=centre, other=0.0).to(ACC)
        dx = (_tap_weight(wd_ptr, c, c_ok, KD // 2, KD, ACC) * gv
              + _tap_weight(wh_ptr, c, c_ok, KH // 2, KH, ACC) * gv
              + _tap_weight(ww_ptr, c, c_ok, KW // 2, KW, ACC) * gv)
        xg = _tap_sum(_masked_product(xv, gv, centre, EXACT))
        tl.store(part + (KD // 2) * C, xg, mask=part_ok)
        tl.store(part + (KD + KH // 2) * C, xg, mask=part_ok)
        tl.store(part + (KD + KH + KW // 2) * C, xg, mask=part_ok)
        tl.store(part + (KD + KH + KW) * C, _tap_sum(gv), mask=part_ok)
        dx = _axis_taps(dx, xv, g0, g_c + g_hw, d, sgd, DO, ok & hw_on, wd_ptr, c, c_ok, part, part_ok, C,
                        KD, STRIDE, ACC, IDX, EXACT)
        dx = _axis_taps(dx, xv, g0, g_c + g_d + (w // STRIDE).to(IDX) * sgw, h, sgh, HO,
                        ok & d_on & ((w % STRIDE) == 0), wh_ptr, c, c_ok, part + KD * C, part_ok, C,
                        KH, STRIDE, ACC, IDX, EXACT)
        dx = _axis_taps(dx, xv, g0, g_c + g_d + (h // STRIDE).to(IDX) * sgh, w, sgw, WO,
                        ok & d_on & ((h % STRIDE) == 0), ww_ptr, c, c_ok, part + (KD + KH) * C, part_ok, C,
                        KW, STRIDE, ACC, IDX, EXACT)
        return dx

    @triton.jit
    def _decomposed_conv3d_bwd_kernel(
        x_ptr, g_ptr, wd_ptr, wh_ptr, ww_ptr, dx_ptr, part_ptr,
        C, D, H, W, DO, HO, WO,
        sxn, sxc, sxd, sxh, sxw,
        sgn, sgc, sgd, sgh, sgw,
        sdn, sdc, sdd, sdh, sdw,
        n_db, n_hb, n_wb,
        KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr,
        ACC: tl.constexpr, IDX: tl.constexpr,
        BLOCK_C: tl.constexpr, DT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr, EXACT_BLOCKS: tl.constexpr,
    ):
        # Blocks cover INPUT positions p. The output gradient reaches p through tap i of a branch
        # from output o with s*o = p + k//2 - i on that branch's axis and s*o = p on the others.
        # Per-program partials (P, KD+KH+KW+1, C): sum over the block of x*g for every tap, then
        # sum of g (the bias); one writer per element, reduced in a fixed order on the host.
        pid_s = tl.program_id(0)
        n, d, c, h, w = _block_coords(pid_s, tl.program_id(1), n_db, n_hb, n_wb, BLOCK_C, DT, RH, RW)
        c_ok = c < C
        ok = c_ok & (d < D) & ((h < H) & (w < W))
        d_on = (d % STRIDE) == 0  # p is on the output grid along D
        hw_on = ((h % STRIDE) == 0) & ((w % STRIDE) == 0)
        g_c = g_ptr + n.to(IDX) * sgn + c.to(IDX) * sgc
        g_d = (d // STRIDE).to(IDX) * sgd
        g_hw = (h // STRIDE).to(IDX) * sgh + (w // STRIDE).to(IDX) * sgw
        g0 = g_c + g_d + g_hw
        x0 = _at(x_ptr, n, c, d, h, w, sxn, sxc, sxd, sxh, sxw, IDX)
        part = part_ptr + pid_s.to(tl.int64) * ((KD + KH + KW + 1) * C) + tl.arange(0, BLOCK_C) + \
            tl.program_id(1) * BLOCK_C
        part_ok = tl.arange(0, BLOCK_C) + tl.program_id(1) * BLOCK_C < C
        xv = tl.load(x0, mask=ok, other=0.0).to(ACC)
        # x * g must not enter a weight gradient where a tap reaches no output (g is loaded as 0
        # there, and Inf * 0 is NaN where the reference has no term): blocks holding a non-finite x
        # mask every product; the others (nearly all) skip those selects.
        n_nonfinite = tl.sum(tl.sum(tl.sum(tl.where(tl.abs(xv) < float("inf"), 0, 1), axis=2), axis=1), axis=0)
        # (The host always passes EXACT_BLOCKS=True; False compiles the common path alone, only for
        # counting its instructions, bench/sass_conv.py.)
        if EXACT_BLOCKS:
            if n_nonfinite == 0:
                dx = _bwd_taps(xv, g0, g_c, g_d, g_hw, wd_ptr, wh_ptr, ww_ptr, part, part_ok, c, c_ok, ok, d_on,
                               hw_on, d, h, w, C, DO, HO, WO, sgd, sgh, sgw, KD, KH, KW, STRIDE, ACC, IDX, False)
            else:
                dx = _bwd_taps(xv, g0, g_c, g_d, g_hw, wd_ptr, wh_ptr, ww_ptr, part, part_ok, c, c_ok, ok, d_on,
                               hw_on, d, h, w, C, DO, HO, WO, sgd, sgh, sgw, KD, KH, KW, STRIDE, ACC, IDX, True)
        else:
            dx = _bwd_taps(xv, g0, g_c, g_d, g_hw, wd_ptr, wh_ptr, ww_ptr, part, part_ok, c, c_ok, ok, d_on,
                           hw_on, d, h, w, C, DO, HO, WO, sgd, sgh, sgw, KD, KH, KW, STRIDE, ACC, IDX, False)
            ok = ok & (n_nonfinite == 0)  # counting only: keeps the test in the count
        dx0 = _at(dx_ptr, n, c, d, h, w, sdn, sdc, sdd, sdh, sdw, IDX)
        tl.store(dx0, dx.to(dx_ptr.dtype.element_ty), mask=ok)


    @triton.jit
    def _weight_grads_kernel(part_ptr, P, C, wd_ptr, wh_ptr, ww_ptr, b_ptr,
                             KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, N_COLS: tl.constexpr,
                             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
        """Column sums of per-program partials (P, N_COLS, C) in a fixed order, stored as the (C, k)
        weight gradients and, where N_COLS = KD + KH + KW + 1, the bias gradient, in their dtype."""
        col = tl.program_id(0)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        rows = tl.arange(0, BLOCK_P)
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        for p0 in range(0, P, BLOCK_P):
            p = (p0 + rows).to(tl.int64)
            acc += tl.load(part_ptr + (p[:, None] * N_COLS + col) * C + c[None, :],
                           mask=(p < P)[:, None] & c_ok[None, :], other=0.0)
        total = tl.sum(acc, axis=0)
        if col < KD:
            tl.store(wd_ptr + c * KD + col, total.to(wd_ptr.dtype.element_ty), mask=c_ok)
        elif col < KD + KH:
            tl.store(wh_ptr + c * KH + (col - KD), total.to(wh_ptr.dtype.element_ty), mask=c_ok)
        elif col < KD + KH + KW:
            tl.store(ww_ptr + c * KW + (col - KD - KH), total.to(ww_ptr.dtype.element_ty), mask=c_ok)
        else:
            tl.store(b_ptr + c, total.to(b_ptr.dtype.element_ty), mask=c_ok)


def _grid(n: int, depth: int, rows: int, cols: int, channels: int, cfg: _TileConfig):
    n_db = cdiv(depth, cfg.d_tile)
    n_hb = cdiv(rows, cfg.rows_h)
    n_wb = cdiv(cols, cfg.cols_w)
    return (n * n_db * n_hb * n_wb, cdiv(channels, cfg.block_c)), (n_db, n_hb, n_wb)


def _block_kwargs(cfg: _TileConfig) -> dict:
    return dict(BLOCK_C=cfg.block_c, DT=cfg.d_tile, RH=cfg.rows_h, RW=cfg.cols_w, num_warps=cfg.num_warps)


def _row_major(*weights: torch.Tensor) -> list[torch.Tensor]:
    """The (C, k) weights as the kernels index them, c * k + tap (a no-op for parameters)."""
    return [w.contiguous() for w in weights]


# Forward and backward on the tensor cores (banded matrix products, _decomposed_conv3d_tc_*):
# "auto" = CUDA, float16/bfloat16, NCDHW, stride 1 and D, H, W >= TC_CUBE; "always" wherever the
# shape allows (also channels-last and float32/float64, the latter in IEEE precision: how the CPU
# tests run it); "never". Channels-last stays on the CUDA cores under "auto": its blocks hold two
# channels, so every load reads 4 of a 32-byte sector (bench/conv_notes.md). Not yet timed on a GPU.
TENSOR_CORES = "auto"
TC_CUBE = 16


def _use_tensor_cores(x: torch.Tensor, stride: int) -> bool:
    if TENSOR_CORES not in ("auto", "always", "never"):
        raise ValueError(f"TENSOR_CORES must be 'auto', 'always' or 'never'; got {TENSOR_CORES!r}")
    if TENSOR_CORES == "never" or stride != 1 or min(x.shape[2:]) < TC_CUBE:
        return False
    if TENSOR_CORES == "always":
        return True
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
            and _memory_format(x) == torch.contiguous_format)


def _tc_launch(x, kd, kh, kw):
    """Grid and the shared constexprs of the tensor-core kernels for input x (2 channels x a 16-cube)."""
    n, c, d, h, w = x.shape
    block_c = 2
    # NCDHW: start the W halo a multiple of 8 columns early, so rows are 16-byte aligned loads.
    w_halo = kw // 2 if _memory_format(x) == torch.channels_last_3d else -(-(kw // 2) // 8) * 8
    n_db, n_hb, n_wb = (cdiv(size, TC_CUBE) for size in (d, h, w))
    grid = (n * n_db * n_hb * n_wb, cdiv(c, block_c))
    meta = dict(KD=kd, KH=kh, KW=kw, ACC=_acc_dtype(x.dtype),
                PREC="ieee" if x.dtype in (torch.float32, torch.float64) else "tf32", BLOCK_C=block_c, T=TC_CUBE,
                KPD=next_power_of_2(TC_CUBE + kd - 1), KPH=next_power_of_2(TC_CUBE + kh - 1),
                KPW=next_power_of_2(TC_CUBE + w_halo + kw // 2), W_HALO=w_halo, num_warps=4)
    return grid, (n_db, n_hb, n_wb), meta


def _triton_tc_forward(x, weights, bias, y):
    n, c, d, h, w = x.shape
    grid, blocks, meta = _tc_launch(x, *(t.shape[1] for t in weights))
    _decomposed_conv3d_tc_fwd_kernel[grid](
        x, *weights, bias.contiguous() if bias is not None else x, y,
        c, d, h, w, *x.stride(), *y.stride(), *blocks,
        HAS_BIAS=bias is not None, IDX=_index_dtype(x, y), RECOMPUTE=True, **meta,
    )
    return y


def _triton_tc_backward(grad, x, weights, dx):
    """dx = the forward of grad with the kernels reversed (the transposed stencil of a stride-1
    zero-padded conv); weight and bias gradients from the tensor-core dweight kernel."""
    n, c, d, h, w = x.shape
    _triton_tc_forward(grad, [t.flip(1).contiguous() for t in weights], None, dx)
    grid, blocks, meta = _tc_launch(x, *(t.shape[1] for t in weights))
    partials = torch.empty((grid[0], sum(t.shape[1] for t in weights) + 1, c), dtype=_compute_dtype(x.dtype),
                           device=x.device)
    _decomposed_conv3d_tc_dweight_kernel[grid](
        x, grad, partials, c, d, h, w, *x.stride(), *grad.stride(), *blocks, IDX=_index_dtype(x, grad), **meta)
    return partials


def _triton_forward(x, weight_d, weight_h, weight_w, bias, stride):
    kd, kh, kw = weight_d.shape[1], weight_h.shape[1], weight_w.shape[1]
    shape = _output_shape(x, kd, kh, kw, stride)
    y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    if y.numel() == 0:
        return y
    if _use_tensor_cores(x, stride):
        return _triton_tc_forward(x, _row_major(weight_d, weight_h, weight_w), bias, y)
    n, c, d, h, w = x.shape
    _, _, do, ho, wo = shape
    cfg = _tile_config(x, ho, wo, do)
    grid, (n_db, n_hb, n_wb) = _grid(n, do, ho, wo, c, cfg)
    _decomposed_conv3d_fwd_kernel[grid](
        x, *_row_major(weight_d, weight_h, weight_w), bias.contiguous() if bias is not None else x, y,
        c, d, h, w, do, ho, wo,
        *x.stride(), *y.stride(),
        n_db, n_hb, n_wb,
        KD=kd, KH=kh, KW=kw, STRIDE=stride, HAS_BIAS=bias is not None,
        ACC=_acc_dtype(x.dtype), IDX=_index_dtype(x, y), **_block_kwargs(cfg),
    )
    return y


def _triton_backward(grad, x, weight_d, weight_h, weight_w, stride):
    kd, kh, kw = weight_d.shape[1], weight_h.shape[1], weight_w.shape[1]
    n, c, d, h, w = x.shape
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    acc_dtype = _compute_dtype(x.dtype)
    if x.numel() == 0:
        zeros = [torch.zeros_like(t) for t in (weight_d, weight_h, weight_w)]
        return dx.zero_(), *zeros, torch.zeros(c, dtype=x.dtype, device=x.device)
    if _use_tensor_cores(x, stride):
        partials = _triton_tc_backward(grad, x, _row_major(weight_d, weight_h, weight_w), dx)
    else:
        _, _, do, ho, wo = grad.shape
        cfg = _tile_config(x, h, w, d)
        grid, (n_db, n_hb, n_wb) = _grid(n, d, h, w, c, cfg)
        partials = torch.empty((grid[0], kd + kh + kw + 1, c), dtype=acc_dtype, device=x.device)
        _decomposed_conv3d_bwd_kernel[grid](
            x, grad, *_row_major(weight_d, weight_h, weight_w), dx, partials,
            c, d, h, w, do, ho, wo,
            *x.stride(), *grad.stride(), *dx.stride(),
            n_db, n_hb, n_wb,
            KD=kd, KH=kh, KW=kw, STRIDE=stride,
            ACC=_acc_dtype(x.dtype), IDX=_index_dtype(x, grad, dx), EXACT_BLOCKS=True, **_block_kwargs(cfg),
        )
    return dx, *_weight_grads(partials, (kd, kh, kw), x.dtype)


def _weight_grads(partials: torch.Tensor, taps, dtype: torch.dtype) -> list[torch.Tensor]:
    """The (C, k) weight gradients (and the (C,) bias gradient where partials has a column for
    it) from per-program partials (P, n_cols, C): one launch, a fixed-order sum (deterministic)."""
    n_programs, n_cols, c = partials.shape
    kd, kh, kw = taps
    grads = [torch.empty((c, k), dtype=dtype, device=partials.device) for k in taps]
    if n_cols > kd + kh + kw:
        grads.append(torch.empty(c, dtype=dtype, device=partials.device))
    block_c = min(32, next_power_of_2(c))
    # Only n_cols x C/block_c programs: each streams 4096-element tiles (16 KB of fp32) per step.
    block_p = 8 if triton_interpreting() else 4096 // block_c
    _weight_grads_kernel[(n_cols, cdiv(c, block_c))](
        partials, n_programs, c, *grads[:3], grads[-1], KD=kd, KH=kh, KW=kw, N_COLS=n_cols,
        BLOCK_P=block_p, BLOCK_C=block_c, ACC=_acc_dtype(partials.dtype), num_warps=4)
    return grads


# ----------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile, with fake (meta) kernels and FLOPs
# ----------------------------------------------------------------------------------------
@torch.library.custom_op("dcformer_kernels::decomposed_conv3d", mutates_args=())
def _decomposed_conv3d_op(x: torch.Tensor, weight_d: torch.Tensor, weight_h: torch.Tensor,
                          weight_w: torch.Tensor, bias: torch.Tensor | None, stride: int) -> torch.Tensor:
    check_decomposed_conv3d_args(x, weight_d, weight_h, weight_w, bias, stride)  # the op is public too
    return _triton_forward(x, weight_d, weight_h, weight_w, bias, stride)


@_decomposed_conv3d_op.register_fake
def _(x, weight_d, weight_h, weight_w, bias, stride):
    shape = _output_shape(x, weight_d.shape[1], weight_h.shape[1], weight_w.shape[1], stride)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))


@torch.library.custom_op("dcformer_kernels::decomposed_conv3d_backward", mutates_args=())
def _decomposed_conv3d_backward_op(
    grad: torch.Tensor, x: torch.Tensor, weight_d: torch.Tensor, weight_h: torch.Tensor,
    weight_w: torch.Tensor, stride: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_decomposed_conv3d_args(x, weight_d, weight_h, weight_w, None, stride)
    expected = _output_shape(x, weight_d.shape[1], weight_h.shape[1], weight_w.shape[1], stride)
    if tuple(grad.shape) != expected or grad.dtype != x.dtype or grad.device != x.device:
        raise ValueError(f"grad must have the output's shape {expected}, x's dtype {x.dtype} and device "
                         f"{x.device}; got {tuple(grad.shape)}, {grad.dtype}, {grad.device}")
    return _triton_backward(grad, x, weight_d, weight_h, weight_w, stride)


@_decomposed_conv3d_backward_op.register_fake
def _(grad, x, weight_d, weight_h, weight_w, stride):
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    return (dx, torch.empty_like(weight_d), torch.empty_like(weight_h), torch.empty_like(weight_w),
            x.new_empty(x.shape[1]))


def _taps(*weights) -> int:
    return sum(w.shape[1] for w in weights)


@torch.utils.flop_counter.register_flop_formula(torch.ops.dcformer_kernels.decomposed_conv3d)
def _forward_flops(x_shape, wd_shape, wh_shape, ww_shape, bias_shape, stride, *args, out_shape=None, **kwargs) -> int:
    """2 FLOPs per multiply-add: 2*(kd+kh+kw) per output element (bias adds not counted)."""
    return 2 * (wd_shape[1] + wh_shape[1] + ww_shape[1]) * _numel(out_shape)


@torch.utils.flop_counter.register_flop_formula(torch.ops.dcformer_kernels.decomposed_conv3d_backward)
def _backward_flops(grad_shape, x_shape, wd_shape, wh_shape, ww_shape, stride, *args, out_shape=None, **kwargs) -> int:
    """dx and dweight each cost one multiply-add per tap per output element, as for nn.Conv3d."""
    return 2 * 2 * (wd_shape[1] + wh_shape[1] + ww_shape[1]) * _numel(grad_shape)


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def fvcore_op_handles() -> dict:
    """fvcore ``FlopCountAnalysis.set_op_handle`` entries; fvcore counts one per multiply-add.

    A JIT trace records the fused op as the autograd.Function (``prim::PythonOp.<name>``), or as
    the registered op when the op is called directly; both are handled.
    """

    def handle(inputs, outputs):
        taps = sum(inputs[i].type().sizes()[1] for i in (1, 2, 3))
        return taps * _numel(outputs[0].type().sizes())

    return {"dcformer_kernels::decomposed_conv3d": handle,
            "prim::PythonOp.DecomposedConv3dFunction": handle}


# ----------------------------------------------------------------------------------------
# Autograd and the functional form
# ----------------------------------------------------------------------------------------
class DecomposedConv3dFunction(torch.autograd.Function):
    """Autograd over the Triton kernels; saves x and the three weight vectors only.

    Plain eager calls launch the kernels directly; under torch.compile, torch.jit.trace or a
    dispatch mode (FlopCounterMode, FakeTensorMode, ...) they go through the registered ops
    (``_dispatch.launch_directly``).
    """

    @staticmethod
    def forward(ctx, x, weight_d, weight_h, weight_w, bias, stride):
        check_decomposed_conv3d_args(x, weight_d, weight_h, weight_w, bias, stride)  # also public
        ctx.save_for_backward(x, weight_d, weight_h, weight_w)
        ctx.stride = stride
        ctx.has_bias = bias is not None
        if launch_directly(x):
            return _triton_forward(x, weight_d, weight_h, weight_w, bias, stride)
        return torch.ops.dcformer_kernels.decomposed_conv3d(x, weight_d, weight_h, weight_w, bias, stride)

    @staticmethod
    @once_differentiable  # the kernels' gradients have no graph: a second derivative raises
    def backward(ctx, grad):
        x, weight_d, weight_h, weight_w = ctx.saved_tensors
        if launch_directly(x):
            dx, dwd, dwh, dww, db = _triton_backward(grad, x, weight_d, weight_h, weight_w, ctx.stride)
        else:
            dx, dwd, dwh, dww, db = torch.ops.dcformer_kernels.decomposed_conv3d_backward(
                grad, x, weight_d, weight_h, weight_w, ctx.stride)
        return dx, dwd, dwh, dww, (db if ctx.has_bias else None), None


def decomposed_conv3d(x: torch.Tensor, weight_d: torch.Tensor, weight_h: torch.Tensor, weight_w: torch.Tensor,
                      bias: torch.Tensor | None = None, stride: int = 1, backend: str = "auto") -> torch.Tensor:
    """Depthwise decomposed 3D convolution (DCFormer): three 1D depthwise convs summed.

    Args:
        x: (N, C, D, H, W), float16/bfloat16/float32/float64, NCDHW or channels_last_3d.
        weight_d, weight_h, weight_w: (C, k) per-channel 1D kernels along D, H and W; k odd, 1..31.
        bias: (C,) or None.
        stride: 1 or 2, applied to all three axes of every branch (as nn.Conv3d does).
        backend: "auto" (Triton on CUDA, PyTorch on CPU unless TRITON_INTERPRET=1),
            "triton" or "torch".

    Returns:
        (N, C, D', H', W') with D' = (D - 1) // stride + 1 etc., in x's memory format.
    """
    if not isinstance(x, torch.Tensor) or resolve_backend(backend, x.device) == "torch":
        check_decomposed_conv3d_args(x, weight_d, weight_h, weight_w, bias, stride)
        return decomposed_conv3d_reference(x, weight_d, weight_h, weight_w, bias, stride)
    return DecomposedConv3dFunction.apply(x, weight_d, weight_h, weight_w, bias, stride)  # checks them too
