"""Randomised differential cases (fixed seeds): the kernels against the PyTorch references on
shapes drawn at random, kernels longer than the volume, C = 1, both memory formats, strided
views; SigLIP with and without group ids at B and d that are not block multiples."""
from __future__ import annotations

import random

import pytest
import torch

from dcformer_kernels import decomposed_conv3d, decomposed_conv3d_batchnorm_train, decomposed_conv3d_reference
from dcformer_kernels import siglip_loss, siglip_loss_reference


def _max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def _conv_case(rng: random.Random):
    n, c = rng.choice([1, 2]), rng.choice([1, 2, 3, 5, 8])
    d, h, w = (rng.randint(1, 7) for _ in range(3))
    ks = [rng.choice([1, 3, 5, 9]) for _ in range(3)]
    layout = rng.choice(["ncdhw", "channels_last", "view"])
    dtype = rng.choice([torch.float32, torch.float64])
    base = torch.randn(n, c, d + 1, h, w + 2, dtype=dtype)
    if layout == "channels_last":
        base = base.contiguous(memory_format=torch.channels_last_3d)
    x = base[:, :, 1:, :, 1:w + 1] if layout == "view" else base[:, :, :d, :, :w]
    return x.detach().requires_grad_(), ks, rng.choice([1, 2]), rng.random() < 0.5, dtype


@pytest.mark.parametrize("seed", range(8))
def test_conv_and_fused_batchnorm_on_random_shapes(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    x, ks, stride, with_bias, dtype = _conv_case(rng)
    c = x.shape[1]
    ws = [torch.randn(c, k, dtype=dtype, requires_grad=True) for k in ks]
    bias = torch.randn(c, dtype=dtype, requires_grad=True) if with_bias else None
    leaves = [x, *ws] + ([bias] if with_bias else [])
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    y = decomposed_conv3d(x, *ws, bias, stride=stride, backend="triton")
    y_ref = decomposed_conv3d_reference(x, *ws, bias, stride=stride)
    grad = torch.randn_like(y_ref)
    got = (y, *torch.autograd.grad(y, leaves, grad))
    want = (y_ref, *torch.autograd.grad(y_ref, leaves, grad))
    for a, b in zip(got, want):
        assert _max_rel(a, b) <= tol, (seed, ks, stride, tuple(x.shape))
    if x.numel() // c > 1 and dtype == torch.float64:  # fp32 BN weight gradients can be ill-conditioned
        gamma = (torch.rand(3, c, dtype=dtype) + 0.5).requires_grad_()
        beta = torch.randn(3, c, dtype=dtype, requires_grad=True)
        grad = torch.randn(x.shape, dtype=dtype)
        runs = []
        for backend in ("triton", "torch"):
            out = decomposed_conv3d_batchnorm_train(x, *ws, gamma, beta, backend=backend)
            runs.append((*out, *torch.autograd.grad(out[0], [x, *ws, gamma, beta], grad)))
        for got, want in zip(*runs):
            assert _max_rel(got, want) <= 1e-8, (seed, ks, tuple(x.shape))


@pytest.mark.parametrize("seed", range(12))
def test_siglip_on_random_sizes(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    b, d = rng.choice([1, 2, 3, 33, 70]), rng.choice([1, 3, 17, 40])
    dtype = rng.choice([torch.float32, torch.float64])
    groups = torch.randint(0, rng.choice([2, 5, 1000]), (b,)) if rng.random() < 0.5 else None
    x = (torch.randn(b, d, dtype=dtype) * rng.choice([0.3, 1, 3])).requires_grad_()
    y = (torch.randn(b, d, dtype=dtype) * rng.choice([0.3, 1, 3])).requires_grad_()
    scale = torch.tensor(rng.uniform(-1, 3), dtype=dtype, requires_grad=True)
    shift = torch.tensor(rng.uniform(-12, 2), dtype=dtype, requires_grad=True)
    impl = rng.choice(["fused", "stripes"])
    runs = []
    for loss in (siglip_loss(x, y, scale, shift, groups, backend="triton", backward_impl=impl),
                 siglip_loss_reference(x, y, scale, shift, groups)):
        runs.append((loss, *torch.autograd.grad(loss, [x, y, scale, shift])))
    tol = 2e-4 if dtype == torch.float32 else 1e-9
    for name, got, want in zip(("loss", "dx", "dy"), runs[0], runs[1]):
        assert _max_rel(got, want) <= tol, (seed, name, b, d, impl)
    # d logit_scale and d logit_bias are sums of ~B terms of size <= 1 (times |S|): absolute scale
    assert abs(runs[0][3] - runs[1][3]).item() <= tol * b * (1 + abs(runs[1][3]).item()), (seed, "d_scale")
    assert abs(runs[0][4] - runs[1][4]).item() <= tol * b, (seed, "d_bias")
