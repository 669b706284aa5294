"""Host time per call of the fused decomposed conv, with every Triton launch stubbed out.

    python -m bench.host_overhead

At DCFormer's small stages a call's GPU work takes a few microseconds, so what the host does per
call (argument checks, autograd, allocations, launch bookkeeping, small torch ops) decides the
time (bench/conv_notes.md, "Measured"). This measures that host work on any machine: the kernels
are replaced by no-ops, the tensors are tiny CPU tensors, and ``backend="triton"`` is forced, so
every line of the Triton path's Python runs except the launches themselves. CPU timings of this
machine's CPU; a GPU host adds its own launch costs (a few us per torch op or Triton launch).
"""
from __future__ import annotations

import time
from unittest import mock

import torch

import dcformer_kernels.decomposed_conv as dc
import dcformer_kernels.decomposed_conv_bn as dcbn
import dcformer_kernels.layers as layers
from dcformer_kernels import DecomposedConv3d, decomposed_conv3d


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _per_call_us(fn, calls: int = 3000) -> float:
    for _ in range(100):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def measure() -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 4, 4).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    weights = [torch.randn(8, 3, requires_grad=True) for _ in range(3)]
    bias = torch.randn(8, requires_grad=True)
    grad = torch.randn_like(x)
    leaves = [x, *weights, bias]
    layer = DecomposedConv3d(8, 8, 3, groups=8, norm="batch", backend="triton").train()
    bn_leaves = [x, *(p for p in layer.parameters() if p.requires_grad)]
    triton_backend = lambda backend, device: "triton"  # noqa: E731
    with _stubbed(dc), _stubbed(dcbn), mock.patch.object(dc, "resolve_backend", triton_backend), \
            mock.patch.object(layers, "resolve_backend", triton_backend):
        results = {
            "decomposed_conv3d forward+backward (all gradients)": _per_call_us(
                lambda: torch.autograd.grad(decomposed_conv3d(x, *weights, bias), leaves, grad)),
            "DecomposedConv3d(norm='batch'), training, forward+backward": _per_call_us(
                lambda: torch.autograd.grad(layer(x), bn_leaves, grad, allow_unused=True), calls=1000),
        }
        with torch.no_grad():
            results["decomposed_conv3d forward (no grad)"] = _per_call_us(lambda: decomposed_conv3d(x, *weights, bias))
    return results


def _stubbed(module):
    """Every ``*_kernel`` of ``module`` replaced by a no-op launch."""
    return mock.patch.multiple(module, **{name: _NoLaunch() for name in dir(module) if name.endswith("_kernel")})


def main() -> None:
    for name, us in measure().items():
        print(f"{name}: {us:.1f} us per call (CPU host time, launches stubbed)")


if __name__ == "__main__":
    main()
