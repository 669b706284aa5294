"""nn.Module drop-ins over the fused ops."""
from __future__ import annotations

import torch
import torch.nn as nn

from ._dispatch import resolve_backend
from .decomposed_conv import MAX_KERNEL_SIZE, SUPPORTED_STRIDES, decomposed_conv3d
from .decomposed_conv_bn import decomposed_conv3d_batchnorm_train
from .reference import cpu_safe_conv3d

__all__ = ["DecomposedConv3d"]

_NORMS = (None, "batch")


def _triple(kernel_size) -> tuple[int, int, int]:
    ks = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
    if len(ks) != 3 or not all(isinstance(k, int) and not isinstance(k, bool) for k in ks):
        raise ValueError(f"kernel_size must be an int or a 3-tuple of ints (kd, kh, kw); got {kernel_size!r}")
    if any(k < 1 or k % 2 == 0 or k > MAX_KERNEL_SIZE for k in ks):
        raise ValueError(f"kernel_size entries must be odd and in 1..{MAX_KERNEL_SIZE}; got {ks}")
    return ks


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)  # autocast leaves float64 alone


def _autocast(x: torch.Tensor, tensors: list) -> tuple[torch.Tensor, list]:
    """Under autocast, run the fused op in the autocast dtype, as nn.Conv3d would: floating
    tensors other than float64 are cast."""
    try:
        enabled = torch.is_autocast_enabled(x.device.type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta): nothing to cast
        return x, tensors
    if not enabled:
        return x, tensors
    dtype = torch.get_autocast_dtype(x.device.type)

    def cast(t):
        return t.to(dtype) if t is not None and t.dtype in _AUTOCAST_ELIGIBLE else t

    return cast(x), [cast(t) for t in tensors]


class DecomposedConv3d(nn.Module):
    """A k×k×k Conv3d replaced by three parallel 1D convs along D, H and W, summed (DCFormer).

    A drop-in for ``nn.Conv3d(in_channels, out_channels, kernel_size, stride, padding=k//2,
    groups=groups, bias=bias)`` shapes-wise. Arguments after ``stride`` are keyword-only: nn.Conv3d's
    fifth positional argument is ``padding``, which here is always k//2 per axis.

    - ``groups == in_channels == out_channels``: the fused depthwise op (one kernel each way).
    - other ``groups``: three ``nn.Conv3d`` branches summed (correct, not fused).
    - ``norm="batch"``: each branch has its own BatchNorm3d before the sum, as DCFormer does.
      In eval mode the BNs and conv biases fold into the fused op's weights and one bias (a single
      launch). In training mode each branch uses its own batch statistics; for the depthwise,
      stride-1 case on the Triton backend they come from the fused training kernels
      (``decomposed_conv_bn``: no branch tensors in memory), otherwise from the unfused form.
      A branch conv's bias cancels in its BatchNorm: the fused path leaves it out of the graph, so
      its ``.grad`` stays None (the unfused form gives zeros; an optimizer then skips it, weight
      decay included). Pass ``bias=False`` with ``norm="batch"`` to have no such parameter.
      Each BatchNorm's own mode decides, as in nn.BatchNorm3d: batch statistics where
      ``bn.training`` or it keeps no running statistics (``track_running_stats=False``), running
      statistics otherwise; branches that disagree (e.g. ``layer.norms.eval()`` inside a training
      model, to freeze them) run the unfused form.

    Parameters are stored as three ``nn.Conv3d`` (``branches.0/1/2`` along D/H/W) and, with
    ``norm="batch"``, three ``nn.BatchNorm3d`` (``norms.0/1/2``), so state dicts map one to one
    onto DCFormer's per-branch layout.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride: int = 1, *, groups: int = 1,
                 bias: bool = True, norm: str | None = None, backend: str = "auto") -> None:
        super().__init__()
        kd, kh, kw = _triple(kernel_size)
        depthwise = groups == in_channels == out_channels
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be a positive int; got {stride!r}")
        if depthwise and stride not in SUPPORTED_STRIDES:
            raise ValueError(f"stride of the fused depthwise form must be one of {SUPPORTED_STRIDES}; got {stride!r}")
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}; got {norm!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.groups = (kd, kh, kw), stride, groups
        self.backend = backend
        shapes = ((kd, 1, 1), (1, kh, 1), (1, 1, kw))
        self.branches = nn.ModuleList(
            nn.Conv3d(in_channels, out_channels, shape, stride, tuple(k // 2 for k in shape), groups=groups, bias=bias)
            for shape in shapes
        )
        self.norms = nn.ModuleList(nn.BatchNorm3d(out_channels) for _ in shapes) if norm == "batch" else None

    @property
    def depthwise(self) -> bool:
        return self.groups == self.in_channels == self.out_channels

    def _branches_use_batch_stats(self) -> set[bool]:
        """Per BatchNorm, whether it normalises with this batch's statistics (nn.BatchNorm3d's rule)."""
        return {bn.training or bn.running_mean is None for bn in self.norms}

    def _fused_training_applies(self, x: torch.Tensor) -> bool:
        """Batch-statistics BN on the fused kernels: depthwise, stride 1, affine BNs, Triton
        available, a non-empty batch (an empty one takes nn.BatchNorm3d's own path)."""
        return (self.depthwise and self.stride == 1 and x.numel() > 0 and all(bn.affine for bn in self.norms)
                and len({bn.eps for bn in self.norms}) == 1 and resolve_backend(self.backend, x.device) == "triton")

    def _fused_batchnorm_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training-mode forward without branch tensors; running statistics as nn.BatchNorm3d keeps them."""
        count = x.numel() // max(x.shape[1], 1)
        if count <= 1:
            raise ValueError(f"expected more than 1 value per channel when training; got input of shape {tuple(x.shape)}")
        c = self.out_channels
        x, (wd, wh, ww) = _autocast(x, [conv.weight.reshape(c, -1) for conv in self.branches])
        gamma = torch.stack([bn.weight for bn in self.norms])
        beta = torch.stack([bn.bias for bn in self.norms])
        y, mean, var = decomposed_conv3d_batchnorm_train(x, wd, wh, ww, gamma, beta, self.norms[0].eps, self.backend)
        tracked = [b for b, bn in enumerate(self.norms) if bn.training and bn.track_running_stats]
        if tracked:
            self._update_running_stats(tracked, mean, var * (count / (count - 1)))
        return y

    @torch.no_grad()
    def _update_running_stats(self, tracked: list[int], mean: torch.Tensor, var: torch.Tensor) -> None:
        """nn.BatchNorm3d's running-statistics update for the branches in ``tracked``, from the (3, C)
        batch mean and unbiased variance of the convs without bias; a handful of foreach ops in all."""
        norms = [self.norms[b] for b in tracked]
        biases = [self.branches[b].bias for b in tracked]
        torch._foreach_add_([bn.num_batches_tracked for bn in norms], 1)
        momenta = [bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked.item() for bn in norms]
        rows = slice(None) if len(tracked) == 3 else tracked  # a view in the usual case, not a gather
        means, variances = mean[rows], var[rows]
        present = [bias for bias in biases if bias is not None]
        if present:  # a branch's conv bias shifts its mean
            means = means + torch.stack([torch.zeros_like(present[0]) if bias is None else bias for bias in biases])
        dtype = norms[0].running_mean.dtype
        torch._foreach_lerp_([bn.running_mean for bn in norms], list(means.to(dtype).unbind()), momenta)
        torch._foreach_lerp_([bn.running_var for bn in norms], list(variances.to(dtype).unbind()), momenta)

    def folded_parameters(self) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Branch conv weights and one bias with eval-mode BN folded in (differentiable).

        BN(z + c) = (γ/σ)·z + β + γ(c − μ)/σ with σ = sqrt(running_var + eps), so each branch's
        weight scales by γ/σ and the three biases and shifts add up to a single bias.
        """
        weights = [conv.weight for conv in self.branches]
        conv_biases = [conv.bias for conv in self.branches]
        if self.norms is None:
            bias = None if conv_biases[0] is None else conv_biases[0] + conv_biases[1] + conv_biases[2]
            return weights, bias
        bias = 0
        folded = []
        for w, c, bn in zip(weights, conv_biases, self.norms):
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else torch.rsqrt(bn.running_var + bn.eps)
            shift = -bn.running_mean if c is None else c - bn.running_mean
            bias = bias + scale * shift + (bn.bias if bn.affine else 0)
            folded.append(w * scale.reshape(-1, *([1] * (w.dim() - 1))))
        return folded, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"DecomposedConv3d expects x of shape (N, {self.in_channels}, D, H, W); got {tuple(x.shape)}")
        batch_stats = self._branches_use_batch_stats() if self.norms is not None else {False}
        if batch_stats == {True} and self._fused_training_applies(x):
            return self._fused_batchnorm_forward(x)
        if True in batch_stats:
            return sum(bn(cpu_safe_conv3d(conv, x, conv.kernel_size)) for conv, bn in zip(self.branches, self.norms))
        weights, bias = self.folded_parameters()
        if self.depthwise:
            c = self.out_channels
            x, (wd, wh, ww, bias) = _autocast(x, [w.reshape(c, -1) for w in weights] + [bias])
            return decomposed_conv3d(x, wd, wh, ww, bias, self.stride, self.backend)
        y = sum(cpu_safe_conv3d(lambda t, conv=conv, w=w: conv._conv_forward(t, w, None), x, conv.kernel_size)
                for conv, w in zip(self.branches, weights))
        return y if bias is None else y + bias.reshape(1, -1, 1, 1, 1)

    @torch.no_grad()
    def fuse(self) -> "DecomposedConv3d":
        """An equivalent inference module (norm=None) with eval-mode BN folded into the convs.

        Folds the running statistics, so every BatchNorm must keep them (``track_running_stats``).
        """
        if self.norms is not None:
            for i, bn in enumerate(self.norms):
                if bn.running_mean is None:
                    raise ValueError(f"fuse() folds running statistics, but norms.{i} keeps none "
                                     f"(track_running_stats=False): its output depends on each batch")
        weight = self.branches[0].weight
        fused = DecomposedConv3d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                 groups=self.groups, bias=True, norm=None, backend=self.backend)
        fused = fused.to(device=weight.device, dtype=weight.dtype)  # before the copies: no float32 round trip
        weights, bias = self.folded_parameters()
        for conv, w in zip(fused.branches, weights):
            conv.weight.copy_(w)
            conv.bias.zero_()
        if bias is not None:
            fused.branches[0].bias.copy_(bias)
        return fused.eval()

    def extra_repr(self) -> str:
        norm = "batch" if self.norms is not None else None
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}, norm={norm}, fused={self.depthwise}")
