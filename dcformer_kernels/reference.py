"""Pure-PyTorch references of the library's ops.

Each function states the maths the fused kernels compute. They are the CPU path, the test
oracle and the documentation of the kernels; they are written for clarity, not memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["decomposed_conv3d_reference", "decomposed_conv3d_batchnorm_train_reference", "branch_conv3d",
           "cpu_safe_conv3d"]

_AXIS_KERNEL_SHAPE = {
    0: lambda k: (k, 1, 1),  # along D
    1: lambda k: (1, k, 1),  # along H
    2: lambda k: (1, 1, k),  # along W
}


def branch_conv3d(x: torch.Tensor, weight: torch.Tensor, axis: int, stride: int = 1,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """One depthwise 1D branch: weight (C, k) along spatial ``axis`` (0=D, 1=H, 2=W).

    Zero padding k//2 on the branch's own axis only; ``stride`` on all three axes, as
    ``nn.Conv3d(C, C, kernel, stride, padding, groups=C)`` with the (k,1,1)-style kernel does.
    """
    channels, k = weight.shape
    kernel = _AXIS_KERNEL_SHAPE[axis](k)
    padding = tuple(k // 2 if a == axis else 0 for a in range(3))
    return cpu_safe_conv3d(lambda t: F.conv3d(t, weight.reshape(channels, 1, *kernel), bias, stride, padding, 1,
                                              channels), x, kernel)


def cpu_safe_conv3d(conv, x: torch.Tensor, kernel_size) -> torch.Tensor:
    """``conv(x)``, run on an NCDHW copy of x where PyTorch's CPU conv3d is wrong, and returned in
    x's memory format.

    With a channels-last CPU input and a kernel longer than the volume along an axis (DCFormer's
    deep stages: k = 9 over D = 8, k = 7 over D = 4), torch 2.13's CPU conv3d returns a wrong weight
    gradient: garbage, NaN or ~1e36 in some taps (seen for bfloat16 at stride 1 and float32 at
    stride 2, depthwise and dense; its output and input gradient are right). NCDHW is not affected.
    """
    channels_last = x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)
    if x.device.type != "cpu" or not channels_last or all(k <= s for k, s in zip(kernel_size, x.shape[2:])):
        return conv(x)
    return conv(x.contiguous()).contiguous(memory_format=torch.channels_last_3d)


def decomposed_conv3d_reference(x: torch.Tensor, weight_d: torch.Tensor, weight_h: torch.Tensor,
                                weight_w: torch.Tensor, bias: torch.Tensor | None = None,
                                stride: int = 1) -> torch.Tensor:
    """y = conv_D(x; weight_d) + conv_H(x; weight_h) + conv_W(x; weight_w) + bias.

    Three depthwise 1D convolutions (one per spatial axis, zero padding k//2 on their own
    axis, common ``stride``) summed: exactly three ``nn.Conv3d`` calls and two adds.
    """
    y = branch_conv3d(x, weight_d, 0, stride, bias)
    y = y + branch_conv3d(x, weight_h, 1, stride)
    return y + branch_conv3d(x, weight_w, 2, stride)



def decomposed_conv3d_batchnorm_train_reference(x: torch.Tensor, weight_d: torch.Tensor, weight_h: torch.Tensor,
                                                weight_w: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                                                eps: float = 1e-5):
    """y = sum_b BN_b(z_b), z_b = branch_conv3d(x, w_b, b), each BatchNorm with this batch's statistics.

    Returns y and the (3, C) batch mean and biased variance of the z_b (float64, no gradient), as
    ``decomposed_conv3d_batchnorm_train`` does: three branch tensors, written for clarity.
    """
    y, means, variances = 0, [], []
    for b, w in enumerate((weight_d, weight_h, weight_w)):
        z = branch_conv3d(x, w, b)
        y = y + F.batch_norm(z, None, None, gamma[b], beta[b], training=True, eps=eps)
        means.append(z.detach().double().mean((0, 2, 3, 4)))
        variances.append(z.detach().double().var((0, 2, 3, 4), unbiased=False))
    return y, torch.stack(means), torch.stack(variances)

# ----------------------------------------------------------------------------------------
# SigLIP pairwise-sigmoid loss
# ----------------------------------------------------------------------------------------
__all__ += ["siglip_loss_reference"]


def siglip_loss_reference(x: torch.Tensor, y: torch.Tensor, logit_scale: torch.Tensor,
                          logit_bias: torch.Tensor, group_ids: torch.Tensor | None = None) -> torch.Tensor:
    """L = -(1/B) sum_i sum_j log sigmoid(z_ij * (exp(logit_scale) * <x_i, y_j> + logit_bias)).

    z_ij = +1 on positive pairs (the diagonal, or every pair with equal ``group_ids``) and -1
    elsewhere. The sum over all B*B pairs is divided by B, as in the SigLIP paper, not by B*B.
    Computed densely in float32 (float64 for float64 inputs): it holds several B x B matrices.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    logits = x.to(dtype) @ y.to(dtype).T * logit_scale.to(dtype).exp() + logit_bias.to(dtype)
    if group_ids is None:
        positive = torch.eye(x.shape[0], y.shape[0], dtype=torch.bool, device=x.device)
    else:
        positive = group_ids[:, None] == group_ids[None, :]
    signs = positive.to(dtype) * 2 - 1
    return -F.logsigmoid(signs * logits).sum() / x.shape[0]
