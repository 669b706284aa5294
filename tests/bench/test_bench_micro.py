"""Micro benchmarks (pytest-benchmark), CPU-sized:

    pytest tests/bench/test_bench_micro.py --benchmark-only

Without ``--benchmark-only`` they are skipped, so ``make test`` stays quick. On a CPU the fused op's
``backend="auto"`` is its PyTorch path.
"""
from __future__ import annotations

import pytest
import torch

from dcformer_kernels import decomposed_conv3d
from med3dvlm.models import create_model

pytest.importorskip("pytest_benchmark")

CHANNELS, SIZE, KERNEL = 32, 16, 7


@pytest.fixture(autouse=True)
def _only_with_benchmark_only(request):
    if not request.config.getoption("benchmark_only", default=False):
        pytest.skip("micro benchmark: run with `pytest tests/bench/test_bench_micro.py --benchmark-only`")


@pytest.fixture
def conv_inputs():
    torch.manual_seed(0)
    x = torch.randn(2, CHANNELS, SIZE, SIZE, SIZE)
    weights = [torch.randn(CHANNELS, KERNEL) for _ in range(3)]
    return x, weights, torch.randn(CHANNELS)


def test_decomposed_conv3d_cpu_path(benchmark, conv_inputs):
    x, weights, bias = conv_inputs
    with torch.no_grad():
        benchmark(decomposed_conv3d, x, *weights, bias)


def test_three_conv3d(benchmark, conv_inputs):
    x, _, _ = conv_inputs
    convs = [torch.nn.Conv3d(CHANNELS, CHANNELS, shape, padding=tuple(s // 2 for s in shape), groups=CHANNELS)
             for shape in ((KERNEL, 1, 1), (1, KERNEL, 1), (1, 1, KERNEL))]

    def three():
        return convs[0](x) + convs[1](x) + convs[2](x)

    with torch.no_grad():
        benchmark(three)


def test_dcformer_nano_forward(benchmark):
    torch.manual_seed(0)
    model = create_model("dcformer_nano").eval()
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        benchmark.pedantic(model, args=(x,), rounds=10, warmup_rounds=1)


def test_dcformer_nano_training_step(benchmark):
    torch.manual_seed(0)
    model = create_model("dcformer_nano").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(2, 1, 64, 64, 64)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(x).mean().backward()
        optimizer.step()

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
