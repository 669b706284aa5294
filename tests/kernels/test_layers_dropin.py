"""DecomposedConv3d as a drop-in for a depthwise nn.Conv3d (issue 13, items 3 and 4): nn.Conv3d's
argument spellings, the repr's path, errors in the user's terms, and replace_depthwise_conv3d."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import dcformer_kernels.decomposed_conv as dc
import dcformer_kernels.decomposed_conv_bn as dcbn
from dcformer_kernels import DecomposedConv3d, ReplacementReport, replace_depthwise_conv3d


# ---------------------------------------------------------------------- nn.Conv3d's spellings
@pytest.mark.parametrize("kernel_size,stride,kwargs", [
    (3, 1, dict(padding=1)),
    (3, 1, dict(padding=(1, 1, 1), dilation=(1, 1, 1), padding_mode="zeros")),
    (3, (1, 1, 1), dict(padding="same", dilation=1)),
    ((5, 3, 7), (2, 2, 2), dict(padding=(2, 1, 3))),
    ((1, 1, 1), 1, dict(padding="valid")),
])
def test_takes_the_conv3d_arguments_of_the_conv_it_replaces(kernel_size, stride, kwargs):
    torch.manual_seed(30)
    conv = nn.Conv3d(4, 4, kernel_size, stride, groups=4, **kwargs)
    layer = DecomposedConv3d(4, 4, kernel_size, stride, groups=4, **kwargs)
    plain = DecomposedConv3d(4, 4, kernel_size, conv.stride[0], groups=4)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4, 7, 6, 9)
    y = layer(x)
    assert layer.stride == conv.stride[0] and y.shape == conv(x).shape
    torch.testing.assert_close(y, plain(x), rtol=0, atol=0)


def test_device_and_dtype_reach_every_parameter_and_buffer():
    layer = DecomposedConv3d(4, 4, 3, groups=4, norm="batch", device="meta", dtype=torch.float64)
    tensors = [*layer.parameters(), *(b for b in layer.buffers() if b.is_floating_point())]
    assert len(tensors) == 3 * 2 + 3 * 4
    assert all(t.device.type == "meta" and t.dtype == torch.float64 for t in tensors)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(padding=0), r"padding must be k // 2 per axis, \(1, 1, 1\) for kernel_size \(3, 3, 3\) .*got 0"),
    (dict(padding="valid"), r"padding must be k // 2 per axis, \(1, 1, 1\)"),
    (dict(kernel_size=(5, 3, 7), padding=2), r"padding must be k // 2 per axis, \(2, 1, 3\) .*got 2"),
    (dict(padding="same", stride=2), "padding='same' needs stride 1 .*pass padding=k // 2, here \\(1, 1, 1\\)"),
    (dict(padding="full"), "padding must be k // 2 per axis"),
    (dict(stride=(1, 2, 2)), r"stride must be a positive int or a 3-tuple of equal ones .*got \(1, 2, 2\)"),
    (dict(stride=(1, 1)), "stride must be a positive int or a 3-tuple of equal ones"),
    (dict(stride=True), "stride must be a positive int"),
    (dict(stride=3), "stride of the fused depthwise form must be one of"),
    (dict(dilation=2), "dilation must be 1 .*got 2"),
    (dict(dilation=(1, 1, 2)), "dilation must be 1"),
    (dict(padding_mode="reflect"), "padding_mode must be 'zeros' .*got 'reflect'"),
    (dict(norm="layer"), "norm must be None or 'batch' \\(in any case\\); got 'layer'"),
    (dict(backend="cuda"), r"backend must be one of \('auto', 'triton', 'torch'\); got 'cuda'"),
])
def test_rejects_what_it_does_not_support_when_built(kwargs, pattern):
    args = dict(in_channels=4, out_channels=4, kernel_size=3, groups=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        DecomposedConv3d(**args)


@pytest.mark.parametrize("norm", ["batch", "BATCH", "Batch"])
def test_norm_names_in_any_case(norm):
    layer = DecomposedConv3d(4, 4, 3, groups=4, norm=norm)
    assert len(layer.norms) == 3 and "norm=batch" in repr(layer)


# ---------------------------------------------------------------------- the repr's path
@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused autograd Functions' calls (conv and training-mode BN)."""
    calls = []
    for function in (dc.DecomposedConv3dFunction, dcbn.DecomposedConv3dBatchNormFunction):
        real = function.apply
        monkeypatch.setattr(function, "apply", lambda *a, _real=real: calls.append(1) or _real(*a))
    return calls


@pytest.mark.parametrize("interpret", ["1", "0"])
@pytest.mark.parametrize("groups,stride,norm,training,backend", [
    (4, 1, None, True, "auto"),
    (4, 2, None, False, "torch"),
    (4, 1, "batch", True, "auto"),  # fused training kernels
    (4, 2, "batch", True, "auto"),  # unfused branches (stride 2)
    (4, 2, "batch", False, "auto"),  # eval: folded into the fused conv
    (1, 1, None, False, "auto"),  # dense groups: three nn.Conv3d
])
def test_repr_names_the_path_forward_takes(interpret, groups, stride, norm, training, backend, fused_calls,
                                           monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    layer = DecomposedConv3d(4, 4, 3, stride, groups=groups, norm=norm, backend=backend).train(training)
    layer(torch.randn(2, 4, 3, 4, 5))
    expected = "triton-fused" if fused_calls else "torch"
    assert layer.path == expected and f"path={expected}" in repr(layer)
    if interpret == "0":
        assert expected == "torch"  # CPU without the interpreter: the PyTorch path


def test_repr_says_when_the_backend_cannot_run_on_the_device(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layer = DecomposedConv3d(4, 4, 3, groups=4, backend="triton")
    assert "path=unavailable (backend='triton' needs CUDA tensors" in repr(layer)
    assert layer.to("meta").path == "triton-fused"  # meta tensors: the fused op's shapes


# ---------------------------------------------------------------------- errors at the layer boundary
@pytest.mark.parametrize("norm,training", [(None, False), ("batch", True), ("batch", False)])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_input_dtype_errors_speak_of_the_input_and_the_module(norm, training, backend):
    layer = DecomposedConv3d(4, 4, 3, groups=4, norm=norm, backend=backend).train(training)
    x = torch.randn(2, 4, 3, 4, 5)
    with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the module's parameters are torch.float32: "
                                        r"cast the input \(x.to\(torch.float32\)\) or the module "
                                        r"\(module.to\(torch.float64\)\)$"):
        layer(x.double())
    with pytest.raises(TypeError, match="x has dtype torch.bfloat16 but the module's parameters are torch.float32"):
        layer(x.bfloat16())
    with pytest.raises(TypeError, match=r"expects a floating-point x; got torch.int16: convert it first, e.g. "
                                        r"x.float\(\)"):
        layer((x * 100).to(torch.int16))
    with pytest.raises(TypeError, match="expects a torch.Tensor x; got ndarray"):
        layer(x.numpy())
    with pytest.raises(ValueError, match="x is on meta but the module's parameters are on cpu"):
        layer(x.to("meta"))


def test_autocast_keeps_working_and_float64_under_it_is_named():
    layer = DecomposedConv3d(4, 4, 3, groups=4, norm="batch", backend="torch").eval()
    x = torch.randn(1, 4, 3, 4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
        assert layer(x.bfloat16()).dtype == torch.bfloat16  # both are cast to the autocast dtype
        with pytest.raises(TypeError, match=r"x has dtype torch.float64 .* \(autocast leaves float64 as it is\)"):
            layer(x.double())


# ---------------------------------------------------------------------- replace_depthwise_conv3d
class _WeightStandardisedConv3d(nn.Conv3d):
    pass


def _zoo() -> nn.Sequential:
    shared = nn.Conv3d(4, 4, 3, padding=1, groups=4)
    return nn.Sequential(
        nn.Conv3d(2, 4, 1),  # 0: dense
        nn.Conv3d(4, 4, 3, padding=1, groups=4),  # 1: swapped
        nn.Sequential(shared, nn.GELU()),  # 2.0: swapped, shared with 5
        nn.Conv3d(4, 4, (5, 3, 1), stride=2, padding=(2, 1, 0), groups=4, bias=False),  # 3: swapped
        nn.Conv3d(4, 4, 3, padding="same", groups=4, padding_mode="reflect"),  # 4: padding mode
        shared,  # 5
        nn.Conv3d(4, 4, 3, padding=2, dilation=2, groups=4),  # 6: dilation
        nn.Conv3d(4, 4, 2, padding=1, groups=4),  # 7: even kernel
        nn.Conv3d(4, 4, 3, padding=0, groups=4),  # 8: shrinks the volume
        nn.Conv3d(4, 4, 3, stride=(1, 2, 2), padding=1, groups=4),  # 9: unequal strides
        nn.Conv3d(4, 8, 3, padding=1, groups=4),  # 10: channel multiplier
        _WeightStandardisedConv3d(8, 8, 3, padding=1, groups=8),  # 11: subclass
        DecomposedConv3d(8, 8, 3, groups=8),  # 12: already decomposed, its branches left alone
    )


def test_replace_swaps_what_keeps_the_shape_and_says_why_the_rest_stays():
    model = _zoo().double().eval()
    model[3].weight.requires_grad_(False)
    report = replace_depthwise_conv3d(model)
    assert isinstance(report, ReplacementReport)
    assert report.replaced == ["1", "2.0", "3", "5"]
    assert {name: reason.split(":")[0] for name, reason in report.skipped.items()} == {
        "0": "not depthwise", "4": "padding_mode 'reflect'", "6": "dilation (2, 2, 2)",
        "7": "kernel_size (2, 2, 2)", "8": "padding (0, 0, 0)", "9": "stride (1, 2, 2)",
        "10": "not depthwise", "11": "a subclass of nn.Conv3d (_WeightStandardisedConv3d)"}
    assert "output size would change" in report.skipped["8"]
    assert model[2][0] is model[5] and isinstance(model[5], DecomposedConv3d)
    new = model[3]
    assert isinstance(new, DecomposedConv3d) and new.kernel_size == (5, 3, 1) and new.stride == 2
    assert new.branches[0].bias is None and not new.training
    assert not any(p.requires_grad for p in new.parameters())  # as the frozen conv it replaced
    assert all(p.requires_grad for p in model[1].parameters())
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert isinstance(model[12], DecomposedConv3d) and all(type(b) is nn.Conv3d for b in model[12].branches)


def test_swapped_layers_keep_every_output_shape():
    torch.manual_seed(31)
    model = _zoo()
    x = torch.randn(1, 4, 7, 8, 9)
    before = [conv(x).shape for conv in (model[1], model[2][0], model[3])]
    replace_depthwise_conv3d(model, backend="torch")
    after = [layer(x).shape for layer in (model[1], model[2][0], model[3])]
    assert before == after and isinstance(model[3], DecomposedConv3d)


def test_replace_with_a_longer_kernel_and_argument_errors():
    model = nn.Sequential(nn.Conv3d(4, 4, 3, padding=1, groups=4), nn.Conv3d(4, 4, 3, stride=2, padding=1, groups=4))
    report = replace_depthwise_conv3d(model, kernel_size=7)
    assert report.replaced == ["0", "1"] and not report.skipped
    assert model[0].kernel_size == (7, 7, 7) and model[1].stride == 2
    assert model(torch.randn(1, 4, 8, 8, 8)).shape == (1, 4, 4, 4, 4)
    with pytest.raises(ValueError, match="kernel_size entries must be odd"):
        replace_depthwise_conv3d(nn.Sequential(), kernel_size=4)
    with pytest.raises(ValueError, match="backend must be one of"):
        replace_depthwise_conv3d(nn.Sequential(), backend="cuda")
    with pytest.raises(TypeError, match="model is itself an nn.Conv3d"):
        replace_depthwise_conv3d(nn.Conv3d(4, 4, 3, padding=1, groups=4))


def test_replace_in_a_monai_mednext():
    """MONAI's MedNeXt (a 3D ConvNeXt): every depthwise conv of its blocks, stride 1 and the
    stride-2 downsampling ones, swapped; its 1x1x1 convs listed as not depthwise; the network
    keeps its output shape and trains (gradients reach the new layers)."""
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(32)
    net = nets.MedNeXt(spatial_dims=3, in_channels=1, out_channels=2, init_filters=4, kernel_size=3,
                       blocks_down=(1, 1), blocks_bottleneck=1, blocks_up=(1, 1))
    x = torch.randn(1, 1, 8, 8, 8)
    shape = net(x).shape
    report = replace_depthwise_conv3d(net, kernel_size=5)
    assert sorted(report.replaced) == sorted(
        ["enc_stages.0.0.conv1", "enc_stages.1.0.conv1", "down_blocks.0.conv1", "down_blocks.1.conv1",
         "bottleneck.0.conv1", "dec_stages.0.0.conv1", "dec_stages.1.0.conv1"])
    assert report.skipped["stem"].startswith("not depthwise") and len(report.skipped) == 19
    assert all(reason.startswith("not depthwise") for reason in report.skipped.values())
    assert net.down_blocks[0].conv1.stride == 2 and net.bottleneck[0].conv1.kernel_size == (5, 5, 5)
    y = net(x)
    assert y.shape == shape
    y.square().mean().backward()
    assert all(conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
               for conv in net.bottleneck[0].conv1.branches)
