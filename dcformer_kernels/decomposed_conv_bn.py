"""Training-mode decomposed depthwise conv with a BatchNorm on each branch, fused.

    y = sum_b BN_b(K_b x + c_b),   b in {D, H, W},  BN_b with this batch's statistics

The branch outputs z_b = K_b x are never written to memory (derivation: docs/fused_bn.md).

Forward (two reads of x):
  1. stats kernel: z_b for the three branches in registers; per-program (count, mean, M2) per
     channel and branch (two passes over the block in registers), merged across programs with
     Chan's parallel formula in float64 (stable when |mean| >> std);
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

from ._dispatch import HAS_TRITON
from .decomposed_conv import (
    _acc_dtype,
    _block_kwargs,
    _grid,
    _index_dtype,
    _memory_format,
    _tile_config,
    _transposed,
    check_decomposed_conv3d_args,
)

if HAS_TRITON:
    import triton
    import triton.language as tl
    from .decomposed_conv import _block_coords

__all__ = ["decomposed_conv3d_batchnorm_train", "DecomposedConv3dBatchNormFunction"]

_N_STATS = 7  # count, then (mean, M2) for D, H, W
_N_SUMS = 4  # Σg, then Σg·z_b for D, H, W
_N_COEF = 10  # a_b (3), e_b (3), μ_b (3), m_g


if HAS_TRITON:

    @triton.jit
    def _branch(x0, w_ptr, c, c_ok, pos, n_pos, s_axis, ok, C,
                SHIFT: tl.constexpr, K: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr):
        """z_b = K_b x at pos + SHIFT along the branch's axis (x0 points at pos); 0 where not ok."""
        z = tl.zeros(ok.shape, dtype=ACC)
        for i in tl.static_range(K):
            q = pos + (SHIFT + i - K // 2)
            xv = tl.load(x0 + tl.cast(SHIFT + i - K // 2, IDX) * s_axis, mask=ok & ((q >= 0) & (q < n_pos)), other=0.0)
            z += tl.load(w_ptr + i * C + c, mask=c_ok, other=0.0).to(ACC) * xv.to(ACC)
        return z

    @triton.jit
    def _block_sum(v):
        """[DT, BLOCK_C, S] -> [BLOCK_C]."""
        return tl.sum(tl.sum(v, axis=2), axis=0)

    @triton.jit
    def _store_mean_m2(mean_ptr, m2_ptr, z, ok, count, mask):
        """The block's per-channel mean and sum of squared deviations of z (valid where ok)."""
        mean = _block_sum(z) / tl.maximum(count, 1.0)
        dev = tl.where(ok, z - mean[None, :, None], 0.0)
        tl.store(mean_ptr, mean, mask=mask)
        tl.store(m2_ptr, _block_sum(dev * dev), mask=mask)

    @triton.jit
    def _bn_stats_kernel(
        x_ptr, wd_ptr, wh_ptr, ww_ptr, part_ptr,
        C, D, H, W, sxn, sxc, sxd, sxh, sxw, n_db, n_hb, n_wb,
        KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
        BLOCK_C: tl.constexpr, DT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
    ):
        pid_s = tl.program_id(0)
        n, d, c, h, w = _block_coords(pid_s, tl.program_id(1), n_db, n_hb, n_wb, BLOCK_C, DT, RH, RW)
        c_ok = c < C
        ok = c_ok & (d < D) & ((h < H) & (w < W))
        x0 = x_ptr + n.to(IDX) * sxn + c.to(IDX) * sxc + d.to(IDX) * sxd + (h.to(IDX) * sxh + w.to(IDX) * sxw)
        ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        base = part_ptr + pid_s.to(tl.int64) * (7 * C) + ch  # (P, 7, C)
        count = _block_sum(ok.to(ACC))
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
        n, d, c, h, w = _block_coords(pid_s, tl.program_id(1), n_db, n_hb, n_wb, BLOCK_C, DT, RH, RW)
        c_ok = c < C
        ok = c_ok & (d < D) & ((h < H) & (w < W))
        x0 = x_ptr + n.to(IDX) * sxn + c.to(IDX) * sxc + d.to(IDX) * sxd + (h.to(IDX) * sxh + w.to(IDX) * sxw)
        g0 = g_ptr + n.to(IDX) * sgn + c.to(IDX) * sgc + d.to(IDX) * sgd + (h.to(IDX) * sgh + w.to(IDX) * sgw)
        gv = tl.load(g0, mask=ok, other=0.0).to(ACC)
        ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        base = part_ptr + pid_s.to(tl.int64) * (4 * C) + ch  # (P, 4, C)
        tl.store(base, _block_sum(gv), mask=ch < C)
        z = _branch(x0, wd_ptr, c, c_ok, d, D, sxd, ok, C, 0, KD, ACC, IDX)
        tl.store(base + C, _block_sum(gv * z), mask=ch < C)
        z = _branch(x0, wh_ptr, c, c_ok, h, H, sxh, ok, C, 0, KH, ACC, IDX)
        tl.store(base + 2 * C, _block_sum(gv * z), mask=ch < C)
        z = _branch(x0, ww_ptr, c, c_ok, w, W, sxw, ok, C, 0, KW, ACC, IDX)
        tl.store(base + 3 * C, _block_sum(gv * z), mask=ch < C)

    @triton.jit
    def _bn_branch_grad(x0, g0, w_ptr, coef_ptr, c, c_ok, xv, pos, n_pos, sx_axis, sg_axis, ok, C, dx, part,
                        part_ok, AXIS: tl.constexpr, K: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr):
        """Add branch AXIS's share of dx at p and store its weight-gradient partials.

        Tap i reaches p from output o = p + K//2 − i (along AXIS); dz_b(o) is rebuilt there from
        g(o) and z_b(o) = K_b x (o), which is recomputed from x.
        """
        a = tl.load(coef_ptr + c * 10 + AXIS, mask=c_ok, other=0.0)
        e = tl.load(coef_ptr + c * 10 + 3 + AXIS, mask=c_ok, other=0.0)
        mu = tl.load(coef_ptr + c * 10 + 6 + AXIS, mask=c_ok, other=0.0)
        mg = tl.load(coef_ptr + c * 10 + 9, mask=c_ok, other=0.0)
        for i in tl.static_range(K):
            o = pos + (K // 2 - i)
            m = ok & ((o >= 0) & (o < n_pos))
            gv = tl.load(g0 + tl.cast(K // 2 - i, IDX) * sg_axis, mask=m, other=0.0).to(ACC)
            z = _branch(x0, w_ptr, c, c_ok, pos, n_pos, sx_axis, m, C, K // 2 - i, K, ACC, IDX)
            dz = tl.where(m, a * (gv - mg) - e * (z - mu), 0.0)
            dx += tl.load(w_ptr + i * C + c, mask=c_ok, other=0.0).to(ACC) * dz
            tl.store(part + i * C, _block_sum(xv * dz), mask=part_ok)
        return dx

    @triton.jit
    def _bn_dx_kernel(
        x_ptr, g_ptr, wd_ptr, wh_ptr, ww_ptr, coef_ptr, dx_ptr, part_ptr,
        C, D, H, W, sxn, sxc, sxd, sxh, sxw, sgn, sgc, sgd, sgh, sgw, sdn, sdc, sdd, sdh, sdw,
        n_db, n_hb, n_wb,
        KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
        BLOCK_C: tl.constexpr, DT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
    ):
        pid_s = tl.program_id(0)
        n, d, c, h, w = _block_coords(pid_s, tl.program_id(1), n_db, n_hb, n_wb, BLOCK_C, DT, RH, RW)
        c_ok = c < C
        ok = c_ok & (d < D) & ((h < H) & (w < W))
        x0 = x_ptr + n.to(IDX) * sxn + c.to(IDX) * sxc + d.to(IDX) * sxd + (h.to(IDX) * sxh + w.to(IDX) * sxw)
        g0 = g_ptr + n.to(IDX) * sgn + c.to(IDX) * sgc + d.to(IDX) * sgd + (h.to(IDX) * sgh + w.to(IDX) * sgw)
        ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        part = part_ptr + pid_s.to(tl.int64) * ((KD + KH + KW) * C) + ch  # (P, KD+KH+KW, C)
        xv = tl.load(x0, mask=ok, other=0.0).to(ACC)
        dx = tl.zeros(ok.shape, dtype=ACC)
        dx = _bn_branch_grad(x0, g0, wd_ptr, coef_ptr, c, c_ok, xv, d, D, sxd, sgd, ok, C, dx, part,
                             ch < C, 0, KD, ACC, IDX)
        dx = _bn_branch_grad(x0, g0, wh_ptr, coef_ptr, c, c_ok, xv, h, H, sxh, sgh, ok, C, dx, part + KD * C,
                             ch < C, 1, KH, ACC, IDX)
        dx = _bn_branch_grad(x0, g0, ww_ptr, coef_ptr, c, c_ok, xv, w, W, sxw, sgw, ok, C, dx, part + (KD + KH) * C,
                             ch < C, 2, KW, ACC, IDX)
        dx0 = dx_ptr + n.to(IDX) * sdn + c.to(IDX) * sdc + d.to(IDX) * sdd + (h.to(IDX) * sdh + w.to(IDX) * sdw)
        tl.store(dx0, dx.to(dx_ptr.dtype.element_ty), mask=ok)


def _launch(kernel, x, tensors, strides, n_cols, extra_constexpr=None):
    """Run one of the block kernels over x's positions; returns per-program partials (P, n_cols, C)."""
    n, c, d, h, w = x.shape
    cfg = _tile_config(x, h, w, d)
    grid, (n_db, n_hb, n_wb) = _grid(n, d, h, w, c, cfg)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    partials = torch.empty((grid[0], n_cols, c), dtype=acc, device=x.device)
    kernel[grid](*tensors, partials, c, d, h, w, *strides, n_db, n_hb, n_wb,
                 **(extra_constexpr or {}), ACC=_acc_dtype(x.dtype), IDX=_index_dtype(*(t for t in tensors if t.dim() == 5)),
                 **_block_kwargs(cfg))
    return partials


def _merge_stats(partials: torch.Tensor):
    """Chan's merge over programs, in float64: per-branch mean and biased variance, and the count."""
    p = partials.double()
    count = p[:, 0]
    total = count.sum(0)
    means, variances = [], []
    for b in range(3):
        mean_p, m2_p = p[:, 1 + 2 * b], p[:, 2 + 2 * b]
        mean = (count * mean_p).sum(0) / total
        m2 = m2_p.sum(0) + (count * (mean_p - mean) ** 2).sum(0)
        means.append(mean)
        variances.append(m2 / total)
    return torch.stack(means), torch.stack(variances), total[0]


def _triton_bn_stats(x, weight_d, weight_h, weight_w):
    weights = _transposed(weight_d, weight_h, weight_w)
    kd, kh, kw = (t.shape[0] for t in weights)
    partials = _launch(_bn_stats_kernel, x, (x, *weights), x.stride(), _N_STATS, dict(KD=kd, KH=kh, KW=kw))
    mean, var, _ = _merge_stats(partials)
    return mean, var


@torch.library.custom_op("dcformer_kernels::decomposed_conv3d_bn_stats", mutates_args=())
def _bn_stats_op(x: torch.Tensor, weight_d: torch.Tensor, weight_h: torch.Tensor,
                 weight_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-branch batch mean and biased variance of K_b x, each (3, C) float64."""
    return _triton_bn_stats(x, weight_d, weight_h, weight_w)


@_bn_stats_op.register_fake
def _(x, weight_d, weight_h, weight_w):
    shape = (3, x.shape[1])
    return x.new_empty(shape, dtype=torch.float64), x.new_empty(shape, dtype=torch.float64)


def _triton_bn_backward(grad, x, weight_d, weight_h, weight_w, gamma, mean, std):
    weights = _transposed(weight_d, weight_h, weight_w)
    kd, kh, kw = (t.shape[0] for t in weights)
    strides = (*x.stride(), *grad.stride())
    sums = _launch(_bn_grad_sums_kernel, x, (x, grad, *weights), strides, _N_SUMS,
                   dict(KD=kd, KH=kh, KW=kw)).double().sum(0)
    count = x.numel() // x.shape[1]
    sum_g, sum_gz = sums[0], sums[1:]  # (C,), (3, C)
    gamma64, mean64, std64 = gamma.double(), mean.double(), std.double()
    dgamma = (sum_gz - mean64 * sum_g) / std64  # Σ g (z_b − μ_b) / σ_b
    m_b = dgamma / count
    coef = torch.cat([gamma64 / std64, gamma64 * m_b / std64**2, mean64, (sum_g / count)[None]]).T
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    partials = _launch(_bn_dx_kernel, x, (x, grad, *weights, coef.to(acc).contiguous(), dx),
                       (*strides, *dx.stride()), kd + kh + kw, dict(KD=kd, KH=kh, KW=kw))
    dw = (t.t().clone(memory_format=torch.contiguous_format) for t in partials.sum(0).to(x.dtype).split([kd, kh, kw]))
    dbeta = sum_g.expand(3, -1)
    return (dx, *dw, dgamma.to(gamma.dtype), dbeta.to(gamma.dtype).contiguous())


@torch.library.custom_op("dcformer_kernels::decomposed_conv3d_bn_backward", mutates_args=())
def _bn_backward_op(grad: torch.Tensor, x: torch.Tensor, weight_d: torch.Tensor, weight_h: torch.Tensor,
                    weight_w: torch.Tensor, gamma: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx, dweight_d/h/w, dgamma (3, C), dbeta (3, C) of the training-mode fused unit."""
    return _triton_bn_backward(grad, x, weight_d, weight_h, weight_w, gamma, mean, std)


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

