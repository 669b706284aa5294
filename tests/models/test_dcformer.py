"""DCFormer encoder: registry, parameter counts, official-checkpoint loading, layouts."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from med3dvlm.models import create_model, list_models, load_official_dcformer
from med3dvlm.models.encoders.dcformer import DCFORMER_VARIANTS

MANIFEST = Path(__file__).resolve().parents[3] / "shared" / "reference" / "dcformer_official_state_dict_keys.json"

SMALL = (4, 4, 8, 8, 8)  # narrow channels keep CPU tests fast
OFFICIAL_PARAMS = {"nano": 789_216, "naive": 5_851_680, "tiny": 14_657_472, "small": 18_244_800,
                   "base": 33_868_864, "large": 185_125_440}


@pytest.mark.parametrize("variant", list(OFFICIAL_PARAMS))
def test_parameter_counts_equal_the_official_encoder(variant):
    with torch.device("meta"):
        model = create_model(f"dcformer_{variant}")
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[variant]


def test_registry_lists_every_variant():
    assert {f"dcformer_{v}" for v in DCFORMER_VARIANTS} <= set(list_models("dcformer_*"))
    with pytest.raises(ValueError, match="unknown model 'dcformer_huge'; known models: .*dcformer_nano"):
        create_model("dcformer_huge")


def test_forward_intermediates_shapes_and_feature_info():
    torch.manual_seed(0)
    model = create_model("dcformer_nano", backend="torch").eval()
    x = torch.randn(2, 1, 64, 96, 80)
    features = model.forward_intermediates(x)
    expected = [(2, 32, 16, 24, 20), (2, 32, 8, 12, 10), (2, 64, 4, 6, 5), (2, 128, 2, 3, 3), (2, 256, 1, 2, 2)]
    assert [tuple(f.shape) for f in features] == expected
    assert [info["num_chs"] for info in model.feature_info] == [32, 32, 64, 128, 256]
    assert [info["reduction"][0] for info in model.feature_info] == [4, 8, 16, 32, 64]
    assert model.feature_sizes((64, 96, 80)) == [tuple(s[2:]) for s in expected]
    assert torch.equal(model.forward_features(x), features[-1])
    assert torch.equal(model(x), features[-1].mean(dim=(2, 3, 4)))
    assert all(f.is_contiguous(memory_format=torch.channels_last_3d) for f in features[1:])


@pytest.mark.parametrize(("size", "expected"), [
    ((32, 64, 64), [(8, 16, 16), (4, 8, 8), (2, 4, 4), (1, 2, 2), (1, 1, 1)]),  # M3D's depth
    ((33, 65, 47), [(9, 17, 12), (5, 9, 6), (3, 5, 3), (2, 3, 2), (1, 2, 1)]),
    ((1, 2, 5), [(1, 1, 2), (1, 1, 1), (1, 1, 1), (1, 1, 1), (1, 1, 1)]),
])
def test_volumes_smaller_than_the_downsampling_give_the_official_sizes(size, expected):
    """The official strided convs and pools pad, so every stage rounds up, down to one voxel."""
    model = create_model("dcformer_nano", backend="torch").eval()
    assert model.feature_sizes(size) == expected
    with torch.no_grad():
        features = model.forward_intermediates(torch.randn(1, 1, *size))
    assert [tuple(f.shape[2:]) for f in features] == expected


def test_bad_input():
    model = create_model("dcformer_nano", backend="torch")
    with pytest.raises(ValueError, match="expects in_channels=1; got x with 3 channels"):
        model(torch.randn(1, 3, 64, 64, 64))
    with pytest.raises(ValueError, match=r"expects x of shape \(B, C, D, H, W\)"):
        model(torch.randn(1, 64, 64, 64))
    with pytest.raises(ValueError, match="stem_act must be None or 'gelu'"):
        create_model("dcformer_nano", stem_act="relu")
    with pytest.raises(ValueError, match=r"depths\[0\] \(stem repeats\) must be 1; got depths=\(3, 1, 1, 1, 1\)"):
        create_model("dcformer_nano", depths=(3, 1, 1, 1, 1))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_meta_tensors_give_the_feature_shapes(mode):
    """Shape checks without memory or compute (e.g. for FLOP counts at full size)."""
    model = create_model("dcformer_nano").to("meta").train(mode == "train")
    features = model.forward_intermediates(torch.empty(1, 1, 64, 96, 128, device="meta"))
    assert [tuple(f.shape) for f in features] == [(1, 32, 16, 24, 32), (1, 32, 8, 12, 16), (1, 64, 4, 6, 8),
                                                  (1, 128, 2, 3, 4), (1, 256, 1, 2, 2)]


def test_channels_last_and_contiguous_inputs_agree():
    torch.manual_seed(1)
    model = create_model("dcformer_nano", backend="torch").eval()
    x = torch.randn(1, 1, 64, 64, 72)
    a = model.forward_features(x)
    b = model.forward_features(x.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_identical_results():
    """Outputs, gradients and the BatchNorm running statistics (the recompute in backward must not
    count the batch twice)."""
    torch.manual_seed(2)
    plain = create_model("dcformer_nano", backend="torch", layer_scale_init=0.5, dims=SMALL).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    x = torch.randn(2, 1, 64, 64, 64, requires_grad=True)
    y0 = plain.forward_features(x)
    g0 = torch.autograd.grad(y0.square().sum(), [x, *plain.parameters()])
    y1 = checkpointed.forward_features(x)
    g1 = torch.autograd.grad(y1.square().sum(), [x, *checkpointed.parameters()])
    torch.testing.assert_close(y1, y0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b)
    for (name, a), b in zip(checkpointed.named_buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("size", [(64, 64, 68), (5, 3, 9)])
def test_fused_kernels_run_inside_the_model(size):
    """Eval mode: every depthwise unit is one fused Triton launch (interpreter on CPU), also on
    a volume smaller than the downsampling (deep stages of one voxel)."""
    torch.manual_seed(3)
    model = create_model("dcformer_nano", layer_scale_init=0.5, dims=SMALL)
    _randomise_batchnorm(model)
    model.eval()
    x = torch.randn(1, 1, *size)
    fused = model.forward_features(x)
    for module in model.modules():
        if hasattr(module, "backend"):
            module.backend = "torch"
    torch.testing.assert_close(fused, model.forward_features(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- official weights
def _random_official_state_dict(variant: str, prefix: str = "encoder.") -> dict:
    if not MANIFEST.exists():
        pytest.skip("../shared/reference is absent")
    keys = json.loads(MANIFEST.read_text())[variant]["keys"]
    gen = torch.Generator().manual_seed(4)
    sd = {}
    for key, shape in keys.items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=gen) + 0.5
        elif key.endswith("scale"):
            sd[key] = torch.rand(shape, generator=gen)  # not the 1e-6 init: the blocks must matter
        else:
            sd[key] = torch.randn(shape, generator=gen) * 0.2
    return {prefix + k[len("encoder."):]: v for k, v in sd.items()}


def _official_forward(sd: dict, x: torch.Tensor) -> list[torch.Tensor]:
    """The official computation written independently from the official key layout.

    The official code permutes (B, C, D, H, W) -> (B, C, H, W, D) and applies each branch conv
    with its stored kernel shape; outputs become (B, D'H'W', C) tokens in (D', H', W') order.
    """
    sd = {k[len("encoder."):]: v for k, v in sd.items()}

    def unit(prefix, x, stride, groups):
        out = 0
        for b in ("c1", "c2", "c3"):
            w = sd[f"{prefix}.{b}.0.weight"]
            z = F.conv3d(x, w, sd[f"{prefix}.{b}.0.bias"], stride, tuple(s // 2 for s in w.shape[2:]), groups=groups)
            out = out + F.batch_norm(z, sd[f"{prefix}.{b}.1.running_mean"], sd[f"{prefix}.{b}.1.running_var"],
                                     sd[f"{prefix}.{b}.1.weight"], sd[f"{prefix}.{b}.1.bias"], False, 0.0, 1e-5)
        return out

    x = x.permute(0, 1, 3, 4, 2)
    features = []
    for u in range(4):
        x = unit(f"s0.0.{u}", x, 4 if u == 0 else 1, 1)
    features.append(x)
    for stage in range(1, 5):
        j = 0
        while f"s{stage}.{j}.scale" in sd:
            p = f"s{stage}.{j}"
            if j == 0:
                x = F.conv3d(F.max_pool3d(x, 3, 2, 1), sd[f"{p}.proj.weight"])
            y = unit(f"{p}.dwconv", x, 1, x.shape[1]).permute(0, 2, 3, 4, 1)
            y = F.linear(F.gelu(F.linear(y, sd[f"{p}.mlp.mlp.0.weight"], sd[f"{p}.mlp.mlp.0.bias"])),
                         sd[f"{p}.mlp.mlp.3.weight"], sd[f"{p}.mlp.mlp.3.bias"]) * sd[f"{p}.scale"]
            x = x + y.permute(0, 4, 1, 2, 3)
            j += 1
        features.append(x)
    return [f.permute(0, 1, 4, 2, 3).flatten(2).transpose(1, 2) for f in features]


@pytest.mark.parametrize(("prefix", "size"), [
    ("encoder.", (64, 96, 80)),  # D != H != W: an axis mix-up changes the result
    ("vision_encoder.encoder.", (64, 96, 80)),
    ("encoder.", (32, 64, 64)),  # M3D's 32 slices: smaller than the total downsampling
    ("encoder.", (33, 65, 47)),  # odd sizes: every stride rounds up
])
def test_official_weights_reproduce_the_official_computation(prefix, size):
    sd = _random_official_state_dict("nano", prefix)
    sd["mm_projector.weight"] = torch.zeros(3)  # other modules of a full checkpoint are ignored
    model = load_official_dcformer(sd, "nano", backend="torch").eval()
    x = torch.randn(1, 1, *size)
    got = model.forward_official_tokens(x)
    want = _official_forward({k[len(prefix) - len("encoder."):]: v for k, v in sd.items()
                              if k.startswith(prefix)}, x)
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_official_load_is_strict():
    sd = _random_official_state_dict("nano")
    missing = dict(sd)
    missing.pop("encoder.s2.0.scale")
    with pytest.raises(KeyError, match=r"missing \['stages.2.blocks.0.scale'\]; unexpected \[\]"):
        load_official_dcformer(missing, "nano")
    extra = dict(sd)
    extra["encoder.s1.0.attn.qkv.weight"] = torch.zeros(3)
    with pytest.raises(KeyError, match=r"missing \[\]; unexpected \['s1.0.attn.qkv.weight'\]"):
        load_official_dcformer(extra, "nano")
    with pytest.raises(ValueError, match=r"official s1.0.scale has shape \(64,\); stages.1.blocks.0.scale needs \(32,\)"):
        load_official_dcformer(_random_official_state_dict("naive"), "nano")
    with pytest.raises(ValueError, match="unknown DCFormer variant 'huge'"):
        load_official_dcformer(sd, "huge")


def _randomise_batchnorm(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)
