"""Fused training-mode decomposed conv + per-branch BatchNorm against the unfused module."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import dcformer_kernels.decomposed_conv_bn as bn_op
from dcformer_kernels import DecomposedConv3d
from dcformer_kernels.reference import branch_conv3d


def _unfused(layer: DecomposedConv3d, x: torch.Tensor) -> torch.Tensor:
    return sum(bn(conv(x)) for conv, bn in zip(layer.branches, layer.norms))


def _layer(channels, ks, dtype=torch.float32, momentum=0.1):
    layer = DecomposedConv3d(channels, channels, ks, groups=channels, norm="batch").to(dtype)
    for bn in layer.norms:
        bn.momentum = momentum
    with torch.no_grad():
        for bn in layer.norms:
            bn.weight.normal_(1, 0.3)
            bn.bias.normal_()
    return layer.train()


@pytest.mark.parametrize("shape,ks,channels_last,momentum", [
    ((2, 5, 4, 5, 6), (3, 3, 5), False, 0.1),
    ((1, 6, 5, 4, 3), (5, 3, 3), True, None),  # cumulative moving average
])
def test_training_steps_match_unfused_module(shape, ks, channels_last, momentum):
    torch.manual_seed(0)
    fused = _layer(shape[1], ks, momentum=momentum)
    unfused = copy.deepcopy(fused)
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.1)
    opt_u = torch.optim.SGD(unfused.parameters(), lr=0.1)
    calls = []
    real = bn_op.DecomposedConv3dBatchNormFunction.apply
    bn_op.DecomposedConv3dBatchNormFunction.apply = lambda *a: calls.append(1) or real(*a)
    try:
        for step in range(3):
            x = torch.randn(shape) * 2 + 0.5
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            x_f, x_u = x.clone().requires_grad_(), x.clone().requires_grad_()
            y_f, y_u = fused(x_f), _unfused(unfused, x_u)
            torch.testing.assert_close(y_f, y_u, rtol=1e-5, atol=1e-5)
            grad = torch.randn_like(y_u)
            y_f.backward(grad)
            y_u.backward(grad)
            torch.testing.assert_close(x_f.grad, x_u.grad, rtol=1e-4, atol=1e-5)
            for (name, p_f), p_u in zip(fused.named_parameters(), unfused.parameters()):
                if "branches" in name and name.endswith("bias"):
                    # the conv bias cancels in training-mode BN: its gradient is zero in both
                    assert p_f.grad is None or torch.count_nonzero(p_f.grad) == 0
                    assert torch.allclose(p_u.grad, torch.zeros_like(p_u.grad), atol=1e-4)
                    continue
                torch.testing.assert_close(p_f.grad, p_u.grad, rtol=1e-4, atol=1e-4, msg=name)
            for b_f, b_u in zip(fused.buffers(), unfused.buffers()):
                torch.testing.assert_close(b_f, b_u, rtol=1e-5, atol=1e-6)
            opt_f.step()
            opt_u.step()
            opt_f.zero_grad()
            opt_u.zero_grad()
    finally:
        bn_op.DecomposedConv3dBatchNormFunction.apply = real
    assert len(calls) == 3  # the fused path really ran
    assert all(bn.num_batches_tracked.item() == 3 for bn in fused.norms)


def test_running_statistics_per_branch_own_settings():
    """Branches that differ in momentum, in keeping running statistics and in having a conv bias:
    each BatchNorm's buffers move exactly as nn.BatchNorm3d's would (fused path)."""
    torch.manual_seed(4)
    fused = _layer(4, (3, 5, 3))
    fused.norms[1] = torch.nn.BatchNorm3d(4, track_running_stats=False)  # batch statistics, no buffers to move
    fused.norms[0].momentum, fused.norms[2].momentum = 0.3, None
    fused.branches[2].bias = None
    unfused = copy.deepcopy(fused)
    calls = []
    real = bn_op.DecomposedConv3dBatchNormFunction.apply
    bn_op.DecomposedConv3dBatchNormFunction.apply = lambda *a: calls.append(1) or real(*a)
    try:
        for _ in range(2):
            x = torch.randn(2, 4, 5, 4, 6) * 3 - 1
            torch.testing.assert_close(fused(x), _unfused(unfused, x), rtol=1e-5, atol=1e-5)
    finally:
        bn_op.DecomposedConv3dBatchNormFunction.apply = real
    assert len(calls) == 2
    for (name, b_f), b_u in zip(fused.named_buffers(), unfused.buffers()):
        torch.testing.assert_close(b_f, b_u, rtol=1e-5, atol=1e-6, msg=name)
    assert [bn.num_batches_tracked.item() for b, bn in enumerate(fused.norms) if b != 1] == [2, 2]


def test_gradcheck_float64():
    torch.manual_seed(1)
    x = (torch.randn(1, 2, 3, 4, 3, dtype=torch.float64) + 1).requires_grad_()
    ws = [torch.randn(2, k, dtype=torch.float64, requires_grad=True) for k in (3, 1, 3)]
    gamma = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)

    def fn(*args):
        return bn_op.decomposed_conv3d_batchnorm_train(*args, eps=1e-5)[0]

    assert torch.autograd.gradcheck(fn, (x, *ws, gamma, beta), eps=1e-6, atol=1e-5, fast_mode=True)


def test_statistics_are_stable_when_the_mean_dwarfs_the_spread():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 6, 5, 7) * 0.01 + 1000.0
    ws = [torch.rand(3, k) + 0.5 for k in (3, 5, 3)]
    gamma, beta = torch.rand(3, 3) + 0.5, torch.randn(3, 3)
    y, mean, var, std = torch.ops.dcformer_kernels.decomposed_conv3d_bn_forward(x, *ws, gamma, beta, 1e-5)
    expected = 0
    for b, w in enumerate(ws):
        z = branch_conv3d(x.double(), w.double(), b)
        torch.testing.assert_close(mean[b], z.mean((0, 2, 3, 4)), rtol=1e-6, atol=0)
        torch.testing.assert_close(var[b], z.var((0, 2, 3, 4), unbiased=False), rtol=1e-3, atol=0)
        torch.testing.assert_close(std[b], (var[b] + 1e-5).sqrt(), rtol=1e-12, atol=0)
        expected = expected + torch.nn.functional.batch_norm(z, None, None, gamma[b].double(), beta[b].double(),
                                                             training=True, eps=1e-5)
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)


def test_backward_is_bitwise_deterministic():
    torch.manual_seed(3)
    layer = _layer(4, (3, 3, 5))
    x = torch.randn(2, 4, 5, 4, 6, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    params = [x, *layer.parameters()]
    first = torch.autograd.grad(y, params, grad, retain_graph=True, allow_unused=True)
    second = torch.autograd.grad(y, params, grad, allow_unused=True)
    for a, b in zip(first, second):
        assert (a is None and b is None) or torch.equal(a, b)


def test_bad_arguments():
    x = torch.randn(1, 3, 4, 4, 4)
    ws = [torch.randn(3, 3) for _ in range(3)]
    with pytest.raises(ValueError, match=r"gamma must be a tensor of shape \(3, C=3\), one row per branch; got \(3,\)"):
        bn_op.decomposed_conv3d_batchnorm_train(x, *ws, torch.ones(3), torch.zeros(3, 3))
    # the registered ops are public too: weights for 2 channels against x with 3 must not read out of bounds
    small = [w[:2] for w in ws]
    with pytest.raises(ValueError, match=r"weight_d must have shape \(C=3, k\)"):
        torch.ops.dcformer_kernels.decomposed_conv3d_bn_forward(x, *small, torch.ones(3, 3), torch.ones(3, 3), 1e-5)
    per_branch = torch.ones(3, 3)
    with pytest.raises(ValueError, match=r"beta must be a tensor of shape \(3, C=3\)"):
        torch.ops.dcformer_kernels.decomposed_conv3d_bn_forward(x, *ws, per_branch, per_branch[0], 1e-5)
    with pytest.raises(ValueError, match=r"weight_d must have shape \(C=3, k\)"):
        torch.ops.dcformer_kernels.decomposed_conv3d_bn_backward(x, x, *small, per_branch, per_branch, per_branch)
    with pytest.raises(ValueError, match=r"std must be a tensor of shape \(3, C=3\)"):
        torch.ops.dcformer_kernels.decomposed_conv3d_bn_backward(x, x, *ws, per_branch, per_branch, per_branch[:2])
    with pytest.raises(ValueError, match=r"grad must have the shape of x"):
        torch.ops.dcformer_kernels.decomposed_conv3d_bn_backward(x[:, :, :2], x, *ws, per_branch, per_branch,
                                                                  per_branch)
    layer = _layer(3, 3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3, 1, 1, 1))


def test_reference_module_matches_functional_batch_norm():
    """The oracle itself: per-branch batch statistics (guards the comparison above)."""
    torch.manual_seed(4)
    layer = _layer(3, (3, 5, 3))
    x = torch.randn(2, 3, 4, 5, 6)
    want = sum(F.batch_norm(branch_conv3d(x, conv.weight.reshape(3, -1), a, bias=conv.bias), None, None,
                            bn.weight, bn.bias, True)
               for a, (conv, bn) in enumerate(zip(layer.branches, layer.norms)))
    torch.testing.assert_close(_unfused(layer, x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_training_matches_unfused(dtype, tol, channels_last):
    torch.manual_seed(5)
    fused = _layer(48, (7, 5, 3)).cuda()
    unfused = copy.deepcopy(fused).double()  # fp64 oracle: cuDNN's fp32 convs may run in TF32
    x = torch.randn(2, 48, 13, 21, 17, device="cuda") * 2 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    # Two independent leaves (for float32, x.to(dtype) is x itself: x_u would be a non-leaf of it).
    x_f = x.detach().to(dtype, copy=True).requires_grad_()
    x_u = x.detach().double().requires_grad_()
    y_f = fused.to(dtype)(x_f)
    y_u = _unfused(unfused, x_u)
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(y_f, y_u) <= tol
    grad = torch.randn_like(y_u)
    y_f.backward(grad.to(dtype))
    y_u.backward(grad)
    assert rel(x_f.grad, x_u.grad) <= tol
    for (name, p_f), p_u in zip(fused.named_parameters(), unfused.parameters()):
        if "branches" in name and name.endswith("bias"):
            continue
        assert rel(p_f.grad, p_u.grad) <= tol, name


@pytest.mark.gpu
def test_gpu_training_under_bf16_autocast():
    torch.manual_seed(6)
    fused = _layer(32, (9, 7, 5)).cuda()
    unfused = copy.deepcopy(fused).double()
    x = torch.randn(2, 32, 9, 12, 10, device="cuda").contiguous(memory_format=torch.channels_last_3d)
    x_f, x_u = x.clone().requires_grad_(), x.double().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_f = fused(x_f)
    y_u = _unfused(unfused, x_u)
    assert y_f.dtype == torch.bfloat16
    assert ((y_f.double() - y_u).norm() / y_u.norm()).item() <= 2e-2
    y_f.float().sum().backward()
    assert fused.branches[0].weight.grad.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in fused.parameters() if p.grad is not None)


def test_torch_compile_fullgraph_matches_eager_in_training():
    """Under torch.compile (fullgraph: no graph break) the fused unit runs as the registered ops,
    their fake kernels giving the shapes, with the running statistics updated inside the graph."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    traced = set()

    def record(gm, _inputs):
        traced.update(str(node.target) for node in gm.graph.nodes)
        return make_boxed_func(gm)

    torch.manual_seed(5)
    layer = _layer(6, (3, 5, 3))
    compiled_layer = copy.deepcopy(layer)
    compiled = torch.compile(compiled_layer, fullgraph=True, backend=aot_autograd(fw_compiler=record,
                                                                                  bw_compiler=record))
    for _ in range(2):
        x = torch.randn(2, 6, 4, 5, 6) * 2 + 1
        grad = torch.randn_like(x)
        x_e, x_c = x.clone().requires_grad_(), x.clone().requires_grad_()
        eager = torch.autograd.grad(layer(x_e), [x_e, *layer.parameters()], grad, allow_unused=True)
        got = torch.autograd.grad(compiled(x_c), [x_c, *compiled_layer.parameters()], grad, allow_unused=True)
        for g, e in zip(got, eager):
            assert (g is None) == (e is None)
            if e is not None:
                torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    for b_c, b_e in zip(compiled_layer.buffers(), layer.buffers()):
        torch.testing.assert_close(b_c, b_e, rtol=1e-5, atol=1e-6)
    assert {"dcformer_kernels.decomposed_conv3d_bn_forward.default",
            "dcformer_kernels.decomposed_conv3d_bn_backward.default"} <= traced, sorted(traced)


def test_transposed_affine_parameters_get_row_per_branch_gradients():
    """γ and β given as (C, 3) parameters seen through .T (dense, not row-major): the gradients come
    back in the same (3, C) meaning as the arguments."""
    torch.manual_seed(6)
    x = torch.randn(2, 4, 4, 5, 3, dtype=torch.float64)
    ws = [torch.randn(4, k, dtype=torch.float64) for k in (3, 5, 3)]
    gamma_t = (torch.rand(4, 3, dtype=torch.float64) + 0.5).requires_grad_()
    beta_t = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    grad = torch.randn_like(x)
    y = bn_op.decomposed_conv3d_batchnorm_train(x, *ws, gamma_t.T, beta_t.T)[0]
    got = torch.autograd.grad(y, [gamma_t, beta_t], grad)
    gamma_r, beta_r = gamma_t.detach().clone().requires_grad_(), beta_t.detach().clone().requires_grad_()
    ref = sum(F.batch_norm(branch_conv3d(x, w, b), None, None, gamma_r[:, b], beta_r[:, b], training=True, eps=1e-5)
              for b, w in enumerate(ws))
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    for g, e in zip(got, torch.autograd.grad(ref, [gamma_r, beta_r], grad)):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


def test_flop_counter_counts_the_fused_unit_as_the_unfused_convs():
    """FlopCounterMode (no BatchNorm counted) gives the fused unit's forward the unfused module's
    conv FLOPs, and its backward twice that (input and weight gradients), as for the plain fused
    op. (The unfused module's backward counts more: PyTorch's formula counts a grouped conv's
    weight gradient as if the conv were not grouped.)"""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(7)
    layer = _layer(4, (3, 5, 3))
    x = torch.randn(2, 4, 4, 5, 6, requires_grad=True)
    forward = 2 * (3 + 5 + 3) * x.numel()
    for fn in (layer, lambda t: _unfused(layer, t)):
        with FlopCounterMode(display=False) as counter:
            y = fn(x)
        assert counter.get_total_flops() == forward
    with FlopCounterMode(display=False) as counter:
        layer(x).sum().backward()
    assert counter.get_total_flops() == 3 * forward



@pytest.mark.parametrize("layout", ["ncdhw", "channels_last", "strided view"])
def test_kernels_match_the_torch_backend(layout, poisoned_allocations, monkeypatch):
    """y, the batch statistics and all gradients against the PyTorch path, both memory formats and
    a strided view, with the kernels' outputs allocated full of NaN; the PyTorch path is also what
    "auto" runs on a CPU machine."""
    torch.manual_seed(9)
    base = torch.randn(2, 5, 4, 6, 7, dtype=torch.float64)
    if layout == "channels_last":
        base = base.contiguous(memory_format=torch.channels_last_3d)
    x = (base[:, :, :, :, 1:6] if layout == "strided view" else base).requires_grad_()
    ws = [torch.randn(5, k, dtype=torch.float64, requires_grad=True) for k in (3, 5, 3)]
    gamma = (torch.rand(3, 5, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    leaves = [x, *ws, gamma, beta]
    grad = torch.randn(x.shape, dtype=torch.float64)
    with poisoned_allocations():  # tests run Triton through the interpreter
        y, mean, var = bn_op.decomposed_conv3d_batchnorm_train(x, *ws, gamma, beta, backend="triton")
        fused = (y, mean, var, *torch.autograd.grad(y, leaves, grad))
    y, mean, var = bn_op.decomposed_conv3d_batchnorm_train(x, *ws, gamma, beta, backend="torch")
    reference = (y, mean, var, *torch.autograd.grad(y, leaves, grad))
    for got, want in zip(fused, reference):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU machine: "auto" takes the PyTorch path
    torch.testing.assert_close(bn_op.decomposed_conv3d_batchnorm_train(x, *ws, gamma, beta)[0], reference[0],
                               rtol=0, atol=0)


def test_second_derivatives_torch_path_exact_kernels_raise():
    torch.manual_seed(10)
    x = torch.randn(2, 2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(2, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    gamma = (torch.rand(3, 2, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda *a: bn_op.decomposed_conv3d_batchnorm_train(*a, backend="torch")[0], (x, *ws, gamma, beta))
    y = bn_op.decomposed_conv3d_batchnorm_train(x, *ws, gamma, beta, backend="triton")[0]
    (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        dx.square().sum().backward()
