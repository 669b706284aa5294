"""U-Nets with and without DCA (2D and 3D), and the encoder U-Net on any registry encoder."""
import pytest
import torch
import torch.nn as nn

from med3dvlm.models.encoder import Encoder3D
from med3dvlm.models.registry import create_model, list_models, register_model
from med3dvlm.models.seg.dca import DualCrossAttention
from med3dvlm.models.seg.unet import EncoderUNet3D, UNet

SMALL = [4, 8, 16, 32]


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- U-Net

@pytest.mark.parametrize("spatial_dims, size", [(2, (45, 62)), (3, (19, 36, 26))])
@pytest.mark.parametrize("dca", [False, True])
def test_unet_output_matches_non_square_input(seed, spatial_dims, size, dca):
    model = UNet(spatial_dims, in_channels=2, out_channels=3, channels=SMALL, dca=dca)
    assert (model.dca is not None) == dca
    out = model(torch.randn(2, 2, *size))
    assert out.shape == (2, 3, *size)


def test_unet_dca_adds_exactly_the_dca_parameters():
    base = UNet(2, 3, 2, dca=False)
    with_dca = UNet(2, 3, 2, dca=True)
    assert n_params(with_dca) - n_params(base) == n_params(with_dca.dca) == 110_560


def test_unet_gradients_reach_every_parameter(seed):
    model = UNet(3, 1, 2, channels=[4, 8, 16], dca=True)
    out = model(torch.randn(2, 1, 10, 18, 14))
    (out * torch.randn_like(out)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_unet_registry_names_and_defaults():
    assert {"unet2d", "unet2d_dca", "unet3d", "unet3d_dca", "dcformer_unet3d", "dcformer_unet3d_dca"} <= set(
        list_models())
    m = create_model("unet2d_dca")
    assert (m.spatial_dims, m.in_channels, m.channels, isinstance(m.dca, DualCrossAttention)) == (
        2, 3, [32, 64, 128, 256, 512], True)
    m = create_model("unet3d", channels=[4, 8, 16], out_channels=5)
    assert (m.spatial_dims, m.dca, m.out_channels) == (3, None, 5)


def test_unet_anisotropic_token_grid(seed):
    model = UNet(3, 1, 2, channels=[4, 8, 16, 32], dca_token_grid=(2, 4, 4))
    assert model(torch.randn(1, 1, 16, 40, 36)).shape == (1, 2, 16, 40, 36)
    # skips at 1/1, 1/2, 1/4: the coarsest of a 16x12x24 input is 4x3x6, finer than the grid on H
    with pytest.raises(ValueError, match=r"token_grid \(2, 4, 4\) must be no larger than every skip; "
                                         r"skips\[2\] has spatial size \(4, 3, 6\)"):
        model(torch.randn(1, 1, 16, 12, 24))


@pytest.mark.parametrize("x, match", [
    (torch.randn(1, 1, 7, 40), r"needs at least 8 voxels per axis; got spatial size \(7, 40\)"),
    (torch.randn(1, 3, 16, 16), r"expects in_channels=1; got x with 3 channels"),
    (torch.randn(1, 1, 16, 16, 16), r"expects x of shape \(B, C, H, W\)"),
])
def test_unet_bad_input_is_named(x, match):
    with pytest.raises(ValueError, match=match):
        UNet(2, 1, 2, channels=SMALL)(x)


# ---------------------------------------------------------------- encoder U-Net

class TinyEncoder3D(Encoder3D):
    """Three strided conv stages (reductions 2, 4, 8), standing in for any registry encoder."""

    def __init__(self, in_channels=1, channels=(8, 16, 32)):
        super().__init__()
        self.in_channels = in_channels
        stages, info, c_in = [], [], in_channels
        for i, c in enumerate(channels):
            stages.append(nn.Sequential(nn.Conv3d(c_in, c, 3, stride=2, padding=1), nn.BatchNorm3d(c), nn.GELU()))
            info.append({"num_chs": c, "reduction": (2 ** (i + 1),) * 3, "module": f"stages.{i}"})
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.feature_info = info


if "test_tiny_encoder3d" not in list_models():
    register_model("test_tiny_encoder3d")(TinyEncoder3D)


@pytest.mark.parametrize("dca", [False, True])
def test_encoder_unet3d_on_a_non_cubic_volume(seed, dca):
    model = EncoderUNet3D(TinyEncoder3D(in_channels=2), out_channels=3, dca=dca, stem_channels=4)
    assert (model.dca is not None) == dca
    if dca:
        assert model.dca.in_channels == [8, 16]
    x = torch.randn(2, 2, 12, 30, 22)
    out = model(x)
    assert out.shape == (2, 3, 12, 30, 22)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_encoder_unet_factory_builds_the_named_encoder_lazily(seed):
    model = create_model("dcformer_unet3d_dca", encoder_name="test_tiny_encoder3d", in_channels=1,
                         encoder_kwargs={"channels": (4, 8, 16)}, out_channels=2, stem_channels=4,
                         dca_token_grid=(1, 2, 2))
    assert isinstance(model.encoder, TinyEncoder3D) and model.dca.token_grid == (1, 2, 2)
    assert model(torch.randn(1, 1, 8, 16, 20)).shape == (1, 2, 8, 16, 20)
    with pytest.raises(ValueError, match="unknown model 'no_such_encoder'"):
        create_model("dcformer_unet3d", encoder_name="no_such_encoder")


def test_encoder_unet3d_rejects_an_encoder_without_stages():
    class Flat(nn.Module):
        in_channels = 1
        feature_info = [{"num_chs": 8, "reduction": (2, 2, 2), "module": "x"}]

        def forward_intermediates(self, x):
            return [x]

    with pytest.raises(ValueError, match="feature_info of at least 2 stages"):
        EncoderUNet3D(Flat(), out_channels=2)


def test_dcformer_unet3d(seed):
    # narrow channels and the plain PyTorch path keep this fast on CPU; the layer structure is nano's
    model = create_model("dcformer_unet3d_dca", encoder_name="dcformer_nano", out_channels=2, stem_channels=4,
                         encoder_kwargs={"dims": (8, 8, 8, 16, 16), "backend": "torch"}).eval()
    assert model.dca.in_channels == [8, 8, 8, 16]
    x = torch.rand(1, 1, 64, 64, 64)  # DCFormer reduces by 64
    with torch.no_grad():
        assert model(x).shape == (1, 2, 64, 64, 64)
