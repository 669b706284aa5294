"""Training-mode decomposed depthwise conv with a BatchNorm on each branch, fused.

    y = sum_b BN_b(K_b x + c_b),   b in {D, H, W},  BN_b with this batch's statistics

The branch outputs z_b = K_b x are never written to memory (derivation: docs/fused_bn.md).

Forward (two reads of x):
  1. stats kernel: z_b for the three branches in registers; per-program (count, mean, M2) per
     channel and branch (two passes over the block in registers);
  2. fold kernel (per channel): the partials merged with Chan's parallel formula in float64
     (stable when |mean| >> std), folded into the fused conv's weights (γ_b/σ_b)·w_b and one bias
     Σ_b (β_b − γ_b μ_b/σ_b);
  3. the existing fused forward kernel writes y.
  The conv biases c_b cancel in training-mode BN: they only enter the running means.
Backward (two reads of x and g):
  1. reduction kernel: per-program partials of Σ g and Σ g·z_b per channel (z_b recomputed in
     registers); a small kernel sums them (float64, fixed order) into dγ_b, dβ_b and the dx
     kernel's per-channel coefficients;
  2. dx kernel: dx = Σ_b a_b K_bᵀ g − e_b K_bᵀ z_b + c_b K_bᵀ 1, where K_bᵀ z_b = Σ_δ A_b(p, δ) x(p + δ)
     with A_b the weights' autocorrelation cut at the volume's borders (tables from a small kernel, O(k) loads
     per element, no z_b at shifted positions); the same loads give z_b(p), hence ∂L/∂z_b(p), and
     per-program partials of Σ_p ∂L/∂z_b(p)·x(p + j − k//2) for the weight gradients (reduced in
     a fixed order: deterministic, no atomics).
Saved for backward: x, the weights, γ, and per-channel μ_b, σ_b. Stride 1 only (DCFormer's
blocks); other strides use the unfused module path.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.utils.flop_counter
from torch.autograd.function import once_differentiable

from .dispatch import (HAS_TRITON, acc_dtype, cdiv, check_interpretable, compute_dtype, index_dtype, launch_directly,
                        next_power_of_2, resolve_backend, triton_interpreting)
from .conv_common import (TileConfig, at, block_coords, block_kwargs, block_sum, check_decomposed_conv3d_args,
                          conv_grid, memory_format, numel, row_major, tap_weight, tile_config, weight_grads)
from .decomposed_conv import check_impl, decomposed_conv3d_forward
from .reference import decomposed_conv3d_batchnorm_train_reference

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["decomposed_conv3d_batchnorm_train", "DecomposedConv3dBatchNormFunction", "decomposed_conv3d_bn_forward",
           "decomposed_conv3d_bn_backward"]

# Column counts of the kernels' per-channel buffers. constexpr: jit code may read only constexpr
# globals, and host code takes them as ints (__index__).
_count = tl.constexpr if HAS_TRITON else int
N_STATS = _count(7)  # the stats partials (P, N_STATS, C): count, then (mean, M2) for D, H, W
N_SUMS = _count(4)  # the grad-sums partials (P, N_SUMS, C): Σg, then Σg·z_b for D, H, W
N_COEFS = _count(9)  # the dx kernel's coefficients (C, N_COEFS): a, e, cc, each for D, H, W


if HAS_TRITON:

    @triton.jit
    def _branch(x0, w_ptr, c, c_ok, pos, n_pos, s_axis, ok, C,
                SHIFT: tl.constexpr, K: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr):
        """z_b = K_b x at pos + SHIFT along the branch's axis (x0 points at pos); 0 where not ok."""
        z = tl.zeros(ok.shape, dtype=ACC)
        for i in tl.static_range(K):
            q = pos + (SHIFT + i - K // 2)
            xv = tl.load(x0 + tl.cast(SHIFT + i - K // 2, IDX) * s_axis, mask=ok & ((q >= 0) & (q < n_pos)), other=0.0)
            z += tap_weight(w_ptr, c, c_ok, i, K, ACC) * xv.to(ACC)
        return z

    @triton.jit
    def _store_mean_m2(mean_ptr, m2_ptr, z, ok, count, mask):
        """The block's per-channel mean and sum of squared deviations of z (valid where ok)."""
        mean = block_sum(z) / tl.maximum(count, 1.0)
        dev = tl.where(ok, z - mean[None, :, None], 0.0)
        tl.store(mean_ptr, mean, mask=mask)
        tl.store(m2_ptr, block_sum(dev * dev), mask=mask)

    @triton.jit
    def _bn_stats_kernel(
        x_ptr, wd_ptr, wh_ptr, ww_ptr, part_ptr,
        C, D, H, W, sxn, sxc, sxd, sxh, sxw, n_db, n_hb, n_wb,
        KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
        BLOCK_C: tl.constexpr, DT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
    ):
        pid_s = tl.program_id(0)
        n, d, c, h, w = block_coords(pid_s, tl.program_id(1), n_db, n_hb, n_wb, BLOCK_C, DT, RH, RW)
        c_ok = c < C
        ok = c_ok & (d < D) & ((h < H) & (w < W))
        x0 = at(x_ptr, n, c, d, h, w, sxn, sxc, sxd, sxh, sxw, IDX)
        ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        base = part_ptr + pid_s.to(tl.int64) * (N_STATS * C) + ch  # (P, N_STATS, C)
        count = block_sum(ok.to(ACC))
        tl.store(base, count, mask=ch < C)
        z = _branch(x0, wd_ptr, c, c_ok, d, D, sxd, ok, C, 0, KD, ACC, IDX)
        _store_mean_m2(base + C, base + 2 * C, z, ok, count, ch < C)
        z = _branch(x0, wh_ptr, c, c_ok, h, H, sxh, ok, C, 0, KH, ACC, IDX)
        _store_mean_m2(base + 3 * C, base + 4 * C, z, ok, count, ch < C)
        z = _branch(x0, ww_ptr, c, c_ok, w, W, sxw, ok, C, 0, KW, ACC, IDX)
        _store_mean_m2(base + 5 * C, base + 6 * C, z, ok, count, ch < C)

    @triton.jit
    def _bn_grad_sums_kernel(
        x_ptr, g_ptr, wd_ptr, wh_ptr, ww_ptr, part_ptr,
        C, D, H, W, sxn, sxc, sxd, sxh, sxw, sgn, sgc, sgd, sgh, sgw, n_db, n_hb, n_wb,
        KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
        BLOCK_C: tl.constexpr, DT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
    ):
        pid_s = tl.program_id(0)
        n, d, c, h, w = block_coords(pid_s, tl.program_id(1), n_db, n_hb, n_wb, BLOCK_C, DT, RH, RW)
        c_ok = c < C
        ok = c_ok & (d < D) & ((h < H) & (w < W))
        x0 = at(x_ptr, n, c, d, h, w, sxn, sxc, sxd, sxh, sxw, IDX)
        g0 = at(g_ptr, n, c, d, h, w, sgn, sgc, sgd, sgh, sgw, IDX)
        gv = tl.load(g0, mask=ok, other=0.0).to(ACC)
        ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        base = part_ptr + pid_s.to(tl.int64) * (N_SUMS * C) + ch  # (P, N_SUMS, C)
        tl.store(base, block_sum(gv), mask=ch < C)
        z = _branch(x0, wd_ptr, c, c_ok, d, D, sxd, ok, C, 0, KD, ACC, IDX)
        tl.store(base + C, block_sum(gv * z), mask=ch < C)
        z = _branch(x0, wh_ptr, c, c_ok, h, H, sxh, ok, C, 0, KH, ACC, IDX)
        tl.store(base + 2 * C, block_sum(gv * z), mask=ch < C)
        z = _branch(x0, ww_ptr, c, c_ok, w, W, sxw, ok, C, 0, KW, ACC, IDX)
        tl.store(base + 3 * C, block_sum(gv * z), mask=ch < C)

    @triton.jit
    def _bn_branch_grad(x0, g0, gv, w_ptr, tab_ptr, coef_ptr, c, c_ok, pos, n_pos, sx_axis, sg_axis, ok, C,
                        dx, part, part_ok, AXIS: tl.constexpr, K: tl.constexpr, ACC: tl.constexpr,
                        IDX: tl.constexpr):
        """Add branch AXIS's share of dx at p and store its weight-gradient partials.

        With dz = a g − e z + cc (BatchNorm's backward, cc = e μ − a m_g), at p:
            dx  += a (Kᵀ g)(p) − e Σ_δ A(p, δ) x(p + δ) + cc (Kᵀ 1)(p)     [(Kᵀ z)(p) = Σ_δ A(p, δ) x(p + δ)]
            dw[j] partial = Σ_p dz(p) x(p + j − K//2)
        A(p, δ) = Σ_i w_i w_{i+δ} [output p + K//2 − i exists] and (Kᵀ 1)(p) come from the
        table tab (C, 2K, L): rows 0..2K−2 are A for δ = 1−K..K−1, row 2K−1 is Kᵀ1. O(K) loads.
        """
        a = tl.load(coef_ptr + c * N_COEFS + AXIS, mask=c_ok, other=0.0)
        e = tl.load(coef_ptr + c * N_COEFS + 3 + AXIS, mask=c_ok, other=0.0)
        cc = tl.load(coef_ptr + c * N_COEFS + 6 + AXIS, mask=c_ok, other=0.0)
        tab = tab_ptr + c * (2 * K * n_pos) + pos
        tab_ok = c_ok & (pos < n_pos)
        z = tl.zeros(ok.shape, dtype=ACC)
        ktz = tl.zeros(ok.shape, dtype=ACC)  # (Kᵀ z)(p)
        for t in tl.static_range(2 * K - 1):
            q = pos + (t - (K - 1))
            xv = tl.load(x0 + tl.cast(t - (K - 1), IDX) * sx_axis, mask=ok & ((q >= 0) & (q < n_pos)), other=0.0)
            xv = xv.to(ACC)
            ktz += tl.load(tab + t * n_pos, mask=tab_ok, other=0.0) * xv
            if t >= K // 2 and t < K // 2 + K:  # |δ| <= K//2: a tap of z(p) itself
                z += tap_weight(w_ptr, c, c_ok, t - K // 2, K, ACC) * xv
        ktg = tl.zeros(ok.shape, dtype=ACC)  # (Kᵀ g)(p)
        for i in tl.static_range(K):
            o = pos + (K // 2 - i)
            gi = tl.load(g0 + tl.cast(K // 2 - i, IDX) * sg_axis, mask=ok & ((o >= 0) & (o < n_pos)), other=0.0)
            ktg += tap_weight(w_ptr, c, c_ok, i, K, ACC) * gi.to(ACC)
        kt1 = tl.load(tab + (2 * K - 1) * n_pos, mask=tab_ok, other=0.0)
        dx += a * ktg - e * ktz + cc * kt1
        dz = tl.where(ok, a * gv - e * z + cc, 0.0)
        for j in tl.static_range(K):
            q = pos + (j - K // 2)
            xv = tl.load(x0 + tl.cast(j - K // 2, IDX) * sx_axis, mask=ok & ((q >= 0) & (q < n_pos)), other=0.0)
            tl.store(part + j * C, block_sum(dz * xv.to(ACC)), mask=part_ok)
        return dx

    @triton.jit
    def _bn_dx_kernel(
        x_ptr, g_ptr, wd_ptr, wh_ptr, ww_ptr, td_ptr, th_ptr, tw_ptr, coef_ptr, dx_ptr, part_ptr,
        C, D, H, W, sxn, sxc, sxd, sxh, sxw, sgn, sgc, sgd, sgh, sgw, sdn, sdc, sdd, sdh, sdw,
        n_db, n_hb, n_wb,
        KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
        BLOCK_C: tl.constexpr, DT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
    ):
        pid_s = tl.program_id(0)
        n, d, c, h, w = block_coords(pid_s, tl.program_id(1), n_db, n_hb, n_wb, BLOCK_C, DT, RH, RW)
        c_ok = c < C
        ok = c_ok & (d < D) & ((h < H) & (w < W))
        x0 = at(x_ptr, n, c, d, h, w, sxn, sxc, sxd, sxh, sxw, IDX)
        g0 = at(g_ptr, n, c, d, h, w, sgn, sgc, sgd, sgh, sgw, IDX)
        ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        part = part_ptr + pid_s.to(tl.int64) * ((KD + KH + KW) * C) + ch  # (P, KD+KH+KW, C)
        gv = tl.load(g0, mask=ok, other=0.0).to(ACC)
        dx = tl.zeros(ok.shape, dtype=ACC)
        dx = _bn_branch_grad(x0, g0, gv, wd_ptr, td_ptr, coef_ptr, c, c_ok, d, D, sxd, sgd, ok, C, dx, part,
                             ch < C, 0, KD, ACC, IDX)
        dx = _bn_branch_grad(x0, g0, gv, wh_ptr, th_ptr, coef_ptr, c, c_ok, h, H, sxh, sgh, ok, C, dx,
                             part + KD * C, ch < C, 1, KH, ACC, IDX)
        dx = _bn_branch_grad(x0, g0, gv, ww_ptr, tw_ptr, coef_ptr, c, c_ok, w, W, sxw, sgw, ok, C, dx,
                             part + (KD + KH) * C, ch < C, 2, KW, ACC, IDX)
        dx0 = at(dx_ptr, n, c, d, h, w, sdn, sdc, sdd, sdh, sdw, IDX)
        tl.store(dx0, dx.to(dx_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _bn_table_kernel(w_ptr, tab_ptr, L, K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr):
        """One channel's (2K, L) table of _transpose_tables, from its row of the (C, K) weights."""
        c = tl.program_id(0)
        i = tl.arange(0, BLOCK_K)
        w_i = tl.load(w_ptr + c * K + i, mask=i < K, other=0.0).to(tl.float64)
        rows = tab_ptr + c.to(tl.int64) * (2 * K * L)
        for p0 in range(0, L, BLOCK_L):
            p = p0 + tl.arange(0, BLOCK_L)
            o = p[:, None] + (K // 2) - i[None, :]  # output p + K//2 − i exists: tap i of it reaches p
            exists = (o >= 0) & (o < L) & (i < K)[None, :]
            for t in range(2 * K - 1):
                j = i + (t - (K - 1))  # i + δ
                w_j = tl.load(w_ptr + c * K + j, mask=(j >= 0) & (j < K), other=0.0).to(tl.float64)
                a = tl.sum(tl.where(exists, (w_i * w_j)[None, :], 0.0), axis=1)
                tl.store(rows + t * L + p, a.to(tab_ptr.dtype.element_ty), mask=p < L)
            ones = tl.sum(tl.where(exists, w_i[None, :], 0.0), axis=1)
            tl.store(rows + (2 * K - 1) * L + p, ones.to(tab_ptr.dtype.element_ty), mask=p < L)

    @triton.jit
    def _column_tiles(part_ptr, p0, P, C, ch, ch_ok, N_COLS: tl.constexpr, BLOCK_P: tl.constexpr):
        """Pointers to rows p0 .. p0 + BLOCK_P of partials (P, N_COLS, C) at channels ch (column 0),
        and their mask."""
        p = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
        return part_ptr + p[:, None] * (N_COLS * C) + ch[None, :], (p < P)[:, None] & ch_ok[None, :]

    @triton.jit
    def _merged_moments(part_ptr, P, C, ch, ch_ok, COL: tl.constexpr, BLOCK_P: tl.constexpr):
        """Per-channel mean and biased variance (float64) of one branch from the stats kernel's
        per-program (count, mean, M2) partials: Chan's parallel formula, BLOCK_P programs at a time
        in a fixed order (deterministic; exact when |mean| >> std, where Σz² − (Σz)²/M cancels)."""
        n = tl.zeros(ch.shape, dtype=tl.float64)
        mean = tl.zeros(ch.shape, dtype=tl.float64)
        m2 = tl.zeros(ch.shape, dtype=tl.float64)
        for p0 in range(0, P, BLOCK_P):
            rows, ok = _column_tiles(part_ptr, p0, P, C, ch, ch_ok, N_STATS, BLOCK_P)
            count_p = tl.load(rows, mask=ok, other=0.0).to(tl.float64)
            mean_p = tl.load(rows + COL * C, mask=ok, other=0.0).to(tl.float64)
            m2_p = tl.load(rows + (COL + 1) * C, mask=ok, other=0.0).to(tl.float64)
            n_t = tl.sum(count_p, axis=0)
            mean_t = tl.sum(count_p * mean_p, axis=0) / tl.maximum(n_t, 1.0)
            dev = mean_p - mean_t[None, :]
            m2_t = tl.sum(m2_p + count_p * dev * dev, axis=0)
            frac = n_t / tl.maximum(n + n_t, 1.0)
            delta = mean_t - mean
            mean += delta * frac
            m2 += m2_t + delta * delta * n * frac
            n += n_t
        return mean, m2 / tl.maximum(n, 1.0)

    @triton.jit
    def _fold_branch(part_ptr, P, C, ch, ch_ok, eps, w_ptr, gamma_ptr, beta_ptr, folded_ptr,
                     mean_ptr, var_ptr, std_ptr,
                     B: tl.constexpr, K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
        """Branch B's batch mean, biased variance and std (row B of each (3, C)), its weights scaled by
        γ/σ (stored in the weights' dtype) and its share β − γμ/σ of the folded bias (returned)."""
        mean, var = _merged_moments(part_ptr, P, C, ch, ch_ok, 1 + 2 * B, BLOCK_P)
        std = tl.sqrt(var + eps)
        gamma = tl.load(gamma_ptr + B * C + ch, mask=ch_ok, other=0.0).to(tl.float64)
        beta = tl.load(beta_ptr + B * C + ch, mask=ch_ok, other=0.0).to(tl.float64)
        tl.store(mean_ptr + B * C + ch, mean, mask=ch_ok)
        tl.store(var_ptr + B * C + ch, var, mask=ch_ok)
        tl.store(std_ptr + B * C + ch, std, mask=ch_ok)
        k = tl.arange(0, BLOCK_K)
        at = ch[:, None] * K + k[None, :]
        w_ok = ch_ok[:, None] & (k < K)[None, :]
        w = tl.load(w_ptr + at, mask=w_ok, other=0.0).to(tl.float64)
        tl.store(folded_ptr + at, (w * (gamma / std)[:, None]).to(folded_ptr.dtype.element_ty), mask=w_ok)
        return beta - gamma * mean / std

    @triton.jit
    def _bn_fold_kernel(part_ptr, P, C, eps: tl.float64, wd_ptr, wh_ptr, ww_ptr, gamma_ptr, beta_ptr,
                        fd_ptr, fh_ptr, fw_ptr, bias_ptr, mean_ptr, var_ptr, std_ptr,
                        KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """Batch statistics from the stats kernel's partials, folded into the fused conv's weights
        (γ_b/σ_b)·w_b and one bias Σ_b (β_b − γ_b μ_b/σ_b); in float64 (eps too, as nn.BatchNorm3d's
        float64 path), BLOCK_C channels a program."""
        ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        ch_ok = ch < C
        stats = (mean_ptr, var_ptr, std_ptr)
        bias = _fold_branch(part_ptr, P, C, ch, ch_ok, eps, wd_ptr, gamma_ptr, beta_ptr, fd_ptr, *stats,
                            0, KD, BLOCK_K, BLOCK_P)
        bias += _fold_branch(part_ptr, P, C, ch, ch_ok, eps, wh_ptr, gamma_ptr, beta_ptr, fh_ptr, *stats,
                             1, KH, BLOCK_K, BLOCK_P)
        bias += _fold_branch(part_ptr, P, C, ch, ch_ok, eps, ww_ptr, gamma_ptr, beta_ptr, fw_ptr, *stats,
                             2, KW, BLOCK_K, BLOCK_P)
        tl.store(bias_ptr + ch, bias.to(bias_ptr.dtype.element_ty), mask=ch_ok)

    @triton.jit
    def _column_sum(part_ptr, P, C, ch, ch_ok, COL: tl.constexpr, N_COLS: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_P: tl.constexpr):
        """Σ over programs of column COL of partials (P, N_COLS, C), float64, in a fixed order."""
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float64)
        for p0 in range(0, P, BLOCK_P):
            rows, ok = _column_tiles(part_ptr, p0, P, C, ch, ch_ok, N_COLS, BLOCK_P)
            acc += tl.load(rows + COL * C, mask=ok, other=0.0).to(tl.float64)
        return tl.sum(acc, axis=0)

    @triton.jit(do_not_specialize=["count"])  # count = 1 would become a constexpr int (no .to)
    def _bn_coef_kernel(part_ptr, P, C, count, gamma_ptr, mean_ptr, std_ptr, coef_ptr, dgamma_ptr, dbeta_ptr,
                        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """From the grad-sums kernel's partials (P, N_SUMS, C): dγ_b = Σ g (z_b − μ_b)/σ_b, dβ_b = Σ g, and
        the dx kernel's per-channel coefficients (C, N_COEFS): a_b = γ_b/σ_b, e_b = γ_b dγ_b/(M σ_b²) and
        cc_b = e_b μ_b − a_b Σg/M (docs/fused_bn.md); float64."""
        ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        ch_ok = ch < C
        m = count.to(tl.float64)
        sum_g = _column_sum(part_ptr, P, C, ch, ch_ok, 0, N_SUMS, BLOCK_C, BLOCK_P)
        for b in tl.static_range(3):
            sum_gz = _column_sum(part_ptr, P, C, ch, ch_ok, 1 + b, N_SUMS, BLOCK_C, BLOCK_P)
            gamma = tl.load(gamma_ptr + b * C + ch, mask=ch_ok, other=0.0).to(tl.float64)
            mean = tl.load(mean_ptr + b * C + ch, mask=ch_ok, other=0.0).to(tl.float64)
            std = tl.load(std_ptr + b * C + ch, mask=ch_ok, other=1.0).to(tl.float64)
            dgamma = (sum_gz - mean * sum_g) / std
            a = gamma / std
            e = gamma * (dgamma / m) / (std * std)
            tl.store(coef_ptr + ch * N_COEFS + b, a.to(coef_ptr.dtype.element_ty), mask=ch_ok)
            tl.store(coef_ptr + ch * N_COEFS + 3 + b, e.to(coef_ptr.dtype.element_ty), mask=ch_ok)
            tl.store(coef_ptr + ch * N_COEFS + 6 + b, (e * mean - a * (sum_g / m)).to(coef_ptr.dtype.element_ty),
                     mask=ch_ok)
            tl.store(dgamma_ptr + b * C + ch, dgamma.to(dgamma_ptr.dtype.element_ty), mask=ch_ok)
            tl.store(dbeta_ptr + b * C + ch, sum_g.to(dbeta_ptr.dtype.element_ty), mask=ch_ok)


def _transpose_tables(weights, lengths, dtype: torch.dtype) -> list[torch.Tensor]:
    """The dx pass's (C, 2k, L) table per branch (see _bn_branch_grad), one launch each.

    Rows t < 2k−1: A(p, δ = t − k + 1) = Σ_i w_i w_{i+δ} [0 <= p + k//2 − i < L]; row 2k−1: Σ_i w_i [same].
    Computed in float64 by _bn_table_kernel (as host tensor ops these were ~10 launches per branch).
    """
    tables = []
    for w, length in zip(weights, lengths):
        c, k = w.shape
        table = torch.empty((c, 2 * k, length), dtype=dtype, device=w.device)
        _bn_table_kernel[(c,)](w, table, length, K=k, BLOCK_K=next_power_of_2(k),
                               BLOCK_L=min(64, next_power_of_2(length)), num_warps=4)
        tables.append(table)
    return tables


def _launch(kernel, x, tensors, strides, n_cols, extra_constexpr=None, max_d_tile=None, tiles=None):
    """Run one of the block kernels over x's positions; returns per-program partials (P, n_cols, C).

    ``tiles`` overrides the conv's tile choice; ``max_d_tile`` caps its D planes per program (fewer
    live values per thread)."""
    n, c, d, h, w = x.shape
    cfg = tiles or tile_config(x, h, w, d)
    if max_d_tile is not None and cfg.d_tile > max_d_tile:
        cfg = dataclasses.replace(cfg, d_tile=max_d_tile)
    grid, (n_db, n_hb, n_wb) = conv_grid(n, d, h, w, c, cfg)
    acc = compute_dtype(x.dtype)
    partials = torch.empty((grid[0], n_cols, c), dtype=acc, device=x.device)
    kernel[grid](*tensors, partials, c, d, h, w, *strides, n_db, n_hb, n_wb,
                 **(extra_constexpr or {}), ACC=acc_dtype(x.dtype), IDX=index_dtype(*(t for t in tensors if t.dim() == 5)),
                 **block_kwargs(cfg))
    return partials


def _reduction_blocks(c: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P) of the kernels that reduce per-program partials per channel: 8 channels
    (one 32-byte sector of fp32) by 128 programs a step; small steps under the interpreter."""
    return min(8, next_power_of_2(c)), 8 if triton_interpreting() else 128


_KERNELS = "fused BatchNorm kernels"


def decomposed_conv3d_bn_forward(x, weight_d, weight_h, weight_w, gamma, beta, eps: float, impl: str = "auto",
                                 tiles: TileConfig | None = None):
    """Launch the forward (no argument checks): y, and the (3, C) float64 batch mean, biased variance
    and std of the branch convs. Three launches: statistics partials, their merge folded into the
    weights, the fused conv (``impl`` picks its kernels, as in ``decomposed_conv3d``).

    An empty batch (N = 0) has no values: NaN statistics, the mean of nothing, as on the PyTorch path."""
    check_interpretable(x, _KERNELS)
    if x.numel() == 0:
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
        return y, *(torch.full((3, x.shape[1]), float("nan"), dtype=torch.float64, device=x.device) for _ in range(3))
    weights = row_major(weight_d, weight_h, weight_w)
    kd, kh, kw = (t.shape[1] for t in weights)
    partials = _launch(_bn_stats_kernel, x, (x, *weights), x.stride(), N_STATS, dict(KD=kd, KH=kh, KW=kw),
                       tiles=tiles)
    c = x.shape[1]
    folded = [torch.empty_like(t) for t in weights]
    bias = torch.empty(c, dtype=x.dtype, device=x.device)
    mean, var, std = (torch.empty((3, c), dtype=torch.float64, device=x.device) for _ in range(3))
    block_c, block_p = _reduction_blocks(c)
    _bn_fold_kernel[(cdiv(c, block_c),)](
        partials, partials.shape[0], c, eps, *weights, gamma.contiguous(), beta.contiguous(), *folded, bias,
        mean, var, std,
        KD=kd, KH=kh, KW=kw, BLOCK_K=next_power_of_2(max(kd, kh, kw)), BLOCK_C=block_c, BLOCK_P=block_p,
        num_warps=4)
    y = decomposed_conv3d_forward(x, *folded, bias, 1, impl, tiles)
    return y, mean, var, std


@torch.library.custom_op("dcformer_kernels::decomposed_conv3d_bn_forward", mutates_args=())
def _bn_forward_op(x: torch.Tensor, weight_d: torch.Tensor, weight_h: torch.Tensor, weight_w: torch.Tensor,
                   gamma: torch.Tensor, beta: torch.Tensor, eps: float, impl: str = "auto"
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y and the per-branch batch mean, biased variance and std of K_b x, each (3, C) float64."""
    _check_batchnorm_train_args(x, weight_d, weight_h, weight_w, gamma, beta)  # the op is public too
    check_impl(impl)
    return decomposed_conv3d_bn_forward(x, weight_d, weight_h, weight_w, gamma, beta, eps, impl)


@_bn_forward_op.register_fake
def _(x, weight_d, weight_h, weight_w, gamma, beta, eps, impl="auto"):
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    shape = (3, x.shape[1])
    return y, *(x.new_empty(shape, dtype=torch.float64) for _ in range(3))


def decomposed_conv3d_bn_backward(grad, x, weight_d, weight_h, weight_w, gamma, mean, std,
                                  tiles: TileConfig | None = None):
    """Launch the backward (no argument checks): dx, dweight_d/h/w, dgamma (3, C), dbeta (3, C)."""
    check_interpretable(x, _KERNELS)
    if x.numel() == 0:  # no terms: zero gradients, as on the PyTorch path
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
        per_branch = [torch.zeros((3, x.shape[1]), dtype=gamma.dtype, device=x.device) for _ in range(2)]
        return (dx, *(torch.zeros_like(w) for w in (weight_d, weight_h, weight_w)), *per_branch)
    weights = row_major(weight_d, weight_h, weight_w)
    kd, kh, kw = (t.shape[1] for t in weights)
    strides = (*x.stride(), *grad.stride())
    sums = _launch(_bn_grad_sums_kernel, x, (x, grad, *weights), strides, N_SUMS, dict(KD=kd, KH=kh, KW=kw),
                   tiles=tiles)
    c = x.shape[1]
    acc = compute_dtype(x.dtype)
    coef = torch.empty((c, N_COEFS), dtype=acc, device=x.device)
    dgamma, dbeta = (torch.empty((3, c), dtype=gamma.dtype, device=x.device) for _ in range(2))  # row-major
    block_c, block_p = _reduction_blocks(c)
    _bn_coef_kernel[(cdiv(c, block_c),)](
        sums, sums.shape[0], c, x.numel() // c, gamma.contiguous(), mean.contiguous(), std.contiguous(), coef,
        dgamma, dbeta, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=4)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    tables = _transpose_tables(weights, x.shape[2:], acc)
    # One D plane per program: with the conv's two, ptxas spills the dx kernel (255 registers and
    # 0.3-2 KB of local memory a thread at DCFormer's stages); with one, NCDHW needs no spills and
    # ~5 % fewer instructions per element, channels-last a quarter of the spills for the same count
    # (docs/conv_notes.md, static model for sm_90; not yet timed on a GPU).
    partials = _launch(_bn_dx_kernel, x, (x, grad, *weights, *tables, coef, dx),
                       (*strides, *dx.stride()), kd + kh + kw, dict(KD=kd, KH=kh, KW=kw), max_d_tile=1,
                       tiles=tiles)
    return (dx, *weight_grads(partials, (kd, kh, kw), x.dtype), dgamma, dbeta)


@torch.library.custom_op("dcformer_kernels::decomposed_conv3d_bn_backward", mutates_args=())
def _bn_backward_op(grad: torch.Tensor, x: torch.Tensor, weight_d: torch.Tensor, weight_h: torch.Tensor,
                    weight_w: torch.Tensor, gamma: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx, dweight_d/h/w, dgamma (3, C), dbeta (3, C) of the training-mode fused unit."""
    check_decomposed_conv3d_args(x, weight_d, weight_h, weight_w, None, 1)  # the op is public too
    if grad.shape != x.shape:
        raise ValueError(f"grad must have the shape of x, {tuple(x.shape)}; got {tuple(grad.shape)}")
    _check_branch_params(x, gamma=gamma, mean=mean, std=std)
    return decomposed_conv3d_bn_backward(grad, x, weight_d, weight_h, weight_w, gamma, mean, std)


@_bn_backward_op.register_fake
def _(grad, x, weight_d, weight_h, weight_w, gamma, mean, std):
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    per_branch = [torch.empty((3, x.shape[1]), dtype=gamma.dtype, device=x.device) for _ in range(2)]
    return (dx, torch.empty_like(weight_d), torch.empty_like(weight_h), torch.empty_like(weight_w), *per_branch)


@torch.utils.flop_counter.register_flop_formula(torch.ops.dcformer_kernels.decomposed_conv3d_bn_forward)
def _forward_flops(x_shape, wd_shape, wh_shape, ww_shape, *args, out_shape=None, **kwargs) -> int:
    """The three branch convs, 2*(kd+kh+kw) per element, as FlopCounterMode counts the unfused
    module (it counts no BatchNorm; the statistics pass recomputes the convs and is not counted)."""
    return 2 * (wd_shape[1] + wh_shape[1] + ww_shape[1]) * numel(x_shape)


@torch.utils.flop_counter.register_flop_formula(torch.ops.dcformer_kernels.decomposed_conv3d_bn_backward)
def _backward_flops(grad_shape, x_shape, wd_shape, wh_shape, ww_shape, *args, out_shape=None, **kwargs) -> int:
    """The branch convs' input and weight gradients, as for nn.Conv3d: twice the forward."""
    return 2 * 2 * (wd_shape[1] + wh_shape[1] + ww_shape[1]) * numel(x_shape)


class DecomposedConv3dBatchNormFunction(torch.autograd.Function):
    """y = Σ_b BN_b(K_b x) with batch statistics; returns y and the (3, C) batch mean / biased var."""

    @staticmethod
    def forward(ctx, x, weight_d, weight_h, weight_w, gamma, beta, eps, impl="auto"):
        args = (x, weight_d, weight_h, weight_w, gamma, beta, eps, impl)
        if launch_directly(x):  # see decomposed_conv.DecomposedConv3dFunction
            y, mean, var, std = decomposed_conv3d_bn_forward(*args)
        else:
            y, mean, var, std = torch.ops.dcformer_kernels.decomposed_conv3d_bn_forward(*args)
        ctx.save_for_backward(x, weight_d, weight_h, weight_w, gamma, mean, std)
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)  # no zero (3, C) gradients built for mean and var
        return y, mean, var

    @staticmethod
    @once_differentiable  # the kernels' gradients have no graph: a second derivative raises
    def backward(ctx, grad, _grad_mean, _grad_var):
        if grad is None:  # y's gradient is undefined (zero), so are all of them
            return (None,) * 8
        x, weight_d, weight_h, weight_w, gamma, mean, std = ctx.saved_tensors
        args = (grad, x, weight_d, weight_h, weight_w, gamma, mean, std)
        if launch_directly(x):
            dx, dwd, dwh, dww, dgamma, dbeta = decomposed_conv3d_bn_backward(*args)
        else:
            dx, dwd, dwh, dww, dgamma, dbeta = torch.ops.dcformer_kernels.decomposed_conv3d_bn_backward(*args)
        return dx, dwd, dwh, dww, dgamma, dbeta, None, None


def _check_branch_params(x, **params) -> None:
    """Per-branch (3, C) tensors on x's device."""
    for name, t in params.items():
        if not isinstance(t, torch.Tensor) or t.shape != (3, x.shape[1]):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a tensor of shape (3, C={x.shape[1]}), one row per branch; got {got}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _check_batchnorm_train_args(x, weight_d, weight_h, weight_w, gamma, beta) -> None:
    """The conv's checks, the affine parameters' shapes and dtypes, and more than one value per
    channel (a lone value normalises to 0 exactly: nn.BatchNorm3d raises, with this message)."""
    check_decomposed_conv3d_args(x, weight_d, weight_h, weight_w, None, 1)
    _check_branch_params(x, gamma=gamma, beta=beta)
    # F.batch_norm's rule: parameters of x's dtype, or float32 ones for a half-precision x (autocast).
    allowed = (x.dtype, torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else (x.dtype,)
    for name, t in (("gamma", gamma), ("beta", beta)):
        if t.dtype not in allowed:
            raise TypeError(f"{name} must have x's dtype {x.dtype}"
                            f"{' (or float32)' if len(allowed) > 1 else ''}; got {t.dtype}")
    if beta.dtype != gamma.dtype:
        raise TypeError(f"beta has dtype {beta.dtype} but gamma has dtype {gamma.dtype}")
    if x.numel() // x.shape[1] == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")


def decomposed_conv3d_batchnorm_train(x, weight_d, weight_h, weight_w, gamma, beta, eps: float = 1e-5,
                                      backend: str = "auto", impl: str = "auto"):
    """Training-mode Σ_b BN_b(K_b x) on the fused kernels (stride 1).

    Args:
        x: (N, C, D, H, W); weight_d/h/w: (C, k); gamma, beta: (3, C) per-branch BN affine
            parameters (rows D, H, W) of x's dtype (or float32 for a float16/bfloat16 x, as
            ``F.batch_norm`` takes them); eps: BN epsilon.
        backend: "auto" (Triton on CUDA, PyTorch on CPU unless TRITON_INTERPRET=1), "triton" or
            "torch" (``reference.decomposed_conv3d_batchnorm_train_reference``: three branch tensors).
        impl: the kernels of the fused conv that writes y, as in ``decomposed_conv3d``.
    Returns:
        y, batch mean (3, C) and biased batch variance (3, C) of the branch convs without bias
        (float64; for the running statistics). An empty batch (N = 0) gives an empty y and NaN
        statistics (the mean of no values); x with one value per channel raises a ValueError, as
        ``nn.BatchNorm3d`` does in training.
    """
    _check_batchnorm_train_args(x, weight_d, weight_h, weight_w, gamma, beta)
    check_impl(impl)
    if resolve_backend(backend, x.device) == "torch":
        return decomposed_conv3d_batchnorm_train_reference(x, weight_d, weight_h, weight_w, gamma, beta, eps)
    return DecomposedConv3dBatchNormFunction.apply(x, weight_d, weight_h, weight_w, gamma, beta, eps, impl)

