"""The timm-style contract every registry encoder keeps: intermediates, features, head, sizes, errors."""
from __future__ import annotations

import pytest
import torch

from med3dvlm.models import create_model, list_models

# Narrow configs of each family (the layer structure of the registered variant, fewer channels).
SMALL = {
    "dcformer_nano": dict(dims=(4, 4, 8, 8, 8), backend="torch"),
    "convnext3d_nano": dict(dims=(8, 8, 8, 8), depths=(1, 1, 1, 1)),
    "poolformer3d_nano": dict(dims=(8, 8, 8, 8), depths=(1, 1, 1, 1)),
    "vit3d_naive": dict(img_size=16, patch_size=8, dim=16, depth=4, num_heads=2, head_dim=8),
}
# The smallest volume each family runs on, per axis (the official DCFormer pads every stride).
SMALLEST = {"dcformer_nano": 1, "convnext3d_nano": 32, "poolformer3d_nano": 3, "vit3d_naive": 8}
ENCODERS = [n for n in list_models() if n.split("_")[0] in ("dcformer", "convnext3d", "poolformer3d", "vit3d")
            and "unet" not in n]


def _small(name: str, **extra):
    torch.manual_seed(0)
    return create_model(name, **{**SMALL[name], **extra}).eval()


@pytest.mark.parametrize("name", list(SMALL))
def test_intermediates_features_and_head(name):
    model = _small(name)
    x = torch.randn(2, 1, 32, 40, 48)
    with torch.no_grad():
        maps = model.forward_intermediates(x)
        assert [m.shape[1] for m in maps] == [i["num_chs"] for i in model.feature_info]
        assert [tuple(m.shape[2:]) for m in maps] == model.feature_sizes((32, 40, 48))
        assert model.num_features == maps[-1].shape[1]
        torch.testing.assert_close(model.forward_features(x), maps[-1])
        # timm's indices: the last n stages, or stage numbers (negative from the end)
        for got, want in zip(model.forward_intermediates(x, indices=2), maps[-2:]):
            torch.testing.assert_close(got, want)
        for got, want in zip(model.forward_intermediates(x, indices=[0, -1]), [maps[0], maps[-1]]):
            torch.testing.assert_close(got, want)
        pooled = model.forward_head(maps[-1], pre_logits=True)
        torch.testing.assert_close(pooled, maps[-1].mean(dim=(2, 3, 4)))
        torch.testing.assert_close(model(x), pooled)  # num_classes=0: no head


@pytest.mark.parametrize("name", list(SMALL))
def test_num_classes_adds_a_pooled_linear_head(name):
    model = _small(name, num_classes=18)
    x = torch.randn(2, 1, 32, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 18)
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(logits, model.head(pooled))
    logits.sum().backward()
    assert model.head.weight.grad is not None
    with pytest.raises(ValueError, match="num_classes must be an int >= 0"):
        _small(name, num_classes=-1)


@pytest.mark.parametrize("name", list(SMALL))
def test_smallest_volume_runs_and_one_voxel_less_is_refused_by_name(name):
    model = _small(name)
    n = SMALLEST[name]
    with torch.no_grad():
        assert model(torch.randn(1, 1, n, n, n)).shape == (1, model.num_features)
    if n > 1:
        with pytest.raises(ValueError, match=rf"cannot run on an input of size \({n - 1}, {n}, {n}\).*needs at least \({n}, {n}, {n}\)"):
            model(torch.randn(1, 1, n - 1, n, n))


@pytest.mark.parametrize("name", ENCODERS)
def test_every_registered_encoder_keeps_the_contract(name):
    with torch.device("meta"):
        model = create_model(name)
    assert model.num_features == model.feature_info[-1]["num_chs"]
    assert all({"num_chs", "reduction", "module"} <= set(info) for info in model.feature_info)
    with pytest.raises(ValueError, match="no pretrained weights ship .*load_official_dcformer"):
        create_model(name, pretrained=True)
    with pytest.raises(TypeError, match=rf"{name} got unknown option\(s\) \['channelz'\]; it accepts: .*num_classes"):
        create_model(name, channelz=3)


def test_hierarchical_families_share_config_names():
    with torch.device("meta"):
        configs = [create_model(n).config for n in ("dcformer_small", "convnext3d_tiny", "poolformer3d_tiny")]
    for config in configs:
        assert hasattr(config, "depths") and hasattr(config, "dims") and hasattr(config, "num_classes")
    assert configs[0].depths == (1, 2, 3, 6, 2) and configs[0].dims == (64, 96, 192, 384, 768)


def test_dtype_errors_speak_the_users_terms():
    model = _small("dcformer_nano")
    x = torch.randn(1, 1, 16, 16, 16)
    with pytest.raises(TypeError, match=r"expects a floating-point volume; got dtype torch.int16.*x.float\(\)"):
        model((x * 1000).to(torch.int16))  # CT in HU
    with pytest.raises(TypeError, match=r"has torch.float32 parameters; got x of dtype torch.float64"):
        model(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        # a bfloat16 volume into float32 parameters is what autocast is for: no dtype error
        assert model(x.bfloat16()).isfinite().all()
    assert model.double()(x.double()).dtype == torch.float64
