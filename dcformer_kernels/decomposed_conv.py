"""Fused decomposed depthwise 3D convolution: Triton kernels, autograd and registration.

    y[n,c,o] = b[c] + sum_i wd[c,i] x[n,c, s*od+i-kd//2, s*oh, s*ow]
                    + sum_j wh[c,j] x[n,c, s*od, s*oh+j-kh//2, s*ow]
                    + sum_l ww[c,l] x[n,c, s*od, s*oh, s*ow+l-kw//2]

(zero padding; the PyTorch form is ``reference.decomposed_conv3d_reference``).

Forward: one kernel reads x once and writes y once; the three centre taps share one load. On
CUDA, fp16/bf16 NCDHW inputs with D, H, W >= 16 take tensor-core kernels instead, forward and
backward: each branch is a batched product with the branch's banded matrix
(``impl``; docs/conv_notes.md).
Backward: one kernel walks the input positions, applies the transposed stencil to the output
gradient to write dx, and in the same pass accumulates per-program fp32 partial sums of
x*g for every tap and of g for the bias; a deterministic ``sum`` over programs finishes
dweight/dbias (no atomics, so two backward runs are bitwise identical). Saved for backward:
x and the three weight vectors only.

Both kernels take arbitrary strides, so NCDHW-contiguous, channels_last_3d and strided views
run without copies of x; outputs keep x's memory format.

Inf and NaN propagate as through ``F.conv3d``, whose zero padding is data (the op equals zero-
padding x, then convolving without padding): a non-finite weight times the padding is NaN in y,
an Inf gradient times the padding NaN in the weight gradient of the taps that read it, and a tap
that reaches no output adds nothing to dx or to its weight gradient (tests/kernels/test_edge_cases.py).
"""
from __future__ import annotations

import torch
import torch.utils.flop_counter
from torch.autograd.function import once_differentiable

from .dispatch import (HAS_TRITON, acc_dtype, cdiv, check_interpretable, compute_dtype, index_dtype, launch_directly,
                        next_power_of_2, resolve_backend)
from .conv_common import (TileConfig, at, block_coords, block_kwargs, block_sum, check_decomposed_conv3d_args,
                          conv_grid, memory_format, numel, output_shape, row_major, split_pid, tap_weight,
                          tile_config, weight_grads)
from .reference import decomposed_conv3d_reference

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["decomposed_conv3d", "DecomposedConv3dFunction", "decomposed_conv3d_forward", "decomposed_conv3d_backward",
           "use_tensor_cores", "IMPLS", "TC_CUBE"]


if HAS_TRITON:

    @triton.jit
    def _outside_term(term, inside, SKIP_OUTSIDE: tl.constexpr):
        """A tap's product, or 0 where its position lies outside the volume if SKIP_OUTSIDE."""
        if SKIP_OUTSIDE:
            return tl.where(inside, term, 0.0)
        else:
            return term

    @triton.jit
    def _direct_forward(x_ptr, wd_ptr, wh_ptr, ww_ptr, b_ptr, y_ptr, n, od, c, oh, ow,
                        C, D, H, W, DO, HO, WO, sxn, sxc, sxd, sxh, sxw, syn, syc, syd, syh, syw,
                        KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr,
                        HAS_BIAS: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr, SKIP_OUTSIDE: tl.constexpr):
        """The stencil on the CUDA cores for one block (coordinates as block_coords gives them).

        A tap outside the volume reads the zero padding (w * 0: NaN for a non-finite weight, as in
        F.conv3d), except with SKIP_OUTSIDE, for dx as the transposed conv of g: there no output
        exists, so the term is left out (F.conv3d's input gradient has none either)."""
        c_ok = c < C
        ok = c_ok & (od < DO) & ((oh < HO) & (ow < WO))
        idp = od * STRIDE
        ihp = oh * STRIDE
        iwp = ow * STRIDE
        # Pointers at the centre tap; every other tap is this block plus one scalar offset.
        x0 = at(x_ptr, n, c, idp, ihp, iwp, sxn, sxc, sxd, sxh, sxw, IDX)
        # The three centre taps read the same element: one load. Their products are added
        # separately (not one summed weight) so Inf/NaN propagate exactly as in the reference.
        xc = tl.load(x0, mask=ok, other=0.0).to(ACC)
        acc = (tap_weight(wd_ptr, c, c_ok, KD // 2, KD, ACC) * xc
               + tap_weight(wh_ptr, c, c_ok, KH // 2, KH, ACC) * xc
               + tap_weight(ww_ptr, c, c_ok, KW // 2, KW, ACC) * xc)
        for i in tl.static_range(KD):
            if i != KD // 2:
                pos = idp + (i - KD // 2)
                inside = ok & ((pos >= 0) & (pos < D))
                xv = tl.load(x0 + tl.cast(i - KD // 2, IDX) * sxd, mask=inside, other=0.0)
                acc += _outside_term(tap_weight(wd_ptr, c, c_ok, i, KD, ACC) * xv.to(ACC), inside, SKIP_OUTSIDE)
        for j in tl.static_range(KH):
            if j != KH // 2:
                pos = ihp + (j - KH // 2)
                inside = ok & ((pos >= 0) & (pos < H))
                xv = tl.load(x0 + tl.cast(j - KH // 2, IDX) * sxh, mask=inside, other=0.0)
                acc += _outside_term(tap_weight(wh_ptr, c, c_ok, j, KH, ACC) * xv.to(ACC), inside, SKIP_OUTSIDE)
        for l in tl.static_range(KW):
            if l != KW // 2:
                pos = iwp + (l - KW // 2)
                inside = ok & ((pos >= 0) & (pos < W))
                xv = tl.load(x0 + tl.cast(l - KW // 2, IDX) * sxw, mask=inside, other=0.0)
                acc += _outside_term(tap_weight(ww_ptr, c, c_ok, l, KW, ACC) * xv.to(ACC), inside, SKIP_OUTSIDE)
        if HAS_BIAS:
            acc += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(ACC)
        y0 = at(y_ptr, n, c, od, oh, ow, syn, syc, syd, syh, syw, IDX)
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
        n, od, c, oh, ow = block_coords(tl.program_id(0), tl.program_id(1), n_db, n_hb, n_wb, BLOCK_C, DT, RH, RW)
        _direct_forward(x_ptr, wd_ptr, wh_ptr, ww_ptr, b_ptr, y_ptr, n, od, c, oh, ow,
                        C, D, H, W, DO, HO, WO, sxn, sxc, sxd, sxh, sxw, syn, syc, syd, syh, syw,
                        KD, KH, KW, STRIDE, HAS_BIAS, ACC, IDX, False)

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
        W_HALO: tl.constexpr, RECOMPUTE: tl.constexpr, TRANSPOSED: tl.constexpr,
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
        # always passes RECOMPUTE=True; RECOMPUTE is instrumentation: False leaves the (cold) recompute
        # out of the code, only for counting the fast path's instructions (bench/static/sass_conv.py). The W halo starts
        # W_HALO >= KW//2 columns before the cube, so NCDHW rows load from aligned addresses.
        # TRANSPOSED: this is dx = the transposed conv of g (backward); the recompute then leaves
        # out the taps outside the volume instead of multiplying the padding (see _direct_forward).
        pid_s = tl.program_id(0)
        n, db, hb, wb = split_pid(pid_s, n_db, n_hb, n_wb)
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
        y0 = at(y_ptr, n, c3, da, ha, wo, syn, syc, syd, syh, syw, IDX)
        if RECOMPUTE:
            if finite:
                tl.store(y0, acc.to(y_ptr.dtype.element_ty), mask=ok)
            else:
                s1 = tl.arange(0, T * T)[None, None, :]
                _direct_forward(x_ptr, wd_ptr, wh_ptr, ww_ptr, b_ptr, y_ptr, n,
                                d0 + tl.arange(0, T)[:, None, None], c0 + tl.arange(0, BLOCK_C)[None, :, None],
                                h0 + s1 // T, w0 + s1 % T, C, D, H, W, D, H, W, sxn, sxc, sxd, sxh, sxw,
                                syn, syc, syd, syh, syw, KD, KH, KW, 1, HAS_BIAS, ACC, IDX, TRANSPOSED)
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
        n, db, hb, wb = split_pid(pid_s, n_db, n_hb, n_wb)
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
        g_cube = tl.load(at(g_ptr, n, c3, dr, hr, wr, sgn, sgc, sgd, sgh, sgw, IDX),
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
    def _reached(v, reached, EXACT: tl.constexpr):
        """A tap's product v (x * g or w * g), and 0 where the tap reaches no output if EXACT: g is
        loaded as 0 there, so v is Inf * 0 = NaN for a non-finite x or w where F.conv3d has no term."""
        if EXACT:
            return tl.where(reached, v, 0.0)
        else:
            return v

    @triton.jit
    def _axis_taps(dx, xv, g0, g_rest, pos, sg, n_in, n_out, ok_rest, g_centre, centre, w_ptr, c, c_ok, part,
                   part_ok, C, K: tl.constexpr, STRIDE: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
                   EXACT: tl.constexpr):
        """One branch's off-centre taps: their terms of dx (returned) and their partials of sum x * g
        (stored at part + tap * C); pos, sg, n_in and n_out are the branch axis' position, grad stride,
        input and output size, g_rest and ok_rest the grad pointer and mask with that axis left out,
        g_centre the gradient of the output centred at pos (where ``centre``).

        EXACT follows F.conv3d's IEEE arithmetic for non-finite values: terms of taps that reach no
        output are left out (_reached), and a tap of an output that reads the zero padding adds
        g * 0 to its weight gradient (NaN where g is not finite). The block walks input positions
        only, so those padding terms are added at the output's own centre position."""
        for j in tl.static_range(K):
            if j != K // 2:
                gv, m = _grad_tap(g0, g_rest, pos, sg, n_out, ok_rest, K // 2 - j, STRIDE, IDX)
                gv = gv.to(ACC)
                dx += _reached(tap_weight(w_ptr, c, c_ok, j, K, ACC) * gv, m, EXACT)
                xg = _reached(xv * gv, m, EXACT)
                if EXACT:
                    read = pos + (j - K // 2)  # the input this tap of the output at pos reads
                    xg += tl.where(centre & ((read < 0) | (read >= n_in)), g_centre * 0.0, 0.0)
                tl.store(part + j * C, block_sum(xg), mask=part_ok)
        return dx

    @triton.jit
    def _bwd_taps(xv, g0, g_c, g_d, g_hw, wd_ptr, wh_ptr, ww_ptr, part, part_ok, c, c_ok, ok, d_on, hw_on,
                  d, h, w, C, D, H, W, DO, HO, WO, sgd, sgh, sgw,
                  KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, ACC: tl.constexpr,
                  IDX: tl.constexpr, EXACT: tl.constexpr):
        """dx of the block and the centre taps' partial of sum x * g (returned), and the per-tap
        partials of sum x * g (stored); EXACT: see _axis_taps."""
        centre = ok & d_on & hw_on
        gv = tl.load(g0, mask=centre, other=0.0).to(ACC)
        dx = _reached(tap_weight(wd_ptr, c, c_ok, KD // 2, KD, ACC) * gv
                      + tap_weight(wh_ptr, c, c_ok, KH // 2, KH, ACC) * gv
                      + tap_weight(ww_ptr, c, c_ok, KW // 2, KW, ACC) * gv, centre, EXACT)
        xg = block_sum(_reached(xv * gv, centre, EXACT))
        tl.store(part + (KD // 2) * C, xg, mask=part_ok)
        tl.store(part + (KD + KH // 2) * C, xg, mask=part_ok)
        tl.store(part + (KD + KH + KW // 2) * C, xg, mask=part_ok)
        tl.store(part + (KD + KH + KW) * C, block_sum(gv), mask=part_ok)
        dx = _axis_taps(dx, xv, g0, g_c + g_hw, d, sgd, D, DO, ok & hw_on, gv, centre, wd_ptr, c, c_ok, part,
                        part_ok, C, KD, STRIDE, ACC, IDX, EXACT)
        dx = _axis_taps(dx, xv, g0, g_c + g_d + (w // STRIDE).to(IDX) * sgw, h, sgh, H, HO,
                        ok & d_on & ((w % STRIDE) == 0), gv, centre, wh_ptr, c, c_ok, part + KD * C, part_ok, C,
                        KH, STRIDE, ACC, IDX, EXACT)
        dx = _axis_taps(dx, xv, g0, g_c + g_d + (h // STRIDE).to(IDX) * sgh, w, sgw, W, WO,
                        ok & d_on & ((h % STRIDE) == 0), gv, centre, ww_ptr, c, c_ok, part + (KD + KH) * C, part_ok,
                        C, KW, STRIDE, ACC, IDX, EXACT)
        return dx, xg

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
        n, d, c, h, w = block_coords(pid_s, tl.program_id(1), n_db, n_hb, n_wb, BLOCK_C, DT, RH, RW)
        c_ok = c < C
        ok = c_ok & (d < D) & ((h < H) & (w < W))
        d_on = (d % STRIDE) == 0  # p is on the output grid along D
        hw_on = ((h % STRIDE) == 0) & ((w % STRIDE) == 0)
        g_c = g_ptr + n.to(IDX) * sgn + c.to(IDX) * sgc
        g_d = (d // STRIDE).to(IDX) * sgd
        g_hw = (h // STRIDE).to(IDX) * sgh + (w // STRIDE).to(IDX) * sgw
        g0 = g_c + g_d + g_hw
        x0 = at(x_ptr, n, c, d, h, w, sxn, sxc, sxd, sxh, sxw, IDX)
        part = part_ptr + pid_s.to(tl.int64) * ((KD + KH + KW + 1) * C) + tl.arange(0, BLOCK_C) + \
            tl.program_id(1) * BLOCK_C
        part_ok = tl.arange(0, BLOCK_C) + tl.program_id(1) * BLOCK_C < C
        xv = tl.load(x0, mask=ok, other=0.0).to(ACC)
        dx, xg = _bwd_taps(xv, g0, g_c, g_d, g_hw, wd_ptr, wh_ptr, ww_ptr, part, part_ok, c, c_ok, ok, d_on,
                           hw_on, d, h, w, C, D, H, W, DO, HO, WO, sgd, sgh, sgw, KD, KH, KW, STRIDE, ACC, IDX, False)
        # Blocks holding a non-finite x, g or weight are redone EXACT (see _axis_taps), overwriting
        # their partials; the others (nearly all) skip its selects. The test costs one sum: a
        # non-finite x or g makes the centre taps' partial xg non-finite (every position enters it,
        # x * 0 off the output grid), a non-finite weight makes dx non-finite (times a masked-out
        # g: NaN). An overflow to Inf in these sums only redoes the block, to the same result.
        finite = (tl.abs(xg) < float("inf")) & (tl.abs(block_sum(dx)) < float("inf"))
        n_nonfinite = tl.sum(tl.where(finite, 0, 1), axis=0)
        # EXACT_BLOCKS is instrumentation: the host always passes True; False compiles the common
        # path alone, only for counting its instructions (bench/static/sass_conv.py).
        if EXACT_BLOCKS:
            if n_nonfinite > 0:
                dx, xg = _bwd_taps(xv, g0, g_c, g_d, g_hw, wd_ptr, wh_ptr, ww_ptr, part, part_ok, c, c_ok, ok, d_on,
                                   hw_on, d, h, w, C, D, H, W, DO, HO, WO, sgd, sgh, sgw, KD, KH, KW, STRIDE, ACC,
                                   IDX, True)
        else:
            ok = ok & (n_nonfinite == 0)  # counting only: keeps the test in the count
        dx0 = at(dx_ptr, n, c, d, h, w, sdn, sdc, sdd, sdh, sdw, IDX)
        tl.store(dx0, dx.to(dx_ptr.dtype.element_ty), mask=ok)


# Which kernels: "auto" = the tensor cores (banded matrix products, _decomposed_conv3d_tc_*) on CUDA
# for float16/bfloat16 NCDHW, stride 1 and D, H, W >= TC_CUBE, else the direct (CUDA-core) stencil;
# "tensor_cores" wherever the shape allows (also channels-last and float32/float64, the latter in
# IEEE precision: how the CPU tests run it; bfloat16 raises there, dispatch.check_interpretable);
# "direct" always the stencil. Channels-last stays direct under "auto": its tensor-core blocks hold
# two channels, so every load reads 4 of a 32-byte sector (docs/conv_notes.md).
IMPLS = ("auto", "tensor_cores", "direct")
TC_CUBE = 16


def check_impl(impl) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")


def use_tensor_cores(x: torch.Tensor, stride: int, impl: str = "auto") -> bool:
    """True where ``impl`` runs x on the tensor-core kernels (see IMPLS above)."""
    check_impl(impl)
    if impl == "direct" or stride != 1 or min(x.shape[2:]) < TC_CUBE:
        return False
    if impl == "tensor_cores":
        return True
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
            and memory_format(x) == torch.contiguous_format)


def _tc_launch(x, kd, kh, kw):
    """Grid and the shared constexprs of the tensor-core kernels for input x (2 channels x a 16-cube)."""
    check_interpretable(x, "tensor-core conv kernels (impl='tensor_cores')")
    n, c, d, h, w = x.shape
    block_c = 2
    # NCDHW: start the W halo a multiple of 8 columns early, so rows are 16-byte aligned loads.
    w_halo = kw // 2 if memory_format(x) == torch.channels_last_3d else -(-(kw // 2) // 8) * 8
    n_db, n_hb, n_wb = (cdiv(size, TC_CUBE) for size in (d, h, w))
    grid = (n * n_db * n_hb * n_wb, cdiv(c, block_c))
    meta = dict(KD=kd, KH=kh, KW=kw, ACC=acc_dtype(x.dtype),
                PREC="ieee" if x.dtype in (torch.float32, torch.float64) else "tf32", BLOCK_C=block_c, T=TC_CUBE,
                KPD=next_power_of_2(TC_CUBE + kd - 1), KPH=next_power_of_2(TC_CUBE + kh - 1),
                KPW=next_power_of_2(TC_CUBE + w_halo + kw // 2), W_HALO=w_halo, num_warps=4)
    return grid, (n_db, n_hb, n_wb), meta


def _triton_tc_forward(x, weights, bias, y, transposed: bool = False):
    """y = the conv of x on the tensor cores; ``transposed``: x is the output gradient and this is dx."""
    n, c, d, h, w = x.shape
    grid, blocks, meta = _tc_launch(x, *(t.shape[1] for t in weights))
    _decomposed_conv3d_tc_fwd_kernel[grid](
        x, *weights, bias.contiguous() if bias is not None else x, y,
        c, d, h, w, *x.stride(), *y.stride(), *blocks,
        HAS_BIAS=bias is not None, IDX=index_dtype(x, y), RECOMPUTE=True, TRANSPOSED=transposed, **meta,
    )
    return y


def _triton_tc_backward(grad, x, weights, dx):
    """dx = the forward of grad with the kernels reversed (the transposed stencil of a stride-1
    zero-padded conv); weight and bias gradients from the tensor-core dweight kernel."""
    n, c, d, h, w = x.shape
    _triton_tc_forward(grad, [t.flip(1).contiguous() for t in weights], None, dx, transposed=True)
    grid, blocks, meta = _tc_launch(x, *(t.shape[1] for t in weights))
    partials = torch.empty((grid[0], sum(t.shape[1] for t in weights) + 1, c), dtype=compute_dtype(x.dtype),
                           device=x.device)
    _decomposed_conv3d_tc_dweight_kernel[grid](
        x, grad, partials, c, d, h, w, *x.stride(), *grad.stride(), *blocks, IDX=index_dtype(x, grad), **meta)
    return partials


def decomposed_conv3d_forward(x, weight_d, weight_h, weight_w, bias, stride: int, impl: str = "auto",
                              tiles: TileConfig | None = None) -> torch.Tensor:
    """Launch the forward kernels (no checks, no autograd): y in x's memory format. ``tiles``
    overrides the direct kernel's blocks (bench/tune/conv.py, bench/static/sass_conv.py)."""
    kd, kh, kw = weight_d.shape[1], weight_h.shape[1], weight_w.shape[1]
    shape = output_shape(x, kd, kh, kw, stride)
    y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    if y.numel() == 0:
        return y
    if use_tensor_cores(x, stride, impl):
        return _triton_tc_forward(x, row_major(weight_d, weight_h, weight_w), bias, y)
    n, c, d, h, w = x.shape
    _, _, do, ho, wo = shape
    cfg = tiles or tile_config(x, ho, wo, do)
    grid, (n_db, n_hb, n_wb) = conv_grid(n, do, ho, wo, c, cfg)
    _decomposed_conv3d_fwd_kernel[grid](
        x, *row_major(weight_d, weight_h, weight_w), bias.contiguous() if bias is not None else x, y,
        c, d, h, w, do, ho, wo,
        *x.stride(), *y.stride(),
        n_db, n_hb, n_wb,
        KD=kd, KH=kh, KW=kw, STRIDE=stride, HAS_BIAS=bias is not None,
        ACC=acc_dtype(x.dtype), IDX=index_dtype(x, y), **block_kwargs(cfg),
    )
    return y


def decomposed_conv3d_backward(grad, x, weight_d, weight_h, weight_w, stride: int, impl: str = "auto",
                               tiles: TileConfig | None = None) -> tuple[torch.Tensor, ...]:
    """Launch the backward kernels (no checks): dx, the three weight gradients and the bias gradient."""
    kd, kh, kw = weight_d.shape[1], weight_h.shape[1], weight_w.shape[1]
    n, c, d, h, w = x.shape
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    if x.numel() == 0:
        zeros = [torch.zeros_like(t) for t in (weight_d, weight_h, weight_w)]
        return dx.zero_(), *zeros, torch.zeros(c, dtype=x.dtype, device=x.device)
    if use_tensor_cores(x, stride, impl):
        partials = _triton_tc_backward(grad, x, row_major(weight_d, weight_h, weight_w), dx)
    else:
        _, _, do, ho, wo = grad.shape
        cfg = tiles or tile_config(x, h, w, d)
        grid, (n_db, n_hb, n_wb) = conv_grid(n, d, h, w, c, cfg)
        partials = torch.empty((grid[0], kd + kh + kw + 1, c), dtype=compute_dtype(x.dtype), device=x.device)
        _decomposed_conv3d_bwd_kernel[grid](
            x, grad, *row_major(weight_d, weight_h, weight_w), dx, partials,
            c, d, h, w, do, ho, wo,
            *x.stride(), *grad.stride(), *dx.stride(),
            n_db, n_hb, n_wb,
            KD=kd, KH=kh, KW=kw, STRIDE=stride,
            ACC=acc_dtype(x.dtype), IDX=index_dtype(x, grad, dx), EXACT_BLOCKS=True, **block_kwargs(cfg),
        )
    return dx, *weight_grads(partials, (kd, kh, kw), x.dtype)


# ----------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile, with fake (meta) kernels and FLOPs
# ----------------------------------------------------------------------------------------
@torch.library.custom_op("dcformer_kernels::decomposed_conv3d", mutates_args=())
def _decomposed_conv3d_op(x: torch.Tensor, weight_d: torch.Tensor, weight_h: torch.Tensor,
                          weight_w: torch.Tensor, bias: torch.Tensor | None, stride: int,
                          impl: str = "auto") -> torch.Tensor:
    check_decomposed_conv3d_args(x, weight_d, weight_h, weight_w, bias, stride)  # the op is public too
    check_impl(impl)
    return decomposed_conv3d_forward(x, weight_d, weight_h, weight_w, bias, stride, impl)


@_decomposed_conv3d_op.register_fake
def _(x, weight_d, weight_h, weight_w, bias, stride, impl="auto"):
    shape = output_shape(x, weight_d.shape[1], weight_h.shape[1], weight_w.shape[1], stride)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))


@torch.library.custom_op("dcformer_kernels::decomposed_conv3d_backward", mutates_args=())
def _decomposed_conv3d_backward_op(
    grad: torch.Tensor, x: torch.Tensor, weight_d: torch.Tensor, weight_h: torch.Tensor,
    weight_w: torch.Tensor, stride: int, impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_decomposed_conv3d_args(x, weight_d, weight_h, weight_w, None, stride)
    check_impl(impl)
    expected = output_shape(x, weight_d.shape[1], weight_h.shape[1], weight_w.shape[1], stride)
    if tuple(grad.shape) != expected or grad.dtype != x.dtype or grad.device != x.device:
        raise ValueError(f"grad must have the output's shape {expected}, x's dtype {x.dtype} and device "
                         f"{x.device}; got {tuple(grad.shape)}, {grad.dtype}, {grad.device}")
    return decomposed_conv3d_backward(grad, x, weight_d, weight_h, weight_w, stride, impl)


@_decomposed_conv3d_backward_op.register_fake
def _(grad, x, weight_d, weight_h, weight_w, stride, impl="auto"):
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    return (dx, torch.empty_like(weight_d), torch.empty_like(weight_h), torch.empty_like(weight_w),
            x.new_empty(x.shape[1]))


@torch.utils.flop_counter.register_flop_formula(torch.ops.dcformer_kernels.decomposed_conv3d)
def _forward_flops(x_shape, wd_shape, wh_shape, ww_shape, bias_shape, stride, *args, out_shape=None, **kwargs) -> int:
    """2 FLOPs per multiply-add: 2*(kd+kh+kw) per output element (bias adds not counted)."""
    return 2 * (wd_shape[1] + wh_shape[1] + ww_shape[1]) * numel(out_shape)


@torch.utils.flop_counter.register_flop_formula(torch.ops.dcformer_kernels.decomposed_conv3d_backward)
def _backward_flops(grad_shape, x_shape, wd_shape, wh_shape, ww_shape, stride, *args, out_shape=None, **kwargs) -> int:
    """dx and dweight each cost one multiply-add per tap per output element, as for nn.Conv3d."""
    return 2 * 2 * (wd_shape[1] + wh_shape[1] + ww_shape[1]) * numel(grad_shape)


def fvcore_op_handles() -> dict:
    """fvcore ``FlopCountAnalysis.set_op_handle`` entries; fvcore counts one per multiply-add.

    A JIT trace records the fused op as the autograd.Function (``prim::PythonOp.<name>``), or as
    the registered op when the op is called directly; both are handled.
    """

    def handle(inputs, outputs):
        taps = sum(inputs[i].type().sizes()[1] for i in (1, 2, 3))
        return taps * numel(outputs[0].type().sizes())

    return {"dcformer_kernels::decomposed_conv3d": handle,
            "prim::PythonOp.DecomposedConv3dFunction": handle}


# ----------------------------------------------------------------------------------------
# Autograd and the functional form
# ----------------------------------------------------------------------------------------
class DecomposedConv3dFunction(torch.autograd.Function):
    """Autograd over the Triton kernels; saves x and the three weight vectors only.

    Plain eager calls launch the kernels directly; under torch.compile, torch.jit.trace or a
    dispatch mode (FlopCounterMode, FakeTensorMode, ...) they go through the registered ops
    (``dispatch.launch_directly``).
    """

    @staticmethod
    def forward(ctx, x, weight_d, weight_h, weight_w, bias, stride, impl="auto"):
        check_decomposed_conv3d_args(x, weight_d, weight_h, weight_w, bias, stride)  # also public
        check_impl(impl)
        ctx.save_for_backward(x, weight_d, weight_h, weight_w)
        ctx.stride, ctx.impl = stride, impl
        ctx.has_bias = bias is not None
        if launch_directly(x):
            return decomposed_conv3d_forward(x, weight_d, weight_h, weight_w, bias, stride, impl)
        return torch.ops.dcformer_kernels.decomposed_conv3d(x, weight_d, weight_h, weight_w, bias, stride, impl)

    @staticmethod
    @once_differentiable  # the kernels' gradients have no graph: a second derivative raises
    def backward(ctx, grad):
        x, weight_d, weight_h, weight_w = ctx.saved_tensors
        if launch_directly(x):
            dx, dwd, dwh, dww, db = decomposed_conv3d_backward(grad, x, weight_d, weight_h, weight_w, ctx.stride,
                                                               ctx.impl)
        else:
            dx, dwd, dwh, dww, db = torch.ops.dcformer_kernels.decomposed_conv3d_backward(
                grad, x, weight_d, weight_h, weight_w, ctx.stride, ctx.impl)
        return dx, dwd, dwh, dww, (db if ctx.has_bias else None), None, None


def decomposed_conv3d(x: torch.Tensor, weight_d: torch.Tensor, weight_h: torch.Tensor, weight_w: torch.Tensor,
                      bias: torch.Tensor | None = None, stride: int = 1, backend: str = "auto",
                      impl: str = "auto") -> torch.Tensor:
    """Depthwise decomposed 3D convolution (DCFormer): three 1D depthwise convs summed.

    Args:
        x: (N, C, D, H, W), float16/bfloat16/float32/float64, NCDHW or channels_last_3d.
        weight_d, weight_h, weight_w: (C, k) per-channel 1D kernels along D, H and W; k odd, 1..31.
        bias: (C,) or None.
        stride: 1 or 2, applied to all three axes of every branch (as nn.Conv3d does).
        backend: "auto" (Triton on CUDA, PyTorch on CPU unless TRITON_INTERPRET=1),
            "triton" or "torch".
        impl: which Triton kernels: "auto" (tensor cores for CUDA float16/bfloat16 NCDHW, stride 1,
            D, H, W >= 16; else the direct stencil), "tensor_cores" (wherever stride 1 and the shape
            allow) or "direct". The PyTorch path ignores it.

    Returns:
        (N, C, D', H', W') with D' = (D - 1) // stride + 1 etc., in x's memory format.
    """
    check_impl(impl)
    if not isinstance(x, torch.Tensor) or resolve_backend(backend, x.device) == "torch":
        check_decomposed_conv3d_args(x, weight_d, weight_h, weight_w, bias, stride)
        return decomposed_conv3d_reference(x, weight_d, weight_h, weight_w, bias, stride)
    return DecomposedConv3dFunction.apply(x, weight_d, weight_h, weight_w, bias, stride, impl)  # checks them too
