"""Parameter, multiply-add and FLOP counts, each labelled with the counter that produced it.

- ``torch.utils.flop_counter.FlopCounterMode``: 2 FLOPs per multiply-add; the fused decomposed conv
  has a registered formula. It runs here on fake tensors (shapes only), so any input size costs
  about a second and no memory.
- fvcore ``FlopCountAnalysis``: 1 per multiply-add ("flops" in fvcore's naming, GFLOPs in the
  DCFormer paper). It counts a JIT trace, which needs real tensors (tracing meta tensors fails in
  the conv shape checks). To count at the paper's 512x512x256 on a CPU without computing the whole
  network, ``fvcore_macs(scale_down=True)`` traces at 1/4 (or 1/2) of every side and multiplies by 64 (or 8), but
  only after FlopCounterMode shows that the count at the two sizes scales exactly by that factor
  (true when every stride divides the reduced size; false for ViT attention, which is quadratic
  in tokens: those are traced at full size).

fvcore is given, besides its defaults: the fused op (``dcformer_kernels.fvcore_op_handles()``),
``scaled_dot_product_attention`` (the two matmuls, as fvcore counts an explicit ``q @ k^T`` and
``attn @ v``) and ``layer_norm`` at fvcore's own 5 per element without its 2..5-D limit (ViT3D's
patch-voxel norm runs on an 8-D view).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from typing import Sequence

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import dcformer_kernels
from dcformer_kernels.dispatch import resolve_backend
from med3dvlm.models.seg.unet import UNet

from .specs import PROJECTION_DIM, Encoder

__all__ = ["parameter_count", "flop_counter_flops", "fvcore_macs", "fvcore_trace_macs", "exact_scale", "head_counts",
           "resolved_path", "dca_cost"]


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resolved_path(encoder: Encoder, backend: str, device: torch.device) -> str:
    """'fused' (Triton kernels), 'unfused' (DCFormer's PyTorch path) or 'pytorch' (baselines)."""
    if not encoder.is_dcformer:
        return "pytorch"
    return "fused" if resolve_backend(backend, device) == "triton" else "unfused"


@contextlib.contextmanager
def _fused_dispatch_on_cpu():
    """Let ``backend="auto"`` pick the fused op for CPU tensors.

    ``resolve_backend`` chooses the Triton path for CPU tensors only under TRITON_INTERPRET=1. The
    tensors counted here are fake, so no kernel runs: the op's fake implementation gives the output
    shape and FlopCounterMode applies the op's registered formula.
    """
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def flop_counter_flops(encoder: Encoder, input_shape: tuple[int, ...], fused: bool = True,
                       **build) -> tuple[int, dict[str, int]]:
    """FlopCounterMode total and per-op FLOPs of the eval-mode forward, on fake tensors (cached).

    ``fused``: DCFormer with ``backend="auto"`` takes the fused op, as on CUDA. ``build``: overrides
    for ``create_model`` (``backend="torch"`` counts DCFormer's unfused path). SDPA is counted
    through its math form, which FlopCounterMode knows on every device.
    """
    return _flop_counter_flops(encoder, tuple(input_shape), fused, tuple(sorted(build.items())))


@functools.lru_cache(maxsize=256)
def _flop_counter_flops(encoder: Encoder, input_shape: tuple[int, ...], fused: bool,
                        build: tuple) -> tuple[int, dict[str, int]]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.device("meta"):  # no init compute; to_empty below turns the weights into fake CPU tensors
        model = encoder.build(**dict(build)).eval()
    dispatch = _fused_dispatch_on_cpu() if fused else contextlib.nullcontext()
    with FakeTensorMode(allow_non_fake_inputs=True), dispatch, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        model = model.to_empty(device="cpu")
        x = torch.empty(input_shape)
        counter = FlopCounterMode(display=False)
        with counter:
            model(x)
    per_op = {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return int(counter.get_total_flops()), per_op


# --------------------------------------------------------------------------------------------
# fvcore
# --------------------------------------------------------------------------------------------
def _layer_norm_handle(inputs, outputs) -> int:
    from fvcore.nn.jit_handles import get_shape

    return math.prod(get_shape(inputs[0])) * (5 if get_shape(inputs[2]) is not None else 4)


def _sdpa_handle(inputs, outputs) -> int:
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(inputs[i]) for i in range(3))
    rows = math.prod(q[:-1])  # batch x heads x queries
    return rows * k[-2] * q[-1] + rows * k[-2] * v[-1]


def fvcore_handles() -> dict:
    return {**dcformer_kernels.fvcore_op_handles(), "aten::layer_norm": _layer_norm_handle,
            "aten::scaled_dot_product_attention": _sdpa_handle}


def fvcore_trace_macs(model: nn.Module, x: torch.Tensor) -> tuple[int, dict[str, int], dict[str, int]]:
    """fvcore total, per-operator counts and the unsupported ops of one traced forward of ``model``."""
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(model, x).set_op_handle(**fvcore_handles())
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about Python values in the graph
        total = int(analysis.total())
    return total, {k: int(v) for k, v in analysis.by_operator().items()}, dict(analysis.unsupported_ops())


def exact_scale(encoder: Encoder, input_shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """A smaller input whose counts times ``factor`` are exactly those at ``input_shape`` (else itself, 1)."""
    full, _ = flop_counter_flops(encoder, input_shape)
    for side in (4, 2):
        if any(s % side for s in input_shape[2:]):
            continue
        small = (*input_shape[:2], *(s // side for s in input_shape[2:]))
        try:
            reduced, _ = flop_counter_flops(encoder, small)
        except ValueError:  # smaller than the encoder's downsampling
            continue
        if reduced * side**3 == full:
            return small, side**3
    return input_shape, 1


def fvcore_macs(encoder: Encoder, input_shape: tuple[int, ...], train: bool = False,
                device: torch.device | str = "cpu", backend: str | None = None,
                scale_down: bool = False) -> tuple[int, str]:
    """fvcore multiply-adds of one forward at ``input_shape``, and how they were obtained.

    ``train=True`` counts the training-mode graph (BatchNorm with batch statistics, which fvcore
    counts at 5 per element); with ``backend="torch"`` that is the official DCFormer graph, the one
    the paper counted. ``backend`` is passed to DCFormer only. ``scale_down``: trace a smaller input
    where that is exact (module docstring).
    """
    build = {"backend": backend} if encoder.is_dcformer and backend is not None else {}
    shape, factor = exact_scale(encoder, input_shape) if scale_down else (input_shape, 1)
    torch.manual_seed(0)
    model = encoder.build(**build).to(device).train(train)
    x = torch.randn(shape, device=device)
    with torch.no_grad():
        total, _, _ = fvcore_trace_macs(model, x)
    how = "traced at input" if factor == 1 else \
        f"traced at {'x'.join(map(str, shape))}, x{factor} (exact: FlopCounterMode scales by {factor})"
    return total * factor, how


def head_counts(channels: int, out_dim: int = PROJECTION_DIM) -> tuple[int, int]:
    """Parameters and fvcore multiply-adds of the paper's projection head, Linear(channels, out_dim)
    on the pooled last-stage map (one vector per volume; pooling is not counted by fvcore)."""
    head = nn.Linear(channels, out_dim)
    macs, _, _ = fvcore_trace_macs(head, torch.randn(1, channels))
    return parameter_count(head), macs


def dca_cost(image_size: Sequence[int] = (224, 224), in_channels: int = 3, out_channels: int = 2,
             channels: Sequence[int] = (32, 64, 128, 256, 512), **dca_kwargs) -> dict[str, int]:
    """Parameters and forward FLOPs of ``UNet`` without and with DCA for one image of ``image_size``.

    FLOPs from ``torch.utils.flop_counter.FlopCounterMode``: 2 per multiply-add, convolutions and
    matrix products only (pooling, interpolation, norms and softmax are not counted). Counted
    on the meta device, so nothing is computed; the attention is forced onto the math path so
    that its matrix products are counted on every backend.
    """
    result = {}
    for suffix, dca in (("without_dca", False), ("with_dca", True)):
        with torch.device("meta"):
            model = UNet(len(image_size), in_channels, out_channels, channels, dca=dca, **dca_kwargs)
            x = torch.empty(1, in_channels, *image_size)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x)
        result[f"params_{suffix}"] = sum(p.numel() for p in model.parameters())
        result[f"flops_{suffix}"] = counter.get_total_flops()
    result["added_params"] = result["params_with_dca"] - result["params_without_dca"]
    result["added_flops"] = result["flops_with_dca"] - result["flops_without_dca"]
    return result
