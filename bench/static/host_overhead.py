"""Host time per call of the fused decomposed conv, with every Triton launch stubbed out.

    python -m bench.static.host_overhead

At DCFormer's small stages a call's GPU work takes a few microseconds, so what the host does per
call (argument checks, autograd, allocations, launch bookkeeping, small torch ops) decides the
time (docs/conv_notes.md, "Measured"). This measures that host work on any machine: the kernels
are replaced by no-ops, the tensors are tiny CPU tensors, and ``backend="triton"`` is forced, so
every line of the Triton path's Python runs except the launches themselves. CPU timings of this
machine's CPU; a GPU host adds its own launch costs (a few us per torch op or Triton launch). On a
CUDA machine it also times the same tiny calls with their real launches (wall time per call over
1000 calls, synchronised at the end), which is what a small DCFormer stage pays per layer. Each
number is the best of five repeats.
"""
from __future__ import annotations

import argparse
import time
from unittest import mock

import torch

import dcformer_kernels.conv_common as conv_common
import dcformer_kernels.decomposed_conv as dc
import dcformer_kernels.decomposed_conv_bn as dcbn
import dcformer_kernels.layers as layers
from dcformer_kernels import DecomposedConv3d, decomposed_conv3d


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _per_call_us(fn, calls: int = 1000, repeats: int = 5) -> float:
    """The best of ``repeats`` means over ``calls`` calls (timeit's rule: slower repeats measure the
    machine's other load, not the code)."""
    for _ in range(100):
        fn()
    cuda = torch.cuda.is_available()
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def _cases(device: str) -> dict:
    """Tiny calls (2 x 8 x 4^3, k = 3): the GPU work per call is a few us, the host's is the rest."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 4, 4, device=device).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    weights = [torch.randn(8, 3, device=device, requires_grad=True) for _ in range(3)]
    bias = torch.randn(8, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    layer = DecomposedConv3d(8, 8, 3, groups=8, norm="batch", backend="triton").to(device).train()
    bn_leaves = [x, *(p for p in layer.parameters() if p.requires_grad)]

    def forward():
        with torch.no_grad():
            return decomposed_conv3d(x, *weights, bias)

    return {
        "decomposed_conv3d forward+backward (all gradients)":
            lambda: torch.autograd.grad(decomposed_conv3d(x, *weights, bias), [x, *weights, bias], grad),
        "DecomposedConv3d(norm='batch'), training, forward+backward":
            lambda: torch.autograd.grad(layer(x), bn_leaves, grad, allow_unused=True),
        "decomposed_conv3d forward (no grad)": forward,
    }


def measure(calls: int = 1000, repeats: int = 5) -> dict[str, float]:
    """Per-call host time on this CPU with every launch stubbed out (any machine)."""
    triton_backend = lambda backend, device: "triton"  # noqa: E731
    with _stubbed(dc), _stubbed(dcbn), _stubbed(conv_common), \
            mock.patch.object(dc, "resolve_backend", triton_backend), \
            mock.patch.object(dcbn, "resolve_backend", triton_backend), \
            mock.patch.object(layers, "resolve_backend", triton_backend):
        return {name: _per_call_us(fn, calls, repeats) for name, fn in _cases("cpu").items()}


def measure_cuda() -> dict[str, float]:
    """Per-call wall time on CUDA with the real launches (tiny tensors: bound by the host)."""
    return {name: _per_call_us(fn) for name, fn in _cases("cuda").items()}


def _stubbed(module):
    """Every ``*_kernel`` of ``module`` replaced by a no-op launch."""
    return mock.patch.multiple(module, **{name: _NoLaunch() for name in dir(module) if name.endswith("_kernel")})


def main(argv=None) -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    for name, us in measure().items():
        print(f"{name}: {us:.1f} us per call (CPU host time, launches stubbed)", flush=True)
    if torch.cuda.is_available():
        for name, us in measure_cuda().items():
            print(f"{name}: {us:.1f} us per call ({torch.cuda.get_device_name()}, real launches, tiny tensors)")


if __name__ == "__main__":
    main()
