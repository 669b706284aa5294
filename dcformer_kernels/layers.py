"""nn.Module drop-ins over the fused ops."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .dispatch import BACKENDS, resolve_backend
from .conv_common import MAX_KERNEL_SIZE, SUPPORTED_STRIDES
from .decomposed_conv import check_impl, decomposed_conv3d
from .decomposed_conv_bn import decomposed_conv3d_batchnorm_train
from .reference import cpu_safe_conv3d
from .siglip import BACKWARD_IMPLS, siglip_loss
from .siglip_dist import DIST_IMPLS, siglip_loss_gather, siglip_loss_ring

__all__ = ["DecomposedConv3d", "ReplacementReport", "replace_depthwise_conv3d"]

_NORMS = (None, "batch")


def _triple(kernel_size) -> tuple[int, int, int]:
    ks = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
    if len(ks) != 3 or not all(isinstance(k, int) and not isinstance(k, bool) for k in ks):
        raise ValueError(f"kernel_size must be an int or a 3-tuple of ints (kd, kh, kw); got {kernel_size!r}")
    if any(k < 1 or k % 2 == 0 or k > MAX_KERNEL_SIZE for k in ks):
        raise ValueError(f"kernel_size entries must be odd and in 1..{MAX_KERNEL_SIZE}; got {ks}")
    return ks


def _per_axis(value) -> tuple | None:
    """nn.Conv3d's spellings of a per-axis setting (an int, or a 3-tuple as it stores them) as a
    3-tuple of ints; None for anything else."""
    values = (value,) * 3 if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return None
    return values


def _one_stride(stride) -> int:
    """The single stride this layer applies on all axes, from an int or a 3-tuple of equal ints."""
    strides = _per_axis(stride)
    if strides is None or len(set(strides)) != 1 or strides[0] < 1:
        raise ValueError(f"stride must be a positive int or a 3-tuple of equal ones (DecomposedConv3d applies one "
                         f"stride on all axes); got {stride!r}")
    return strides[0]


def _check_conv3d_spellings(kernel_size: tuple, stride: int, padding, dilation, padding_mode) -> None:
    """nn.Conv3d's arguments where they describe what this layer does anyway; errors say what it supports."""
    half = tuple(k // 2 for k in kernel_size)
    if padding == "same" and stride != 1:
        raise ValueError("padding='same' needs stride 1 (as in nn.Conv3d); at stride 2 pass padding=k // 2, "
                         f"here {half}, or leave padding out")
    spelled = {"same": half, "valid": (0, 0, 0)}.get(padding) if isinstance(padding, str) else _per_axis(padding)
    if padding is not None and spelled != half:
        raise ValueError(f"padding must be k // 2 per axis, {half} for kernel_size {kernel_size} (or 'same', or left "
                         f"out): DecomposedConv3d always pads that way; got {padding!r}")
    if _per_axis(dilation) != (1, 1, 1):
        raise ValueError(f"dilation must be 1 (DecomposedConv3d has no dilated form); got {dilation!r}")
    if padding_mode != "zeros":
        raise ValueError(f"padding_mode must be 'zeros' (the fused kernels pad with zeros); got {padding_mode!r}")


def _norm_name(norm) -> str | None:
    name = norm.lower() if isinstance(norm, str) else norm
    if name not in _NORMS:
        raise ValueError(f"norm must be None or 'batch' (in any case); got {norm!r}")
    return name


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)  # autocast leaves float64 alone


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast runs convs in on ``device``; None where it is off."""
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta): nothing to cast
        return None
    return torch.get_autocast_dtype(device.type) if enabled else None


def _run_dtype(dtype: torch.dtype, autocast_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor of ``dtype`` enters the op in: the autocast dtype for eligible ones."""
    return autocast_dtype if autocast_dtype is not None and dtype in _AUTOCAST_ELIGIBLE else dtype


def _autocast(x: torch.Tensor, tensors: list) -> tuple[torch.Tensor, list]:
    """Under autocast, run the fused op in the autocast dtype, as nn.Conv3d would: floating
    tensors other than float64 are cast."""
    dtype = _autocast_dtype(x.device)
    if dtype is None:
        return x, tensors

    def cast(t):
        return t.to(dtype) if t is not None and t.dtype in _AUTOCAST_ELIGIBLE else t

    return cast(x), [cast(t) for t in tensors]


class DecomposedConv3d(nn.Module):
    """A k×k×k Conv3d replaced by three parallel 1D convs along D, H and W, summed (DCFormer).

    A drop-in for ``nn.Conv3d(in_channels, out_channels, kernel_size, stride, padding=k//2,
    groups=groups, bias=bias)`` shapes-wise. Arguments after ``stride`` are keyword-only: nn.Conv3d's
    fifth positional argument is ``padding``, which here is always k//2 per axis. nn.Conv3d's
    spellings of what this layer does are accepted (``padding`` k//2 as an int or tuple, or "same"
    at stride 1; ``stride`` as a tuple of equal ints; ``dilation=1``; ``padding_mode="zeros"``;
    ``device``, ``dtype``); other values raise a ValueError saying what is supported.
    ``replace_depthwise_conv3d`` swaps a model's depthwise nn.Conv3d layers for this one.

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
    - ``backend`` ("auto", "triton", "torch") picks the path, ``impl`` ("auto", "tensor_cores",
      "direct") the fused conv's Triton kernels, as in ``decomposed_conv3d``.

    Parameters are stored as three ``nn.Conv3d`` (``branches.0/1/2`` along D/H/W) and, with
    ``norm="batch"``, three ``nn.BatchNorm3d`` (``norms.0/1/2``), so state dicts map one to one
    onto DCFormer's per-branch layout. The repr's ``path`` says which code runs on the module's
    device in its current mode: ``triton-fused`` or ``torch`` (see ``dispatch.resolve_backend``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, *, padding=None, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", norm: str | None = None,
                 backend: str = "auto", impl: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        kd, kh, kw = _triple(kernel_size)
        stride = _one_stride(stride)
        _check_conv3d_spellings((kd, kh, kw), stride, padding, dilation, padding_mode)
        depthwise = groups == in_channels == out_channels
        if depthwise and stride not in SUPPORTED_STRIDES:
            raise ValueError(f"stride of the fused depthwise form must be one of {SUPPORTED_STRIDES}; got {stride!r}")
        norm = _norm_name(norm)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
        check_impl(impl)
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.groups = (kd, kh, kw), stride, groups
        self.backend, self.impl = backend, impl
        factory = dict(device=device, dtype=dtype)
        shapes = ((kd, 1, 1), (1, kh, 1), (1, 1, kw))
        self.branches = nn.ModuleList(
            nn.Conv3d(in_channels, out_channels, shape, stride, tuple(k // 2 for k in shape), groups=groups, bias=bias,
                      **factory)
            for shape in shapes
        )
        self.norms = nn.ModuleList(nn.BatchNorm3d(out_channels, **factory) for _ in shapes) if norm == "batch" else None

    @property
    def depthwise(self) -> bool:
        return self.groups == self.in_channels == self.out_channels

    def _branches_use_batch_stats(self) -> set[bool]:
        """Per BatchNorm, whether it normalises with this batch's statistics (nn.BatchNorm3d's rule)."""
        return {bn.training or bn.running_mean is None for bn in self.norms}

    def _route(self, device: torch.device) -> str:
        """The form forward runs on ``device`` in the current mode:

        - "fused training": every BN uses batch statistics, on the fused kernels (depthwise, stride 1,
          affine BNs of one eps, the Triton backend);
        - "branches": BNs with batch statistics otherwise: the nn.Conv3d + nn.BatchNorm3d branches;
        - "folded": no BN, or eval-mode BNs folded into the convs: the fused op for the depthwise
          form (on the backend's path), three convs otherwise.
        """
        batch_stats = self._branches_use_batch_stats() if self.norms is not None else {False}
        if batch_stats == {True} and (self.depthwise and self.stride == 1 and all(bn.affine for bn in self.norms)
                                      and len({bn.eps for bn in self.norms}) == 1
                                      and resolve_backend(self.backend, device) == "triton"):
            return "fused training"
        return "branches" if True in batch_stats else "folded"

    @property
    def path(self) -> str:
        """What forward runs on the module's device in its current mode: "triton-fused" (the fused
        Triton kernels), "torch" (PyTorch ops), or "unavailable (why)" where the backend cannot run."""
        device = self.branches[0].weight.device
        try:
            route = self._route(device)
            fused = route == "fused training" or (
                route == "folded" and self.depthwise and resolve_backend(self.backend, device) == "triton")
        except (ValueError, RuntimeError) as err:
            return f"unavailable ({err})"
        return "triton-fused" if fused else "torch"

    def _check_input(self, x) -> None:
        """x's type, shape, dtype and device in the user's terms (not the fused op's weight names)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"DecomposedConv3d expects a torch.Tensor x; got {type(x).__name__}")
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"DecomposedConv3d expects x of shape (N, {self.in_channels}, D, H, W); got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"DecomposedConv3d expects a floating-point x; got {x.dtype}: convert it first, "
                            f"e.g. x.float() (integer volumes such as int16 CT in HU too)")
        weight = self.branches[0].weight
        if x.device != weight.device:
            raise ValueError(f"x is on {x.device} but the module's parameters are on {weight.device}: move one, "
                             f"e.g. module.to(x.device)")
        autocast_dtype = _autocast_dtype(x.device)
        if _run_dtype(x.dtype, autocast_dtype) != _run_dtype(weight.dtype, autocast_dtype):
            raise TypeError(f"x has dtype {x.dtype} but the module's parameters are {weight.dtype}: cast the input "
                            f"(x.to({weight.dtype})) or the module (module.to({x.dtype}))"
                            + (" (autocast leaves float64 as it is)" if autocast_dtype is not None else ""))

    def _fused_batchnorm_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training-mode forward without branch tensors; running statistics as nn.BatchNorm3d keeps them."""
        count = x.numel() // x.shape[1]  # > 1: decomposed_conv3d_batchnorm_train raises otherwise
        c = self.out_channels
        x, (wd, wh, ww) = _autocast(x, [conv.weight.reshape(c, -1) for conv in self.branches])
        gamma = torch.stack([bn.weight for bn in self.norms])
        beta = torch.stack([bn.bias for bn in self.norms])
        y, mean, var = decomposed_conv3d_batchnorm_train(x, wd, wh, ww, gamma, beta, self.norms[0].eps, self.backend,
                                                          self.impl)
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
        self._check_input(x)
        route = self._route(x.device)
        if route == "fused training" and x.numel() > 0:  # an empty batch takes nn.BatchNorm3d's own path
            return self._fused_batchnorm_forward(x)
        if route != "folded":
            return sum(bn(cpu_safe_conv3d(conv, x, conv.kernel_size)) for conv, bn in zip(self.branches, self.norms))
        weights, bias = self.folded_parameters()
        if self.depthwise:
            c = self.out_channels
            x, (wd, wh, ww, bias) = _autocast(x, [w.reshape(c, -1) for w in weights] + [bias])
            return decomposed_conv3d(x, wd, wh, ww, bias, self.stride, self.backend, self.impl)
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
                                 groups=self.groups, bias=True, norm=None, backend=self.backend,
                                 impl=self.impl, device=weight.device, dtype=weight.dtype)  # no float32 round trip
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
                f"groups={self.groups}, norm={norm}, backend={self.backend}, path={self.path}")


@dataclass
class ReplacementReport:
    """What ``replace_depthwise_conv3d`` did: the swapped modules' qualified names, and for every
    other nn.Conv3d its name and why it was kept."""

    replaced: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def replace_depthwise_conv3d(model: nn.Module, *, kernel_size=None, backend: str = "auto") -> ReplacementReport:
    """Swap the depthwise ``nn.Conv3d`` layers of ``model`` for ``DecomposedConv3d``, in place.

    A conv is swapped where the swap keeps its output shape: an exact nn.Conv3d (not a subclass,
    whose forward may do more), depthwise (groups == in_channels == out_channels), odd kernel sizes
    up to 31, padding k // 2 per axis with zeros, no dilation, and one stride of 1 or 2 on all axes.
    ``kernel_size`` (an int or a 3-tuple of odd ints) gives every swapped layer that kernel instead
    of the conv's own, e.g. DCFormer's long 1D kernels in place of 3×3×3; ``backend`` is passed on.

    The decomposed conv is a different operator from a dense k×k×k depthwise conv (three 1D
    kernels summed: 3k weights a channel, not k³), so the swapped layers start from fresh weights
    (nn.Conv3d's default initialisation) and need training; nothing is copied from the dense
    kernels. (Their three centre lines would keep 3k − 2 of the k³ taps: a different function
    that would look like a conversion.) Each new layer takes the old one's bias setting, device,
    dtype, training mode and ``requires_grad``; a conv shared by several parents is replaced by
    one shared layer. Modules inside a DecomposedConv3d (its own branches) are left alone.
    """
    if isinstance(model, nn.Conv3d):
        raise TypeError("model is itself an nn.Conv3d, with no parent to swap it in: build DecomposedConv3d directly")
    if kernel_size is not None:
        kernel_size = _triple(kernel_size)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    report = ReplacementReport()
    swapped: dict[int, DecomposedConv3d | str] = {}
    for parent, attribute, name, conv in list(_conv3d_sites(model)):
        if id(conv) not in swapped:
            reason = _why_not_swappable(conv, kernel_size)
            swapped[id(conv)] = reason if reason else _decomposed_like(conv, kernel_size, backend)
        new = swapped[id(conv)]
        if isinstance(new, str):
            report.skipped[name] = new
        else:
            setattr(parent, attribute, new)
            report.replaced.append(name)
    return report


def _conv3d_sites(module: nn.Module, prefix: str = ""):
    """(parent, attribute, qualified name, conv) for every nn.Conv3d below ``module``, outside DecomposedConv3d."""
    for attribute, child in module.named_children():
        name = prefix + attribute
        if isinstance(child, nn.Conv3d):
            yield module, attribute, name, child
        elif not isinstance(child, DecomposedConv3d):
            yield from _conv3d_sites(child, name + ".")


def _why_not_swappable(conv: nn.Conv3d, kernel_size: tuple | None) -> str | None:
    """Why DecomposedConv3d (with ``kernel_size``, else the conv's own) cannot take this conv's place
    with the same output shape; None if it can."""
    if type(conv) is not nn.Conv3d:
        return f"a subclass of nn.Conv3d ({type(conv).__name__}): its forward may do more than the conv"
    if not conv.groups == conv.in_channels == conv.out_channels:
        return (f"not depthwise: groups={conv.groups}, in_channels={conv.in_channels}, "
                f"out_channels={conv.out_channels}")
    if any(k % 2 == 0 for k in conv.kernel_size):  # no padding keeps an even kernel's output size
        return f"kernel_size {conv.kernel_size}: DecomposedConv3d needs odd sizes"
    if kernel_size is None and max(conv.kernel_size) > MAX_KERNEL_SIZE:
        return f"kernel_size {conv.kernel_size}: DecomposedConv3d takes sizes up to {MAX_KERNEL_SIZE}"
    if conv.dilation != (1, 1, 1):
        return f"dilation {conv.dilation}: DecomposedConv3d has no dilated form"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r}: DecomposedConv3d pads with zeros"
    half = tuple(k // 2 for k in conv.kernel_size)
    padding = {"same": half, "valid": (0, 0, 0)}.get(conv.padding, conv.padding)
    if padding != half:
        return f"padding {conv.padding}: DecomposedConv3d pads k // 2 = {half}, so the output size would change"
    if len(set(conv.stride)) != 1 or conv.stride[0] not in SUPPORTED_STRIDES:
        return f"stride {conv.stride}: DecomposedConv3d applies one stride, 1 or 2, on all axes"
    return None


def _decomposed_like(conv: nn.Conv3d, kernel_size, backend: str) -> DecomposedConv3d:
    """A freshly initialised DecomposedConv3d in the place of a depthwise conv (see replace_depthwise_conv3d)."""
    weight = conv.weight
    layer = DecomposedConv3d(conv.in_channels, conv.out_channels, kernel_size or conv.kernel_size, conv.stride[0],
                             groups=conv.groups, bias=conv.bias is not None, backend=backend,
                             device=weight.device, dtype=weight.dtype)
    return layer.train(conv.training).requires_grad_(weight.requires_grad)


class SigLIPLoss(nn.Module):
    """SigLIP loss with its temperature t' and bias b (paper init: t' = log 10, b = -10).

    Args:
        init_logit_scale: initial t' (the temperature is exp(t')).
        init_logit_bias: initial b.
        learnable: t' and b are nn.Parameters if True, buffers otherwise.
        dist_impl: None (one process), "gather" or "ring" (see ``siglip_loss_gather`` /
            ``siglip_loss_ring``; each rank returns world_size * its share of the loss, so DDP's
            gradient averaging reproduces the single-process gradients).
        backend: "auto", "triton" or "torch", as for ``siglip_loss``.
        process_group: the torch.distributed group for the "gather"/"ring" modes (None: world).
        backward_impl: "auto", "fused" or "stripes", as for ``siglip_loss`` (an attribute:
            it may be changed between steps).
    """

    def __init__(self, init_logit_scale: float = math.log(10.0), init_logit_bias: float = -10.0,
                 learnable: bool = True, dist_impl: str | None = None, backend: str = "auto", process_group=None,
                 backward_impl: str = "auto"):
        super().__init__()
        if dist_impl not in DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {DIST_IMPLS}; got {dist_impl!r}")
        if backward_impl not in BACKWARD_IMPLS:
            raise ValueError(f"backward_impl must be one of {BACKWARD_IMPLS}; got {backward_impl!r}")
        scale = torch.tensor(float(init_logit_scale))
        bias = torch.tensor(float(init_logit_bias))
        if learnable:
            self.logit_scale, self.logit_bias = nn.Parameter(scale), nn.Parameter(bias)
        else:
            self.register_buffer("logit_scale", scale)
            self.register_buffer("logit_bias", bias)
        self.dist_impl = dist_impl
        self.backend = backend
        self.process_group = process_group
        self.backward_impl = backward_impl

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor,
                group_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.dist_impl is None:
            return siglip_loss(image_emb, text_emb, self.logit_scale, self.logit_bias, group_ids, self.backend,
                               self.backward_impl)
        loss_fn = siglip_loss_gather if self.dist_impl == "gather" else siglip_loss_ring
        return loss_fn(image_emb, text_emb, self.logit_scale, self.logit_bias, group_ids, self.process_group,
                       self.backend, self.backward_impl)

    def extra_repr(self) -> str:
        return f"dist_impl={self.dist_impl!r}, backend={self.backend!r}, backward_impl={self.backward_impl!r}"
