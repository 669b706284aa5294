"""Where the Triton and PyTorch paths of an op must agree at the edges (issue 20) and what the
interpreter must refuse: one value per channel, empty batches, parameter dtypes, non-finite
weights and gradients, meta tensors, bfloat16 under TRITON_INTERPRET=1."""
from __future__ import annotations

import random
import warnings

import pytest
import torch
import torch.nn.functional as F

from dcformer_kernels.conv_common import output_shape
from dcformer_kernels import (DecomposedConv3d, decomposed_conv3d, decomposed_conv3d_batchnorm_train,
                              decomposed_conv3d_reference, siglip_loss, siglip_loss_reference)

BACKENDS = ["triton", "torch"]
INF, NAN = float("inf"), float("nan")


def _bn_inputs(shape, dtype=torch.float32, requires_grad=False):
    c = shape[1]
    x = torch.randn(shape, dtype=dtype)
    ws = [torch.randn(c, k, dtype=dtype) for k in (3, 5, 3)]
    gamma, beta = torch.rand(3, c, dtype=dtype) + 0.5, torch.randn(3, c, dtype=dtype)
    tensors = [x, *ws, gamma, beta]
    return [t.requires_grad_(requires_grad) for t in tensors]


# ---------------------------------------------------------------------- training-mode BatchNorm unit
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 3, 1, 1, 1), (1, 2, 1, 1, 1)])
def test_batchnorm_train_one_value_per_channel_raises_as_batchnorm3d(backend, shape):
    """A lone value per channel normalises to 0 exactly; the kernels returned rounding noise."""
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        decomposed_conv3d_batchnorm_train(*_bn_inputs(shape), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batchnorm_train_empty_batch_nan_statistics_and_zero_gradients(backend):
    x, *params = _bn_inputs((0, 3, 4, 5, 6), requires_grad=True)
    y, mean, var = decomposed_conv3d_batchnorm_train(x, *params, backend=backend)
    assert y.shape == x.shape
    assert mean.shape == var.shape == (3, 3) and mean.dtype == var.dtype == torch.float64
    assert mean.isnan().all() and var.isnan().all()  # the mean of no values, as torch.mean gives
    grads = torch.autograd.grad(y.sum(), [x, *params])
    assert grads[0].shape == x.shape
    assert all(torch.equal(g, torch.zeros_like(p)) for g, p in zip(grads[1:], params))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype,gamma_dtype,beta_dtype,pattern", [
    (torch.float32, torch.int64, torch.float32, "gamma must have x's dtype torch.float32; got torch.int64"),
    (torch.float32, torch.float32, torch.int64, "beta must have x's dtype torch.float32; got torch.int64"),
    (torch.float32, torch.float64, torch.float64, "gamma must have x's dtype torch.float32; got torch.float64"),
    (torch.float64, torch.float32, torch.float32, "gamma must have x's dtype torch.float64; got torch.float32"),
    (torch.float16, torch.float32, torch.float16, "beta has dtype torch.float16 but gamma has dtype torch.float32"),
])
def test_batchnorm_train_affine_dtypes_raise_type_errors_naming_them(backend, x_dtype, gamma_dtype, beta_dtype,
                                                                     pattern):
    x, *ws, gamma, beta = _bn_inputs((2, 3, 3, 4, 5), dtype=x_dtype)
    with pytest.raises(TypeError, match=pattern):
        decomposed_conv3d_batchnorm_train(x, *ws, gamma.to(gamma_dtype), beta.to(beta_dtype), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batchnorm_train_takes_float32_affine_parameters_for_half_x(backend):
    """F.batch_norm's mixed precision (what autocast hands the layer): float16 x, float32 gamma and beta."""
    x, *ws, gamma, beta = _bn_inputs((2, 3, 3, 4, 5))
    y, _, _ = decomposed_conv3d_batchnorm_train(x.half(), *(w.half() for w in ws), gamma, beta, backend=backend)
    want, _, _ = decomposed_conv3d_batchnorm_train(x, *ws, gamma, beta, backend="torch")
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------- non-finite weights and gradients
def _conv_results(x, weights, grad, stride, backend, impl="direct"):
    leaves = [x.detach().clone().requires_grad_(), *(w.detach().clone().requires_grad_() for w in weights)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy's "invalid value" under the interpreter
        y = decomposed_conv3d(*leaves, stride=stride, backend=backend, impl=impl)
        return (y, *torch.autograd.grad(y, leaves, grad))


def _padded_then_valid(x, weights, grad, stride):
    """The definition both paths follow: zero-pad x by k // 2 along each branch's axis, then a conv
    without padding (so padding zeros are data: g * 0 is NaN where g is not finite)."""
    leaves = [x.detach().clone().requires_grad_(), *(w.detach().clone().requires_grad_() for w in weights)]
    y = 0
    for axis, w in enumerate(leaves[1:]):
        k = w.shape[1]
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = k // 2  # F.pad lists the last axis first
        kernel = [1, 1, 1]
        kernel[axis] = k
        y = y + F.conv3d(F.pad(leaves[0], pad), w.reshape(w.shape[0], 1, *kernel), stride=stride,
                         groups=w.shape[0])
    return (y, *torch.autograd.grad(y, leaves, grad))


def _assert_same_ieee(got, want, names=("y", "dx", "dweight_d", "dweight_h", "dweight_w")):
    for name, a, b in zip(names, got, want):
        assert torch.equal(a.isnan(), b.isnan()), f"{name}: NaN at other positions"
        assert torch.equal(a.isinf(), b.isinf()) and torch.equal(a[a.isinf()], b[b.isinf()]), f"{name}: Inf differs"
        finite = b.isfinite()
        torch.testing.assert_close(a[finite], b[finite], rtol=1e-9, atol=1e-9, msg=name)


PATHS = [  # (tensor cores, shape, stride)
    (False, (1, 2, 5, 6, 7), 1),
    (False, (1, 2, 5, 6, 7), 2),
    (True, (1, 2, 16, 16, 17), 1),
]


@pytest.mark.parametrize("tensor_cores,shape,stride", PATHS)
@pytest.mark.parametrize("value", [INF, NAN])
def test_non_finite_weight_gives_dx_where_the_reference_does(tensor_cores, shape, stride, value):
    """dx[p] sums w * g over the outputs a tap of p reaches: a non-finite tap that reaches none
    from p adds nothing (the kernels used to add w * 0 = NaN from the masked-out g)."""
    impl = "tensor_cores" if tensor_cores else "direct"
    torch.manual_seed(20)
    x = torch.randn(shape, dtype=torch.float64)
    weights = [torch.randn(2, k, dtype=torch.float64) for k in (3, 5, 3)]
    weights[1][0, 0] = value  # first H tap of channel 0: reaches no output from the last rows
    grad = torch.randn(output_shape(x, 3, 5, 3, stride), dtype=torch.float64)
    got = _conv_results(x, weights, grad, stride, "triton", impl)
    want = _conv_results(x, weights, grad, stride, "torch")
    assert want[1][0, 0].isfinite().any() and want[1][0, 0].isnan().any() == (value != value)
    _assert_same_ieee(got, want)
    _assert_same_ieee(got, _padded_then_valid(x, weights, grad, stride))


@pytest.mark.parametrize("tensor_cores,shape,stride", PATHS)
def test_inf_gradient_next_to_a_border_reaches_the_padding_taps(tensor_cores, shape, stride):
    """An Inf upstream gradient at an output whose taps read the zero padding: those taps' weight
    gradients get Inf * 0 = NaN, as F.conv3d gives and as padding the input with zeros and then
    convolving without padding gives (the definition; the direct kernel used to leave them finite)."""
    impl = "tensor_cores" if tensor_cores else "direct"
    torch.manual_seed(21)
    x = torch.randn(shape, dtype=torch.float64)
    weights = [torch.randn(2, k, dtype=torch.float64) for k in (3, 5, 3)]
    grad = torch.randn(output_shape(x, 3, 5, 3, stride), dtype=torch.float64)
    grad[0, 1, 0, 2, 1] = INF  # D border (first plane), inside along H and W
    got = _conv_results(x, weights, grad, stride, "triton", impl)
    want = _padded_then_valid(x, weights, grad, stride)
    assert want[2][1].isnan().tolist() == [True, False, False]  # D tap 0 reads the padding from plane 0
    _assert_same_ieee(got, want)
    _assert_same_ieee(got, _conv_results(x, weights, grad, stride, "torch"))


@pytest.mark.parametrize("seed", range(6))
def test_random_non_finite_placements_match_the_pytorch_path(seed):
    """Inf/NaN in x, in a weight, in the gradient, or in a weight and the gradient, at random
    places, random shapes (kernels longer than the volume too), both strides and both layouts."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    c = rng.choice([1, 2, 3])
    shape = (rng.choice([1, 2]), c, *(rng.randint(1, 7) for _ in range(3)))
    ks = [rng.choice([1, 3, 5, 9]) for _ in range(3)]
    stride = rng.choice([1, 2])
    x = torch.randn(shape, dtype=torch.float64)
    if rng.random() < 0.5:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    weights = [torch.randn(c, k, dtype=torch.float64) for k in ks]
    grad = torch.randn(output_shape(x, *ks, stride), dtype=torch.float64)
    where = ("x", "w", "g", "wg")[seed % 4]
    if where == "x":
        x[tuple(rng.randrange(s) for s in shape)] = rng.choice([INF, -INF, NAN])
    if "w" in where:
        b = rng.randrange(3)
        weights[b][rng.randrange(c), rng.randrange(ks[b])] = rng.choice([INF, -INF, NAN])
    if "g" in where:
        grad[tuple(rng.randrange(s) for s in grad.shape)] = rng.choice([INF, -INF, NAN])
    _assert_same_ieee(_conv_results(x, weights, grad, stride, "triton"),
                      _conv_results(x, weights, grad, stride, "torch"))


# ---------------------------------------------------------------------- meta tensors
def test_meta_tensors_on_the_triton_backend_give_shapes():
    """No data to launch on: the registered ops' fake kernels give the shapes (forward and backward)."""
    meta = dict(device="meta")
    x = torch.empty(2, 3, 5, 6, 7, **meta, requires_grad=True)
    weights = [torch.empty(3, k, **meta, requires_grad=True) for k in (3, 5, 3)]
    y = decomposed_conv3d(x, *weights, stride=2, backend="triton")
    assert y.device.type == "meta" and y.shape == (2, 3, 3, 3, 4)
    grads = torch.autograd.grad(y.sum(), [x, *weights])
    assert [g.shape for g in grads] == [x.shape, *(w.shape for w in weights)]
    gamma = torch.empty(3, 3, **meta, requires_grad=True)
    y, mean, var = decomposed_conv3d_batchnorm_train(x, *weights, gamma, torch.empty(3, 3, **meta), backend="triton")
    assert y.shape == x.shape and mean.shape == var.shape == (3, 3)
    assert torch.autograd.grad(y.sum(), gamma)[0].shape == (3, 3)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_layers_run_on_meta_tensors(backend):
    layer = DecomposedConv3d(4, 4, 5, stride=2, groups=4, norm="batch", backend=backend).to("meta").eval()
    assert layer(torch.empty(1, 4, 9, 8, 7, device="meta")).shape == (1, 4, 5, 4, 4)


# ---------------------------------------------------------------------- bfloat16 under the interpreter
def test_interpreted_direct_conv_computes_bfloat16_in_float32_and_matches_the_reference():
    """The direct kernels only convert bfloat16 to and from float32 (exact in the interpreter)."""
    torch.manual_seed(22)
    x = torch.randn(1, 3, 5, 6, 7).bfloat16().requires_grad_()
    weights = [torch.randn(3, k).bfloat16().requires_grad_() for k in (3, 5, 7)]
    y = decomposed_conv3d(x, *weights, backend="triton")
    grad = torch.randn_like(y)
    got = (y, *torch.autograd.grad(y, [x, *weights], grad))
    leaves = [t.detach().double().requires_grad_() for t in (x, *weights)]
    y_ref = decomposed_conv3d_reference(*leaves)
    want = (y_ref, *torch.autograd.grad(y_ref, leaves, grad.double()))
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.double(), b, rtol=2e-2, atol=2e-2 * b.abs().max().item())


def test_interpreted_bfloat16_tensor_cores_raise():
    """Forcing the tensor-core kernels on CPU used to return 1e10 against a reference of 18 in bfloat16."""
    x = torch.randn(1, 2, 16, 16, 16).bfloat16()
    weights = [torch.randn(2, 3).bfloat16() for _ in range(3)]
    with pytest.raises(NotImplementedError, match=r"tensor-core conv kernels .* cannot run bfloat16 tensors under "
                                                  r"Triton's CPU interpreter \(TRITON_INTERPRET=1\)"):
        decomposed_conv3d(x, *weights, backend="triton", impl="tensor_cores")
    torch.testing.assert_close(decomposed_conv3d(x.half(), *(w.half() for w in weights), backend="triton",
                                                 impl="tensor_cores").float(),
                               decomposed_conv3d_reference(x.float(), *(w.float() for w in weights)),
                               rtol=1e-2, atol=2e-2)  # float16 is computed right there


def test_interpreted_bfloat16_batchnorm_and_siglip_raise():
    x, *ws, gamma, beta = _bn_inputs((2, 3, 3, 4, 5))
    with pytest.raises(NotImplementedError, match="fused BatchNorm kernels cannot run bfloat16"):
        decomposed_conv3d_batchnorm_train(x.bfloat16(), *(w.bfloat16() for w in ws), gamma, beta, backend="triton")
    emb = torch.randn(2, 8, 16).bfloat16()
    scale, bias = torch.tensor(1.0), torch.tensor(-1.0)
    with pytest.raises(NotImplementedError, match="SigLIP kernels cannot run bfloat16"):
        siglip_loss(emb[0], emb[1], scale, bias, backend="triton")
    got = siglip_loss(emb[0], emb[1], scale, bias, backend="torch")  # the PyTorch path is fine
    torch.testing.assert_close(got.float(), siglip_loss_reference(emb[0].float(), emb[1].float(), scale, bias),
                               rtol=2e-2, atol=0)
