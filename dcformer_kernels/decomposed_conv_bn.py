"""Training-mode decomposed depthwise conv with a BatchNorm on each branch, fused.

    y = sum_b BN_b(K_b x + c_b),   b in {D, H, W},  BN_b with this batch's statistics

The branch outputs z_b = K_b x are never written to memory (derivation: docs/fused_bn.md).

Forward (two reads of x):
  1. stats kernel: z_b for the three branches in registers; per-program (count, mean, M2) per
     channel and branch, merged with Chan's parallel formula (stable when |mean| >> std);
  2. the batch statistics fold into the fused conv: weights (γ_b/σ_b)·w_b and one bias
     Σ_b (β_b − γ_b μ_b/σ_b); the existing fused forward kernel writes y.
  The conv biases c_b cancel in training-mode BN: they only enter the running means.
Backward (two reads of x and g):
  1. reduction kernel: Σ g and Σ g·z_b per channel (z_b recomputed in registers);
  2. dx kernel: dz_b = a_b (g − m_g) − e_b (z_b − μ_b) recomputed on the fly at the shifted
     positions each tap needs, dx = Σ_b K_bᵀ dz_b, and per-program partials of Σ x·dz_b for the
     weight gradients (reduced in a fixed order: deterministic, no atomics).
Saved for backward: x, the weights, γ, and per-channel μ_b, σ_b. Stride 1 only (DCFormer's
blocks); other strides use the unfused module path.
"""
from __future__ import annotations

import torch

from ._dispatch import HAS_TRITON, next_power_of_2
from .decomposed_conv import (
    _acc_dtype,
    _grid,
    _index_dtype,
    _memory_format,
    _tile_config,
    check_decomposed_conv3d_args,
)

if HAS_TRITON:
    import triton
    import triton.language as tl
    from .decomposed_conv import _tile_coords

__all__ = ["decomposed_conv3d_batchnorm_train", "DecomposedConv3dBatchNormFunction"]

_N_STATS = 7  # count, then (mean, M2) for D, H, W
_N_SUMS = 4  # Σg, then Σg·z_b for D, H, W
_N_COEF = 10  # a_b (3), e_b (3), μ_b (3), m_g


if HAS_TRITON:

    @triton.jit
    def _branch(x_nc, w_ptr, c, c_ok, d, h, w, ok, D, H, W, sxd, sxh, sxw,
                AXIS: tl.constexpr, K: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
                BLOCK_C: tl.constexpr, BS: tl.constexpr):
        """z = K_b x at positions (d, h, w) ([1, BS] blocks) for the branch along AXIS; 0 where not ok."""
        z = tl.zeros([BLOCK_C, BS], dtype=ACC)
        for i in tl.static_range(K):
            if AXIS == 0:
                dd = d + (i - K // 2)
                m = ok & (dd >= 0) & (dd < D)
                off = dd.to(IDX) * sxd + h.to(IDX) * sxh + w.to(IDX) * sxw
            elif AXIS == 1:
                hh = h + (i - K // 2)
                m = ok & (hh >= 0) & (hh < H)
                off = d.to(IDX) * sxd + hh.to(IDX) * sxh + w.to(IDX) * sxw
            else:
                ww = w + (i - K // 2)
                m = ok & (ww >= 0) & (ww < W)
                off = d.to(IDX) * sxd + h.to(IDX) * sxh + ww.to(IDX) * sxw
            wv = tl.load(w_ptr + c * K + i, mask=c_ok, other=0.0).to(ACC)
            z += wv[:, None] * tl.load(x_nc + off, mask=m, other=0.0).to(ACC)
        return z

    @triton.jit
    def _chan_merge(n_a, mean_a, m2_a, n_b, z, ok):
        """Merge a tile's values z (valid where ok, n_b per channel) into (n_a, mean_a, M2_a)."""
        mean_b = tl.sum(z, axis=1) / tl.maximum(n_b, 1.0)
        dev = tl.where(ok, z - mean_b[:, None], 0.0)
        m2_b = tl.sum(dev * dev, axis=1)
        n = n_a + n_b
        delta = mean_b - mean_a
        frac = n_b / tl.maximum(n, 1.0)
        return mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac

    @triton.jit
    def _bn_stats_kernel(
        x_ptr, wd_ptr, wh_ptr, ww_ptr, part_ptr,
        C, D, H, W, sxn, sxc, sxd, sxh, sxw, n_db, n_hb, n_wb,
        KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
        BLOCK_C: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr, D_CHUNK: tl.constexpr,
    ):
        pid_s = tl.program_id(0)
        n, d0, h, w, c = _tile_coords(pid_s, tl.program_id(1), n_db, n_hb, n_wb, BLOCK_C, RH, RW, D_CHUNK)
        c_ok = c < C
        tile_ok = c_ok[:, None] & ((h < H) & (w < W))[None, :]
        h2 = h[None, :]
        w2 = w[None, :]
        x_nc = x_ptr + n.to(IDX) * sxn + c.to(IDX)[:, None] * sxc
        count = tl.zeros([BLOCK_C], dtype=ACC)
        mean_d = tl.zeros([BLOCK_C], dtype=ACC)
        m2_d = tl.zeros([BLOCK_C], dtype=ACC)
        mean_h = tl.zeros([BLOCK_C], dtype=ACC)
        m2_h = tl.zeros([BLOCK_C], dtype=ACC)
        mean_w = tl.zeros([BLOCK_C], dtype=ACC)
        m2_w = tl.zeros([BLOCK_C], dtype=ACC)
        for dd in range(D_CHUNK):
            d = tl.zeros([1, RH * RW], dtype=tl.int32) + (d0 + dd)
            ok = tile_ok & (d < D)
            n_tile = tl.sum(ok.to(ACC), axis=1)
            z = _branch(x_nc, wd_ptr, c, c_ok, d, h2, w2, ok, D, H, W, sxd, sxh, sxw, 0, KD, ACC, IDX, BLOCK_C, RH * RW)
            mean_d, m2_d = _chan_merge(count, mean_d, m2_d, n_tile, z, ok)
            z = _branch(x_nc, wh_ptr, c, c_ok, d, h2, w2, ok, D, H, W, sxd, sxh, sxw, 1, KH, ACC, IDX, BLOCK_C, RH * RW)
            mean_h, m2_h = _chan_merge(count, mean_h, m2_h, n_tile, z, ok)
            z = _branch(x_nc, ww_ptr, c, c_ok, d, h2, w2, ok, D, H, W, sxd, sxh, sxw, 2, KW, ACC, IDX, BLOCK_C, RH * RW)
            mean_w, m2_w = _chan_merge(count, mean_w, m2_w, n_tile, z, ok)
            count += n_tile
        base = part_ptr + pid_s.to(tl.int64) * C * 7 + c * 7
        tl.store(base + 0, count, mask=c_ok)
        tl.store(base + 1, mean_d, mask=c_ok)
        tl.store(base + 2, m2_d, mask=c_ok)
        tl.store(base + 3, mean_h, mask=c_ok)
        tl.store(base + 4, m2_h, mask=c_ok)
        tl.store(base + 5, mean_w, mask=c_ok)
        tl.store(base + 6, m2_w, mask=c_ok)

    @triton.jit
    def _bn_grad_sums_kernel(
        x_ptr, g_ptr, wd_ptr, wh_ptr, ww_ptr, part_ptr,
        C, D, H, W, sxn, sxc, sxd, sxh, sxw, sgn, sgc, sgd, sgh, sgw, n_db, n_hb, n_wb,
        KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
        BLOCK_C: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr, D_CHUNK: tl.constexpr,
    ):
        pid_s = tl.program_id(0)
        n, d0, h, w, c = _tile_coords(pid_s, tl.program_id(1), n_db, n_hb, n_wb, BLOCK_C, RH, RW, D_CHUNK)
        c_ok = c < C
        tile_ok = c_ok[:, None] & ((h < H) & (w < W))[None, :]
        h2 = h[None, :]
        w2 = w[None, :]
        x_nc = x_ptr + n.to(IDX) * sxn + c.to(IDX)[:, None] * sxc
        g_nc = g_ptr + n.to(IDX) * sgn + c.to(IDX)[:, None] * sgc
        g_hw = h2.to(IDX) * sgh + w2.to(IDX) * sgw
        sum_g = tl.zeros([BLOCK_C], dtype=ACC)
        sum_gd = tl.zeros([BLOCK_C], dtype=ACC)
        sum_gh = tl.zeros([BLOCK_C], dtype=ACC)
        sum_gw = tl.zeros([BLOCK_C], dtype=ACC)
        for dd in range(D_CHUNK):
            d = tl.zeros([1, RH * RW], dtype=tl.int32) + (d0 + dd)
            ok = tile_ok & (d < D)
            gv = tl.load(g_nc + d.to(IDX) * sgd + g_hw, mask=ok, other=0.0).to(ACC)
            sum_g += tl.sum(gv, axis=1)
            z = _branch(x_nc, wd_ptr, c, c_ok, d, h2, w2, ok, D, H, W, sxd, sxh, sxw, 0, KD, ACC, IDX, BLOCK_C, RH * RW)
            sum_gd += tl.sum(gv * z, axis=1)
            z = _branch(x_nc, wh_ptr, c, c_ok, d, h2, w2, ok, D, H, W, sxd, sxh, sxw, 1, KH, ACC, IDX, BLOCK_C, RH * RW)
            sum_gh += tl.sum(gv * z, axis=1)
            z = _branch(x_nc, ww_ptr, c, c_ok, d, h2, w2, ok, D, H, W, sxd, sxh, sxw, 2, KW, ACC, IDX, BLOCK_C, RH * RW)
            sum_gw += tl.sum(gv * z, axis=1)
        base = part_ptr + pid_s.to(tl.int64) * C * 4 + c * 4
        tl.store(base + 0, sum_g, mask=c_ok)
        tl.store(base + 1, sum_gd, mask=c_ok)
        tl.store(base + 2, sum_gh, mask=c_ok)
        tl.store(base + 3, sum_gw, mask=c_ok)

    @triton.jit
    def _bn_branch_grad(x_nc, g_nc, w_ptr, coef_ptr, c, c_ok, xv, d, h, w, ok, D, H, W,
                        sxd, sxh, sxw, sgd, sgh, sgw, dx, partial, col,
                        AXIS: tl.constexpr, K: tl.constexpr, COL0: tl.constexpr, ACC: tl.constexpr,
                        IDX: tl.constexpr, BLOCK_C: tl.constexpr, BS: tl.constexpr):
        """Add branch AXIS's share of dx at p and of the weight-gradient partials.

        Tap i reaches p from output o = p + K//2 − i (along AXIS); dz_b(o) is rebuilt there from
        g(o) and z_b(o) = K_b x (o), which is recomputed from x.
        """
        a = tl.load(coef_ptr + c * 10 + AXIS, mask=c_ok, other=0.0)[:, None]
        e = tl.load(coef_ptr + c * 10 + 3 + AXIS, mask=c_ok, other=0.0)[:, None]
        mu = tl.load(coef_ptr + c * 10 + 6 + AXIS, mask=c_ok, other=0.0)[:, None]
        mg = tl.load(coef_ptr + c * 10 + 9, mask=c_ok, other=0.0)[:, None]
        for i in tl.static_range(K):
            if AXIS == 0:
                od = d + (K // 2 - i)
                oh = h
                ow = w
                m = ok & (od >= 0) & (od < D)
            elif AXIS == 1:
                od = d
                oh = h + (K // 2 - i)
                ow = w
                m = ok & (oh >= 0) & (oh < H)
            else:
                od = d
                oh = h
                ow = w + (K // 2 - i)
                m = ok & (ow >= 0) & (ow < W)
            gv = tl.load(g_nc + od.to(IDX) * sgd + oh.to(IDX) * sgh + ow.to(IDX) * sgw, mask=m, other=0.0).to(ACC)
            z = _branch(x_nc, w_ptr, c, c_ok, od, oh, ow, m, D, H, W, sxd, sxh, sxw, AXIS, K, ACC, IDX, BLOCK_C, BS)
            dz = tl.where(m, a * (gv - mg) - e * (z - mu), 0.0)
            dx += tl.load(w_ptr + c * K + i, mask=c_ok, other=0.0).to(ACC)[:, None] * dz
            partial += tl.where(col == COL0 + i, tl.sum(xv * dz, axis=1)[:, None], 0.0)
        return dx, partial

    @triton.jit
    def _bn_dx_kernel(
        x_ptr, g_ptr, wd_ptr, wh_ptr, ww_ptr, coef_ptr, dx_ptr, part_ptr,
        C, D, H, W, sxn, sxc, sxd, sxh, sxw, sgn, sgc, sgd, sgh, sgw, sdn, sdc, sdd, sdh, sdw,
        n_db, n_hb, n_wb,
        KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, KPAD: tl.constexpr, ACC: tl.constexpr,
        IDX: tl.constexpr, BLOCK_C: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr, D_CHUNK: tl.constexpr,
    ):
        pid_s = tl.program_id(0)
        n, d0, h, w, c = _tile_coords(pid_s, tl.program_id(1), n_db, n_hb, n_wb, BLOCK_C, RH, RW, D_CHUNK)
        c_ok = c < C
        tile_ok = c_ok[:, None] & ((h < H) & (w < W))[None, :]
        h2 = h[None, :]
        w2 = w[None, :]
        x_nc = x_ptr + n.to(IDX) * sxn + c.to(IDX)[:, None] * sxc
        g_nc = g_ptr + n.to(IDX) * sgn + c.to(IDX)[:, None] * sgc
        dx_nc = dx_ptr + n.to(IDX) * sdn + c.to(IDX)[:, None] * sdc
        col = tl.arange(0, KPAD)[None, :]
        partial = tl.zeros([BLOCK_C, KPAD], dtype=ACC)
        for dd in range(D_CHUNK):
            d = tl.zeros([1, RH * RW], dtype=tl.int32) + (d0 + dd)
            ok = tile_ok & (d < D)
            xv = tl.load(x_nc + d.to(IDX) * sxd + h2.to(IDX) * sxh + w2.to(IDX) * sxw, mask=ok, other=0.0).to(ACC)
            dx = tl.zeros([BLOCK_C, RH * RW], dtype=ACC)
            dx, partial = _bn_branch_grad(x_nc, g_nc, wd_ptr, coef_ptr, c, c_ok, xv, d, h2, w2, ok, D, H, W,
                                          sxd, sxh, sxw, sgd, sgh, sgw, dx, partial, col,
                                          0, KD, 0, ACC, IDX, BLOCK_C, RH * RW)
            dx, partial = _bn_branch_grad(x_nc, g_nc, wh_ptr, coef_ptr, c, c_ok, xv, d, h2, w2, ok, D, H, W,
                                          sxd, sxh, sxw, sgd, sgh, sgw, dx, partial, col,
                                          1, KH, KD, ACC, IDX, BLOCK_C, RH * RW)
            dx, partial = _bn_branch_grad(x_nc, g_nc, ww_ptr, coef_ptr, c, c_ok, xv, d, h2, w2, ok, D, H, W,
                                          sxd, sxh, sxw, sgd, sgh, sgw, dx, partial, col,
                                          2, KW, KD + KH, ACC, IDX, BLOCK_C, RH * RW)
            tl.store(dx_nc + d.to(IDX) * sdd + h2.to(IDX) * sdh + w2.to(IDX) * sdw,
                     dx.to(dx_ptr.dtype.element_ty), mask=ok)
        part_offs = pid_s.to(tl.int64) * C * KPAD + c[:, None] * KPAD + col
        tl.store(part_ptr + part_offs, partial, mask=c_ok[:, None] & (col < KD + KH + KW))


def _launch(kernel, x, tensors, strides, n_cols, extra_constexpr=None):
    """Run one of the tile kernels over x's positions; returns per-program partials (P, C, n_cols)."""
    n, c, d, h, w = x.shape
    cfg = _tile_config(x, h, w, d)
    grid, (n_db, n_hb, n_wb) = _grid(n, d, h, w, c, cfg)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    partials = torch.empty((grid[0], c, n_cols), dtype=acc, device=x.device)
    kernel[grid](*tensors, partials, c, d, h, w, *strides, n_db, n_hb, n_wb,
                 **(extra_constexpr or {}), ACC=_acc_dtype(x.dtype), IDX=_index_dtype(*(t for t in tensors if t.dim() == 5)),
                 BLOCK_C=cfg.block_c, RH=cfg.rows_h, RW=cfg.cols_w, D_CHUNK=cfg.d_chunk, num_warps=cfg.num_warps)
    return partials


def _merge_stats(partials: torch.Tensor):
    """Chan's merge over programs, in float64: per-branch mean and biased variance, and the count."""
    p = partials.double()
    count = p[:, :, 0]
    total = count.sum(0)
    means, variances = [], []
    for b in range(3):
        mean_p, m2_p = p[:, :, 1 + 2 * b], p[:, :, 2 + 2 * b]
        mean = (count * mean_p).sum(0) / total
        m2 = m2_p.sum(0) + (count * (mean_p - mean) ** 2).sum(0)
        means.append(mean)
        variances.append(m2 / total)
    return torch.stack(means), torch.stack(variances), total[0]


@torch.library.custom_op("dcformer_kernels::decomposed_conv3d_bn_stats", mutates_args=())
def _bn_stats_op(x: torch.Tensor, weight_d: torch.Tensor, weight_h: torch.Tensor,
                 weight_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-branch batch mean and biased variance of K_b x, each (3, C) float64."""
    weights = [t.contiguous() for t in (weight_d, weight_h, weight_w)]
    kd, kh, kw = (t.shape[1] for t in weights)
    partials = _launch(_bn_stats_kernel, x, (x, *weights), x.stride(), _N_STATS, dict(KD=kd, KH=kh, KW=kw))
    mean, var, _ = _merge_stats(partials)
    return mean, var


@_bn_stats_op.register_fake
def _(x, weight_d, weight_h, weight_w):
    shape = (3, x.shape[1])
    return x.new_empty(shape, dtype=torch.float64), x.new_empty(shape, dtype=torch.float64)


@torch.library.custom_op("dcformer_kernels::decomposed_conv3d_bn_backward", mutates_args=())
def _bn_backward_op(grad: torch.Tensor, x: torch.Tensor, weight_d: torch.Tensor, weight_h: torch.Tensor,
                    weight_w: torch.Tensor, gamma: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx, dweight_d/h/w, dgamma (3, C), dbeta (3, C) of the training-mode fused unit."""
    weights = [t.contiguous() for t in (weight_d, weight_h, weight_w)]
    kd, kh, kw = (t.shape[1] for t in weights)
    strides = (*x.stride(), *grad.stride())
    sums = _launch(_bn_grad_sums_kernel, x, (x, grad, *weights), strides, _N_SUMS,
                   dict(KD=kd, KH=kh, KW=kw)).double().sum(0)
    count = x.numel() // x.shape[1]
    sum_g, sum_gz = sums[:, 0], sums[:, 1:].T  # (C,), (3, C)
    gamma64, mean64, std64 = gamma.double(), mean.double(), std.double()
    dgamma = (sum_gz - mean64 * sum_g) / std64  # Σ g (z_b − μ_b) / σ_b
    m_b = dgamma / count
    coef = torch.cat([gamma64 / std64, gamma64 * m_b / std64**2, mean64, (sum_g / count)[None]]).T
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    kpad = next_power_of_2(kd + kh + kw)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    partials = _launch(_bn_dx_kernel, x, (x, grad, *weights, coef.to(acc).contiguous(), dx),
                       (*strides, *dx.stride()), kpad, dict(KD=kd, KH=kh, KW=kw, KPAD=kpad))
    dw = partials[:, :, : kd + kh + kw].sum(0).to(x.dtype).split([kd, kh, kw], dim=1)
    dbeta = sum_g.expand(3, -1)
    return (dx, *(t.contiguous() for t in dw), dgamma.to(gamma.dtype), dbeta.to(gamma.dtype).contiguous())


@_bn_backward_op.register_fake
def _(grad, x, weight_d, weight_h, weight_w, gamma, mean, std):
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    return (dx, torch.empty_like(weight_d), torch.empty_like(weight_h), torch.empty_like(weight_w),
            torch.empty_like(gamma), torch.empty_like(gamma))


class DecomposedConv3dBatchNormFunction(torch.autograd.Function):
    """y = Σ_b BN_b(K_b x) with batch statistics; returns y and the (3, C) batch mean / biased var."""

    @staticmethod
    def forward(ctx, x, weight_d, weight_h, weight_w, gamma, beta, eps):
        mean, var = torch.ops.dcformer_kernels.decomposed_conv3d_bn_stats(x, weight_d, weight_h, weight_w)
        std = torch.sqrt(var + eps)
        scale = (gamma.double() / std).to(x.dtype)  # (3, C)
        bias = (beta.double() - gamma.double() * mean / std).sum(0).to(x.dtype)
        y = torch.ops.dcformer_kernels.decomposed_conv3d(
            x, weight_d * scale[0, :, None], weight_h * scale[1, :, None], weight_w * scale[2, :, None], bias, 1)
        ctx.save_for_backward(x, weight_d, weight_h, weight_w, gamma, mean, std)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad, _grad_mean, _grad_var):
        x, weight_d, weight_h, weight_w, gamma, mean, std = ctx.saved_tensors
        dx, dwd, dwh, dww, dgamma, dbeta = torch.ops.dcformer_kernels.decomposed_conv3d_bn_backward(
            grad, x, weight_d, weight_h, weight_w, gamma, mean, std)
        return dx, dwd, dwh, dww, dgamma, dbeta, None


def decomposed_conv3d_batchnorm_train(x, weight_d, weight_h, weight_w, gamma, beta, eps: float = 1e-5):
    """Training-mode Σ_b BN_b(K_b x) on the fused kernels (stride 1).

    Args:
        x: (N, C, D, H, W); weight_d/h/w: (C, k); gamma, beta: (3, C) per-branch BN affine
            parameters (rows D, H, W); eps: BN epsilon.
    Returns:
        y, batch mean (3, C) and biased batch variance (3, C) of the branch convs without bias
        (float64; for the running statistics).
    """
    check_decomposed_conv3d_args(x, weight_d, weight_h, weight_w, None, 1)
    if gamma.shape != (3, x.shape[1]) or beta.shape != (3, x.shape[1]):
        raise ValueError(f"gamma and beta must have shape (3, C={x.shape[1]}); got {tuple(gamma.shape)} "
                         f"and {tuple(beta.shape)}")
    return DecomposedConv3dBatchNormFunction.apply(x, weight_d, weight_h, weight_w, gamma, beta, eps)

