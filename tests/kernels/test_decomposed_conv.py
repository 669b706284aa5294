"""Fused decomposed depthwise conv (Triton under the interpreter on CPU) against the reference."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import dcformer_kernels.decomposed_conv as dc
from dcformer_kernels.conv_common import weight_grads
from dcformer_kernels import DecomposedConv3d, decomposed_conv3d, decomposed_conv3d_reference


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_inputs(shape, ks, bias=True, dtype=torch.float32, channels_last=False, requires_grad=True):
    x = torch.randn(shape, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last_3d)
    c = shape[1]
    weights = [torch.randn(c, k, dtype=dtype) / k for k in ks]
    b = torch.randn(c, dtype=dtype) if bias else None
    leaves = [x, *weights] + ([b] if bias else [])
    for t in leaves:
        t.requires_grad_(requires_grad)
    return x, weights, b


CASES = [
    # shape (N, C, D, H, W), (kd, kh, kw), stride, channels_last, bias
    ((2, 5, 7, 6, 9), (5, 3, 7), 1, False, True),
    ((2, 5, 7, 6, 9), (5, 3, 7), 2, True, False),
    ((1, 6, 9, 5, 11), (3, 7, 1), 2, False, True),
    ((1, 3, 4, 10, 4), (9, 5, 3), 1, True, True),  # kernels longer than their axis
    ((3, 7, 5, 9, 6), (7, 5, 3), 1, False, False),
]


@pytest.mark.parametrize("shape,ks,stride,channels_last,bias", CASES)
def test_forward_backward_match_reference(shape, ks, stride, channels_last, bias, poisoned_allocations):
    torch.manual_seed(hash((shape, ks, stride)) % 2**31)
    x, weights, b = make_inputs(shape, ks, bias, channels_last=channels_last)
    with poisoned_allocations():
        y = decomposed_conv3d(x, *weights, b, stride=stride, backend="triton")
    y_ref = decomposed_conv3d_reference(x, *weights, b, stride=stride)
    assert y.shape == y_ref.shape
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=layout)
    assert y_ref.is_contiguous(memory_format=layout)  # the PyTorch path keeps x's memory format too
    assert rel_err(y, y_ref) <= 1e-5
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)

    grad = torch.randn_like(y_ref)
    leaves = [x, *weights] + ([b] if bias else [])
    with poisoned_allocations():
        got = torch.autograd.grad(y, leaves, grad)
    want = torch.autograd.grad(y_ref, leaves, grad)
    assert got[0].is_contiguous(memory_format=layout)
    for name, g, w in zip(["x", "weight_d", "weight_h", "weight_w", "bias"], got, want):
        assert rel_err(g, w) <= 1e-5, name
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4, msg=name)


def test_non_contiguous_views():
    torch.manual_seed(0)
    base = torch.randn(2, 12, 9, 8, 14)
    x = base[:, 1::2, 1:, :, ::2]  # strided in C, offset in D, strided in W
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last_3d)
    weights = [torch.randn(6, k) for k in (3, 5, 3)]
    bias = torch.randn(6)
    y = decomposed_conv3d(x, *weights, bias, backend="triton")
    torch.testing.assert_close(y, decomposed_conv3d_reference(x, *weights, bias), rtol=1e-5, atol=1e-5)

    # a non-contiguous output gradient (expanded) also reaches the kernel as is
    x = x.detach().requires_grad_()
    w_leaves = [w.requires_grad_() for w in weights]
    grad = torch.randn(1, 6, 1, 8, 7).expand(2, 6, 8, 8, 7)
    got = torch.autograd.grad(decomposed_conv3d(x, *w_leaves, backend="triton"), [x, *w_leaves], grad)
    want = torch.autograd.grad(decomposed_conv3d_reference(x, *w_leaves), [x, *w_leaves], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("stride", [1, 2])
def test_gradcheck_float64(stride):
    torch.manual_seed(stride)
    x, weights, b = make_inputs((1, 2, 3, 4, 3), (3, 1, 3), bias=True, dtype=torch.float64)
    fn = lambda *args: decomposed_conv3d(*args, stride=stride, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, *weights, b), eps=1e-6, atol=1e-6)


def test_backward_is_bitwise_deterministic():
    torch.manual_seed(3)
    x, weights, b = make_inputs((2, 6, 6, 5, 7), (5, 3, 5), channels_last=True)
    y = decomposed_conv3d(x, *weights, b, backend="triton")
    grad = torch.randn_like(y)
    first = torch.autograd.grad(y, [x, *weights, b], grad, retain_graph=True)
    second = torch.autograd.grad(y, [x, *weights, b], grad)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.parametrize("stride", [1, 2])
def test_equals_dense_depthwise_conv_with_axis_line_kernel(stride):
    torch.manual_seed(4)
    c, (kd, kh, kw) = 3, (5, 3, 7)
    x = torch.randn(1, c, 6, 7, 9)
    wd, wh, ww = torch.randn(c, kd), torch.randn(c, kh), torch.randn(c, kw)
    dense = torch.zeros(c, 1, kd, kh, kw)
    dense[:, 0, :, kh // 2, kw // 2] += wd
    dense[:, 0, kd // 2, :, kw // 2] += wh
    dense[:, 0, kd // 2, kh // 2, :] += ww
    want = F.conv3d(x, dense, None, stride, (kd // 2, kh // 2, kw // 2), groups=c)
    got = decomposed_conv3d(x, wd, wh, ww, stride=stride, backend="triton")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_nan_and_inf_propagate_like_reference(stride):
    torch.manual_seed(5)
    x = torch.randn(1, 2, 5, 6, 7)
    x[0, 0, 2, 2, 4] = float("nan")  # on the stride-2 grid
    x[0, 1, 0, 1, 1] = float("inf")  # at the D border: some taps reach no output from here
    x[0, 1, 3, 5, 2] = float("inf")  # off the stride-2 grid along H
    weights = [torch.randn(2, k) for k in (3, 3, 5)]
    got = decomposed_conv3d(x, *weights, stride=stride, backend="triton")
    want = decomposed_conv3d_reference(x, *weights, stride=stride)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.isnan(got).sum() > 1  # the NaN spread along the three axes
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)

    # Backward: x * g enters a weight gradient only where the tap reaches an output (never Inf * 0).
    leaves = [x.requires_grad_(), *[w.requires_grad_() for w in weights]]
    grad = torch.randn_like(want)
    got = torch.autograd.grad(decomposed_conv3d(*leaves, stride=stride, backend="triton"), leaves, grad)
    want = torch.autograd.grad(decomposed_conv3d_reference(*leaves, stride=stride), leaves, grad)
    for g, w in zip(got, want):
        assert torch.equal(torch.isnan(g), torch.isnan(w)) and torch.equal(torch.isinf(g), torch.isinf(w))
        finite = torch.isfinite(w)
        torch.testing.assert_close(g[finite], w[finite], rtol=1e-5, atol=1e-4)


TC_CASES = [
    # shape, (kd, kh, kw), layout ("ncdhw" | "cl" | "view"), dtype, bias
    ((1, 3, 17, 16, 20), (5, 3, 7), "ncdhw", torch.float32, True),
    ((2, 2, 16, 18, 16), (13, 1, 11), "cl", torch.float32, False),
    ((1, 3, 16, 17, 16), (3, 9, 31), "view", torch.float32, True),
    ((1, 2, 17, 18, 16), (31, 31, 1), "ncdhw", torch.float32, False),  # D and H halos wider than 32
    ((1, 2, 16, 16, 18), (7, 5, 3), "ncdhw", torch.float16, True),
]


@pytest.mark.parametrize("shape,ks,layout,dtype,bias", TC_CASES)
def test_tensor_core_forward_matches_reference(shape, ks, layout, dtype, bias, poisoned_allocations):
    """The banded-matrix forward (run here with IEEE fp32 / fp16 dots): cubes of 16 with partial
    cubes on every axis, odd channel counts (two channels per program), both memory formats, a
    strided view, k = 1 and k = 31 on every axis (halos wider than the cube)."""
    torch.manual_seed(hash((shape, ks)) % 2**31)
    base = torch.randn(shape[0], shape[1] * 2, *shape[2:])
    x = {"ncdhw": base[:, : shape[1]].contiguous(),
         "cl": base[:, : shape[1]].contiguous(memory_format=torch.channels_last_3d),
         "view": base[:, ::2]}[layout].to(dtype)
    weights = [(torch.randn(shape[1], k) / k).to(dtype) for k in ks]
    b = torch.randn(shape[1]).to(dtype) if bias else None
    assert dc.use_tensor_cores(x, 1, "tensor_cores")
    with poisoned_allocations():
        y = decomposed_conv3d(x, *weights, b, backend="triton", impl="tensor_cores")
    want = decomposed_conv3d_reference(x.double(), *[w.double() for w in weights],
                                       b.double() if bias else None)
    assert rel_err(y, want) <= (1e-3 if dtype == torch.float16 else 1e-6)
    if layout == "cl":
        assert y.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("shape,ks,layout,dtype,bias", [c for c in TC_CASES if c[3] == torch.float32])
def test_tensor_core_backward_matches_reference(shape, ks, layout, dtype, bias, poisoned_allocations):
    """dx as the forward of g with reversed kernels; weight/bias gradients as diagonal sums of
    per-cube products (the tensor-core backward); bitwise repeatable."""
    torch.manual_seed(hash((shape, ks, 1)) % 2**31)
    x = torch.randn(shape)
    x = x.contiguous(memory_format=torch.channels_last_3d) if layout == "cl" else x
    leaves = [x.requires_grad_(), *[(torch.randn(shape[1], k) / k).requires_grad_() for k in ks]]
    if bias:
        leaves.append(torch.randn(shape[1], requires_grad=True))
    y = decomposed_conv3d(*leaves, backend="triton", impl="tensor_cores")
    grad = torch.randn_like(y)
    with poisoned_allocations():
        got = torch.autograd.grad(y, leaves, grad)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    want = torch.autograd.grad(decomposed_conv3d_reference(*ref_leaves), ref_leaves, grad.double())
    for name, g, w in zip(["x", "weight_d", "weight_h", "weight_w", "bias"], got, want):
        assert rel_err(g, w) <= 1e-6, name
    again = torch.autograd.grad(decomposed_conv3d(*leaves, backend="triton", impl="tensor_cores"), leaves, grad)
    assert all(torch.equal(a, b) for a, b in zip(got, again))


def test_tensor_core_path_puts_non_finite_values_where_the_reference_does():
    """Zeros of the band times an Inf would give NaN where the reference is finite: such forward
    blocks are recomputed on the direct path, so NaN/Inf land exactly where the reference puts them."""
    torch.manual_seed(6)
    x = torch.randn(1, 3, 16, 18, 16)
    x[0, 0, 4, 17, 9] = float("inf")  # next to the H border: reaches rows past the volume in a cube
    x[0, 2, 12, 3, 3] = float("nan")
    weights = [torch.randn(3, k) for k in (5, 5, 7)]
    got = decomposed_conv3d(x, *weights, backend="triton", impl="tensor_cores")
    want = decomposed_conv3d_reference(x, *weights)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    assert not finite.all() and finite[0, 1].all()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)

    # Backward, with a NaN in the output gradient as well: every gradient non-finite exactly where
    # the reference's is (products of zeros with the Inf stay out of the weight-gradient sums).
    leaves = [x.requires_grad_(), *[w.requires_grad_() for w in weights]]
    grad = torch.randn_like(want)
    grad[0, 1, 3, 3, 3] = float("nan")
    got = torch.autograd.grad(decomposed_conv3d(*leaves, backend="triton", impl="tensor_cores"), leaves, grad)
    want = torch.autograd.grad(decomposed_conv3d_reference(*leaves), leaves, grad)
    for g, w in zip(got, want):
        assert torch.equal(torch.isnan(g), torch.isnan(w)) and torch.equal(torch.isinf(g), torch.isinf(w))
        finite = torch.isfinite(w)
        torch.testing.assert_close(g[finite], w[finite], rtol=1e-4, atol=1e-4)


def test_tensor_core_dispatch():
    def fake(shape=(2, 8, 16, 16, 16), dtype=torch.bfloat16, channels_last=False, cuda=True):
        t = torch.empty(shape, dtype=dtype, device="meta")
        t = t.contiguous(memory_format=torch.channels_last_3d) if channels_last else t
        return type("FakeCuda", (), {"shape": t.shape, "dtype": t.dtype, "is_cuda": cuda, "stride": t.stride})()

    assert dc.use_tensor_cores(fake(), 1)
    assert dc.use_tensor_cores(fake(dtype=torch.float16), 1)
    assert not dc.use_tensor_cores(fake(), 2)  # stride 2: direct kernel
    assert not dc.use_tensor_cores(fake(shape=(2, 8, 8, 16, 16)), 1)  # an axis under one cube
    assert not dc.use_tensor_cores(fake(dtype=torch.float32), 1)
    assert not dc.use_tensor_cores(fake(channels_last=True), 1)
    assert not dc.use_tensor_cores(fake(cuda=False), 1)
    assert dc.use_tensor_cores(fake(dtype=torch.float32, channels_last=True, cuda=False), 1, "tensor_cores")
    assert not dc.use_tensor_cores(fake(), 2, "tensor_cores")
    assert not dc.use_tensor_cores(fake(), 1, "direct")
    with pytest.raises(ValueError, match="impl must be one of"):
        dc.use_tensor_cores(fake(), 1, "sometimes")
    x = torch.randn(1, 2, 3, 3, 3)
    with pytest.raises(ValueError, match="impl must be one of"):
        decomposed_conv3d(x, *[torch.randn(2, 3)] * 3, impl="always")
    with pytest.raises(ValueError, match="impl must be one of"):
        DecomposedConv3d(2, 2, 3, groups=2, impl="never")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_batch(backend):
    x = torch.randn(0, 3, 4, 5, 6, requires_grad=True)
    weights = [torch.randn(3, 3, requires_grad=True) for _ in range(3)]
    y = decomposed_conv3d(x, *weights, stride=2, backend=backend)
    assert y.shape == (0, 3, 2, 3, 3)
    y.sum().backward()
    assert x.grad.shape == x.shape and all(torch.equal(w.grad, torch.zeros_like(w)) for w in weights)


def test_dispatch(monkeypatch):
    x, weights, _ = make_inputs((1, 2, 3, 3, 3), (3, 3, 3), bias=False, requires_grad=False)
    assert dc.resolve_backend("auto", x.device) == "triton"  # TRITON_INTERPRET=1 in tests
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert dc.resolve_backend("auto", x.device) == "torch"
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        decomposed_conv3d(x, *weights, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        decomposed_conv3d(x, *weights, backend="cuda")


def _args(**change):
    args = dict(x=torch.randn(1, 4, 5, 5, 5), weight_d=torch.randn(4, 3), weight_h=torch.randn(4, 3),
                weight_w=torch.randn(4, 3), bias=torch.randn(4), stride=1)
    args.update(change)
    return args


@pytest.mark.parametrize("change,error,pattern", [
    (dict(x=torch.randn(4, 5, 5, 5)), ValueError, r"x must be 5-D .*got shape \(4, 5, 5, 5\)"),
    (dict(x=torch.randn(1, 4, 5, 5, 5).int()), TypeError, "x must be float16"),
    (dict(weight_h=torch.randn(3, 3)), ValueError, r"weight_h must have shape \(C=4, k\); got \(3, 3\)"),
    (dict(weight_d=torch.randn(4, 1, 3, 1, 1)), ValueError, r"weight_d must have shape \(C=4, k\)"),
    (dict(weight_w=torch.randn(4, 4)), ValueError, "weight_w: kernel size must be odd and in 1..31; got 4"),
    (dict(weight_w=torch.randn(4, 0)), ValueError, "weight_w: kernel size must be odd"),
    (dict(weight_d=torch.randn(4, 33)), ValueError, "weight_d: kernel size must be odd and in 1..31; got 33"),
    (dict(weight_d=torch.randn(4, 3, dtype=torch.float64)), TypeError, "weight_d has dtype torch.float64"),
    (dict(weight_d=torch.randn(4, 3, device="meta")), ValueError, "weight_d is on meta but x is on cpu"),
    (dict(bias=torch.randn(5)), ValueError, r"bias must have shape \(C=4,\); got \(5,\)"),
    (dict(stride=3), ValueError, r"stride must be one of \(1, 2\); got 3"),
    (dict(stride=(1, 1, 1)), ValueError, "stride must be one of"),
])
def test_bad_input(change, error, pattern):
    with pytest.raises(error, match=pattern):
        decomposed_conv3d(**_args(**change))


def test_registered_ops_check_their_arguments():
    """torch.ops.dcformer_kernels.* are public: they validate like the functional form."""
    x = torch.randn(1, 2, 4, 5, 6)
    good = [torch.randn(2, 3) for _ in range(3)]
    with pytest.raises(ValueError, match="odd"):
        torch.ops.dcformer_kernels.decomposed_conv3d(x, torch.randn(2, 4), *good[1:], None, 1)
    with pytest.raises(ValueError, match="grad must have the output's shape"):
        torch.ops.dcformer_kernels.decomposed_conv3d_backward(torch.randn(1, 2, 4, 5, 5), x, *good, 1)


@pytest.mark.parametrize("with_bias,dtype", [(True, torch.float32), (False, torch.float64)])
def test_weight_grads_kernel_sums_partials_into_each_gradient(with_bias, dtype, seed):
    """The backward's reduction: several row blocks (P = 37) and channel blocks (C = 45 > 32),
    against a float64 sum (a float32 sum of 37 terms rounds at ~1e-6 whatever its order)."""
    taps = (5, 3, 7)
    partials = torch.randn(37, sum(taps) + with_bias, 45, dtype=dtype)
    grads = weight_grads(partials, taps, dtype)
    want = partials.double().sum(0).t().split([*taps, 1] if with_bias else list(taps), dim=1)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert len(grads) == len(want)
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got.double(), ref.reshape(got.shape), rtol=tolerance, atol=tolerance)
        assert got.is_contiguous()


def test_eager_calls_launch_directly_and_modes_get_the_registered_op(monkeypatch):
    """Plain eager calls skip the op's dispatcher (host time); a dispatch mode sees the op."""
    calls = []
    for name in ("decomposed_conv3d_forward", "decomposed_conv3d_backward"):
        monkeypatch.setattr(dc, name, lambda *a, _f=getattr(dc, name), _n=name: calls.append(_n) or _f(*a))
    x, weights, b = make_inputs((1, 3, 4, 5, 6), (5, 3, 7), requires_grad=True)
    with torch.autograd.profiler.profile() as prof:
        decomposed_conv3d(x, *weights, b, backend="triton").sum().backward()
    assert calls == ["decomposed_conv3d_forward", "decomposed_conv3d_backward"]
    assert not [e for e in prof.function_events if "dcformer_kernels::" in e.name]
    with FlopCounterMode(display=False) as counter:
        decomposed_conv3d(x, *weights, b, backend="triton").sum().backward()
    assert counter.get_flop_counts()["Global"][torch.ops.dcformer_kernels.decomposed_conv3d] > 0
    assert calls[2:] == ["decomposed_conv3d_forward", "decomposed_conv3d_backward"]  # the ops' implementations


def test_flop_counter_counts_the_fused_op():
    x, weights, b = make_inputs((1, 3, 4, 5, 6), (5, 3, 7), requires_grad=True)
    out_numel = 1 * 3 * 4 * 5 * 6
    with FlopCounterMode(display=False) as fused:
        decomposed_conv3d(x, *weights, b, backend="triton").sum().backward()
    per_op = fused.get_flop_counts()["Global"]
    assert per_op[torch.ops.dcformer_kernels.decomposed_conv3d] == 2 * 15 * out_numel
    assert per_op[torch.ops.dcformer_kernels.decomposed_conv3d_backward] == 4 * 15 * out_numel
    # Forward agrees with PyTorch's own count of the three depthwise Conv3d. (Its backward count
    # of a grouped conv's input gradient is C times too high, so backward is not compared.)
    with FlopCounterMode(display=False) as unfused:
        decomposed_conv3d(x, *weights, b, backend="torch")
    assert unfused.get_total_flops() == 2 * 15 * out_numel


def test_fvcore_counts_the_fused_op():
    fvcore = pytest.importorskip("fvcore.nn")
    layer = DecomposedConv3d(3, 3, (5, 3, 7), groups=3).eval()
    x = torch.randn(1, 3, 4, 5, 6)
    analysis = fvcore.FlopCountAnalysis(layer, x).set_op_handle(**dc.fvcore_op_handles())
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    assert analysis.total() == 15 * x.numel()  # fvcore's unit: one per multiply-add
    assert not [op for op in analysis.unsupported_ops() if "PythonOp" in op or "decomposed" in op]
    unfused = fvcore.FlopCountAnalysis(layer, x).set_op_handle(**dc.fvcore_op_handles())
    layer.backend = "torch"
    assert unfused.total() == 15 * x.numel()


def test_torch_compile_fullgraph_no_graph_break():
    torch.manual_seed(6)
    layer = DecomposedConv3d(4, 4, (3, 5, 3), groups=4)
    x = torch.randn(2, 4, 5, 6, 5, requires_grad=True)
    eager_y = layer(x)
    eager_grads = torch.autograd.grad(eager_y.square().sum(), [x, *layer.parameters()])
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
    torch.testing.assert_close(y, eager_y)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


# ---------------------------------------------------------------------------- the layer
def _randomise_bn(module: DecomposedConv3d) -> None:
    with torch.no_grad():
        for bn in module.norms:
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
            bn.bias.normal_()


@pytest.mark.parametrize("stride", [1, 2])
def test_layer_is_a_conv3d_drop_in(stride):
    layer = DecomposedConv3d(6, 6, (5, 3, 7), stride=stride, groups=6)
    conv = nn.Conv3d(6, 6, (5, 3, 7), stride=stride, padding=(2, 1, 3), groups=6)
    x = torch.randn(2, 6, 7, 6, 9)
    assert layer(x).shape == conv(x).shape


def test_layer_eval_folds_batchnorm_into_one_launch(monkeypatch):
    torch.manual_seed(7)
    layer = DecomposedConv3d(5, 5, (5, 3, 7), groups=5, norm="batch")
    _randomise_bn(layer)
    layer.eval()
    x = torch.randn(2, 5, 6, 5, 7)
    unfused = sum(bn(conv(x)) for conv, bn in zip(layer.branches, layer.norms))
    calls = []
    real = dc.DecomposedConv3dFunction.apply
    monkeypatch.setattr(dc.DecomposedConv3dFunction, "apply", lambda *a: calls.append(1) or real(*a))
    torch.testing.assert_close(layer(x), unfused, rtol=1e-5, atol=1e-5)
    assert len(calls) == 1
    fused = layer.fuse()
    assert fused.norms is None
    torch.testing.assert_close(fused(x), unfused, rtol=1e-5, atol=1e-5)


def test_layer_training_uses_per_branch_batch_statistics():
    torch.manual_seed(8)
    layer = DecomposedConv3d(4, 4, 3, groups=4, norm="batch").train()
    x = torch.randn(3, 4, 5, 5, 5) * 3 + 1
    want = sum(F.batch_norm(conv(x), None, None, bn.weight, bn.bias, training=True)
               for conv, bn in zip(layer.branches, layer.norms))
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    assert all(bn.num_batches_tracked.item() == 1 for bn in layer.norms)


@pytest.mark.parametrize("norm", [None, "batch"])
def test_layer_dense_groups_equals_three_conv3d(norm):
    torch.manual_seed(9)
    layer = DecomposedConv3d(3, 8, 5, stride=2, groups=1, norm=norm)
    if norm:
        _randomise_bn(layer)
    layer.eval()
    x = torch.randn(1, 3, 9, 8, 7)
    convs = [conv(x) for conv in layer.branches]
    if norm:
        convs = [bn(c) for bn, c in zip(layer.norms, convs)]
    torch.testing.assert_close(layer(x), sum(convs), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.fuse()(x), sum(convs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(kernel_size=4), "kernel_size entries must be odd"),
    (dict(kernel_size=(3, 3)), "kernel_size must be an int or a 3-tuple"),
    (dict(stride=3, groups=4), "stride of the fused depthwise form must be one of"),
    (dict(stride=0), "stride must be a positive int"),
    (dict(norm="layer"), "norm must be None or 'batch'"),
    (dict(groups=3), "must be divisible by groups"),
])
def test_layer_bad_arguments(kwargs, pattern):
    args = dict(in_channels=4, out_channels=4, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        DecomposedConv3d(**args)


def test_layer_takes_no_positional_padding():
    """nn.Conv3d's fifth positional argument is padding: here it must not become groups silently."""
    with pytest.raises(TypeError, match="positional argument"):
        DecomposedConv3d(96, 96, 13, 1, 6)


def test_layer_follows_autocast():
    torch.manual_seed(12)
    layer = DecomposedConv3d(4, 4, 3, groups=4, norm="batch", backend="torch").eval()
    x = torch.randn(1, 4, 5, 6, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, layer(x)) <= 2e-2


def test_layer_autocast_leaves_float64_alone():
    """Autocast never casts float64 (nor does it for nn.Conv3d)."""
    layer = DecomposedConv3d(4, 4, 3, groups=4, backend="torch").double()
    x = torch.randn(1, 4, 5, 6, 7, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, layer(x), rtol=0, atol=0)


def _hand_built(layer):
    """The layer's branches as plain nn modules (shares the parameters and buffers)."""
    return lambda x: sum(bn(conv(x)) for conv, bn in zip(layer.branches, layer.norms))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("case", ["frozen norms", "one norm without running stats"])
def test_layer_follows_each_batchnorms_own_mode(case, stride):
    """nn.BatchNorm3d's rule per branch: batch statistics where bn.training or no running stats."""
    torch.manual_seed(13)
    layer = DecomposedConv3d(4, 4, 3, stride=stride, groups=4, norm="batch")
    _randomise_bn(layer)
    if case == "frozen norms":
        layer.train()
        layer.norms.eval()
    else:
        layer.norms[1] = nn.BatchNorm3d(4, track_running_stats=False)
        layer.eval()
    x = torch.randn(2, 4, 5, 6, 7)
    torch.testing.assert_close(layer(x), _hand_built(copy.deepcopy(layer))(x), rtol=1e-5, atol=1e-5)
    if case == "one norm without running stats":
        with pytest.raises(ValueError, match=r"fuse\(\) folds running statistics, but norms.1 keeps none"):
            layer.fuse()


def test_layer_empty_batch_in_training_behaves_like_batchnorm3d():
    layer = DecomposedConv3d(4, 4, 3, groups=4, norm="batch").train()
    reference = copy.deepcopy(layer)
    x = torch.randn(0, 4, 5, 6, 7)
    y = layer(x)
    assert y.shape == (0, 4, 5, 6, 7)
    _hand_built(reference)(x)
    for got, want in zip(layer.buffers(), reference.buffers()):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_fuse_keeps_float64():
    torch.manual_seed(14)
    layer = DecomposedConv3d(4, 4, (3, 5, 3), groups=4, norm="batch").double()
    _randomise_bn(layer)
    layer.eval()
    x = torch.randn(1, 4, 5, 6, 7, dtype=torch.float64)
    fused = layer.fuse()
    assert fused.branches[0].weight.dtype == torch.float64
    torch.testing.assert_close(fused(x), layer(x), rtol=1e-12, atol=1e-12)


def test_second_derivatives_raise_instead_of_dropping_terms():
    """The kernels' backward has no graph of its own; a gradient penalty must fail loudly."""
    x, weights, bias = make_inputs((1, 3, 4, 5, 6), (3, 3, 3))
    y = decomposed_conv3d(x, *weights, bias, backend="triton")
    (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        dx.square().sum().backward()
    # the PyTorch path is differentiable twice
    x, weights, bias = (t.detach().double().requires_grad_() for t in (x, torch.stack(weights), bias))
    assert torch.autograd.gradgradcheck(lambda *a: decomposed_conv3d(*a, backend="torch"), (x, *weights, bias))


def test_layer_rejects_wrong_channels():
    with pytest.raises(ValueError, match=r"expects x of shape \(N, 4, D, H, W\); got \(1, 3, 5, 5, 5\)"):
        DecomposedConv3d(4, 4, 3, groups=4)(torch.randn(1, 3, 5, 5, 5))


# ---------------------------------------------------------------------------- GPU only
def _gpu_inputs(shape, ks, dtype, channels_last):
    x, weights, b = make_inputs(shape, ks, dtype=torch.float32, channels_last=channels_last, requires_grad=False)
    to = dict(device="cuda", dtype=dtype)
    x = x.to(**to)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return [t.to(**to).requires_grad_() for t in (x, *weights, b)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_gpu_matches_fp32_reference(dtype, tol, channels_last, stride):
    torch.manual_seed(10)
    leaves = _gpu_inputs((2, 48, 19, 33, 21), (13, 11, 9), dtype, channels_last)
    y = decomposed_conv3d(*leaves, stride=stride)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    y_ref = decomposed_conv3d_reference(*ref_leaves, stride=stride)
    assert rel_err(y, y_ref) <= tol
    grad = torch.randn_like(y_ref)
    got = torch.autograd.grad(y, leaves, grad.to(dtype))
    want = torch.autograd.grad(y_ref, ref_leaves, grad)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= tol
    again = torch.autograd.grad(decomposed_conv3d(*leaves, stride=stride), leaves, grad.to(dtype))
    assert all(torch.equal(a, b) for a, b in zip(got, again))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_tensor_cores_against_direct_kernel_and_non_finite_inputs(dtype):
    """bf16/fp16 NCDHW takes the tensor-core kernels on CUDA: same results as the direct stencil
    (fp32 accumulation both), and NaN/Inf where the reference puts them."""
    torch.manual_seed(12)
    x = torch.randn(2, 40, 20, 35, 48, device="cuda", dtype=dtype)
    x[1, 7, 4, 30, 5] = float("inf")
    weights = [torch.randn(40, k, device="cuda", dtype=dtype) / k for k in (13, 11, 9)]
    grad = torch.randn_like(x)
    assert dc.use_tensor_cores(x, 1)
    tc = [decomposed_conv3d(x, *weights), *torch.ops.dcformer_kernels.decomposed_conv3d_backward(grad, x, *weights, 1)]
    direct = [decomposed_conv3d(x, *weights, impl="direct"),
              *torch.ops.dcformer_kernels.decomposed_conv3d_backward(grad, x, *weights, 1, "direct")]
    for a, b in zip(tc, direct):
        assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.isinf(a), torch.isinf(b))
        finite = torch.isfinite(b)
        assert rel_err(a[finite], b[finite]) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["auto", "direct"])  # both kernel families, 64-bit offsets
def test_gpu_over_2_31_elements_uses_64_bit_offsets(impl):
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    torch.manual_seed(11)
    shape = (2, 4, 512, 512, 1040)  # 2.18e9 elements > 2**31
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    weights = [torch.randn(4, k, device="cuda", dtype=torch.bfloat16) / k for k in (7, 5, 3)]
    y = decomposed_conv3d(x, *weights, impl=impl)
    grad = torch.randn_like(y)
    dx = torch.ops.dcformer_kernels.decomposed_conv3d_backward(grad, x, *weights, 1, impl)[0]
    # The last (sample, channel) pair lies past element 2**31; channels are independent.
    xs, gs = x[1:, 3:].float().requires_grad_(), grad[1:, 3:].float()
    ws = [w[3:].float() for w in weights]
    ref = decomposed_conv3d_reference(xs, *ws)
    assert rel_err(y[1:, 3:], ref) <= 1e-2
    (ref_dx,) = torch.autograd.grad(ref, xs, gs)
    assert rel_err(dx[1:, 3:], ref_dx) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("norm", [None, "batch"])
def test_gpu_compiled_with_cuda_graphs_matches_eager(norm):
    """torch.compile(mode="reduce-overhead") replays CUDA graphs: the way to take host time out of
    small stages. The registered ops must capture and replay (allocations, Triton launches), for
    the plain layer and for the fused training-mode BatchNorm."""
    torch.manual_seed(15)
    layer = DecomposedConv3d(48, 48, (9, 7, 5), groups=48, norm=norm).cuda().train()
    compiled_layer = copy.deepcopy(layer)
    compiled = torch.compile(compiled_layer, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, recording, replay
        x = torch.randn(2, 48, 8, 16, 16, device="cuda")
        grad = torch.randn_like(x)
        leaves = [x.requires_grad_(), *layer.parameters()]
        eager = torch.autograd.grad(layer(x), leaves, grad, allow_unused=True)
        x_c = x.detach().clone().requires_grad_()
        got = torch.autograd.grad(compiled(x_c), [x_c, *compiled_layer.parameters()], grad, allow_unused=True)
        for g, e in zip(got, eager):
            assert (g is None) == (e is None)
            if e is not None:
                assert rel_err(g, e) <= 1e-4
    for b_c, b_e in zip(compiled_layer.buffers(), layer.buffers()):
        torch.testing.assert_close(b_c, b_e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,stride,depth", [(torch.float32, 2, 6), (torch.bfloat16, 1, 4)])
def test_cpu_path_with_channels_last_and_a_kernel_longer_than_the_volume(dtype, stride, depth):
    """torch 2.13's CPU conv3d returns garbage weight gradients for these channels-last inputs
    (reference.cpu_safe_conv3d); the PyTorch path and the unfused layer must not."""
    torch.manual_seed(16)
    x = torch.randn(1, 8, depth, 8, 8, dtype=dtype)
    ws = [torch.randn(8, 7, dtype=dtype, requires_grad=True) for _ in range(3)]
    layer = DecomposedConv3d(8, 8, 7, stride=stride, groups=8, norm="batch", backend="torch").to(dtype).train()
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last_3d):
        xf = x.contiguous(memory_format=fmt).requires_grad_()
        y = decomposed_conv3d(xf, *ws, stride=stride, backend="torch")
        z = layer(xf)
        assert y.is_contiguous(memory_format=fmt) and z.is_contiguous(memory_format=fmt)
        results.append(torch.autograd.grad(y.float().square().sum() + z.float().square().sum(),
                                           [xf, *ws, *layer.parameters()], allow_unused=True))
    for a, b in zip(*results):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)
