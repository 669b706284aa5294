"""U-Nets whose skip connections pass through Dual Cross-Attention, and a 3D segmentation network
on any registry encoder.

- ``UNet``: a plain 2D/3D U-Net (double 3×3 conv + BN + ReLU per level, max-pool down, resize +
  conv up, concatenated skips); with ``dca=True`` its skips go through ``DualCrossAttention``.
  The default channels (32, 64, 128, 256, 512) are the official DCA U-Net at width factor 0.5.
- ``EncoderUNet3D``: any ``Encoder3D`` (``forward_intermediates`` + ``feature_info``) as the encoder,
  the same decoder, DCA on the encoder's skips, and a full-resolution stem for the detail the
  encoder's strided stem discards.

Registered: ``unet2d``, ``unet2d_dca``, ``unet3d``, ``unet3d_dca``, ``dcformer_unet3d``,
``dcformer_unet3d_dca``. What DCA adds (parameters, FLOPs) is counted by ``bench.models.counts.dca_cost``.
"""
from __future__ import annotations

import inspect
from typing import Sequence

import torch
import torch.nn as nn

from .dca import DualCrossAttention, resize_to
from .layers import BATCH_NORM, CONV, MAX_POOL
from ..encoder import Encoder3D
from ..registry import create_model, register_model

__all__ = ["UNet", "EncoderUNet3D", "UNetDecoder", "ConvBlock", "DoubleConv", "UpBlock"]



class ConvBlock(nn.Sequential):
    """3×3(×3) conv (no bias: BN follows), BatchNorm, ReLU."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__(
            CONV[spatial_dims](in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            BATCH_NORM[spatial_dims](out_channels),
            nn.ReLU(inplace=True),
        )


class DoubleConv(nn.Sequential):
    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__(ConvBlock(spatial_dims, in_channels, out_channels),
                         ConvBlock(spatial_dims, out_channels, out_channels))


class UpBlock(nn.Module):
    """Resize to the skip's exact size, conv, concatenate the skip, double conv."""

    def __init__(self, spatial_dims: int, in_channels: int, skip_channels: int) -> None:
        super().__init__()
        self.up_conv = ConvBlock(spatial_dims, in_channels, skip_channels)
        self.fuse = DoubleConv(spatial_dims, 2 * skip_channels, skip_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up_conv(resize_to(x, skip.shape[2:]))
        return self.fuse(torch.cat([x, skip], dim=1))


class UNetDecoder(nn.Module):
    """Deep to shallow: one ``UpBlock`` per skip; the output has ``skip_channels[0]`` channels."""

    def __init__(self, spatial_dims: int, bottleneck_channels: int, skip_channels: Sequence[int]) -> None:
        super().__init__()
        ins = [*skip_channels[1:], bottleneck_channels]
        self.blocks = nn.ModuleList(
            UpBlock(spatial_dims, c_in, c_skip) for c_in, c_skip in zip(ins[::-1], skip_channels[::-1]))

    def forward(self, bottleneck: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        x = bottleneck
        for block, skip in zip(self.blocks, reversed(skips)):
            x = block(x, skip)
        return x


def _make_dca(spatial_dims, skip_channels, dca, dca_token_grid, dca_blocks, dca_max_attention_bytes):
    if not dca:
        return None
    return DualCrossAttention(spatial_dims, skip_channels, dca_token_grid, n_blocks=dca_blocks,
                              max_attention_bytes=dca_max_attention_bytes)


class UNet(nn.Module):
    """A plain U-Net; with ``dca=True`` the skips pass through Dual Cross-Attention.

    Args:
        spatial_dims: 2 or 3.
        in_channels, out_channels: image channels and classes (logits).
        channels: per level, shallow to deep; the last is the bottleneck, the others are the
            skips (len(channels) - 1 max-pool halvings, so each input axis needs at least
            2**(len(channels) - 1) voxels; it need not be divisible by that).
        dca: route the skips through ``DualCrossAttention``.
        dca_token_grid: DCA's shared token grid; ``None`` = the coarsest skip's size (input / 8
            with 5 levels: 28 at 224² as in the paper).
        dca_blocks: DCA blocks (1 in the paper).
        dca_max_attention_bytes: see ``DualCrossAttention``.

    Unlike the official U-Net, the skips are the encoder blocks' activated outputs (the official
    code hands DCA and the decoder the last conv's output before its BatchNorm and ReLU).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (32, 64, 128, 256, 512),
        dca: bool = True,
        dca_token_grid: int | Sequence[int] | None = None,
        dca_blocks: int = 1,
        dca_max_attention_bytes: int | None = 2**30,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3; got {spatial_dims!r}")
        channels = [int(c) for c in channels]
        if len(channels) < 2:
            raise ValueError(f"channels needs at least 2 levels (skips + bottleneck); got {channels}")
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        self.channels = channels
        pool = MAX_POOL[spatial_dims]
        self.encoder = nn.ModuleList(
            [DoubleConv(spatial_dims, in_channels, channels[0])]
            + [nn.Sequential(pool(2), DoubleConv(spatial_dims, c_in, c_out))
               for c_in, c_out in zip(channels[:-1], channels[1:])])
        self.dca = _make_dca(spatial_dims, channels[:-1], dca, dca_token_grid, dca_blocks,
                             dca_max_attention_bytes)
        self.decoder = UNetDecoder(spatial_dims, channels[-1], channels[:-1])
        self.head = CONV[spatial_dims](channels[0], out_channels, kernel_size=1)

    def check_input(self, x: torch.Tensor) -> None:
        layout = "(B, C, H, W)" if self.spatial_dims == 2 else "(B, C, D, H, W)"
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(f"UNet(spatial_dims={self.spatial_dims}) expects x of shape {layout}; "
                             f"got {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects in_channels={self.in_channels}; got x with {x.shape[1]} channels")
        min_size = 2 ** (len(self.channels) - 1)
        if any(s < min_size for s in x.shape[2:]):
            raise ValueError(f"UNet with {len(self.channels)} levels halves each axis "
                             f"{len(self.channels) - 1} times, so it needs at least {min_size} voxels "
                             f"per axis; got spatial size {tuple(x.shape[2:])}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        features = []
        for stage in self.encoder:
            x = stage(x)
            features.append(x)
        skips = features[:-1]
        if self.dca is not None:
            skips = self.dca(skips)
        return self.head(self.decoder(features[-1], skips))


class EncoderUNet3D(nn.Module):
    """3D segmentation on any ``Encoder3D``: its last stage is the bottleneck, the earlier stages
    are skips (through DCA when ``dca=True``), decoded U-Net style back to the input size.

    Args:
        encoder: an ``Encoder3D`` (e.g. ``create_model("dcformer_nano")``); its ``feature_info``
            gives the skip channels.
        out_channels: classes (logits).
        dca, dca_token_grid, dca_blocks, dca_max_attention_bytes: as in ``UNet``.
        stem_channels: channels of a double conv on the raw input, the decoder's last skip, so
            the output recovers detail finer than the encoder's first stride.
    """

    spatial_dims = 3

    def __init__(
        self,
        encoder: Encoder3D,
        out_channels: int,
        dca: bool = True,
        dca_token_grid: int | Sequence[int] | None = None,
        dca_blocks: int = 1,
        dca_max_attention_bytes: int | None = 2**30,
        stem_channels: int = 16,
    ) -> None:
        super().__init__()
        info = getattr(encoder, "feature_info", None)
        if not info or len(info) < 2 or not hasattr(encoder, "forward_intermediates"):
            raise ValueError(
                f"encoder must offer forward_intermediates and a feature_info of at least 2 stages "
                f"(skips + bottleneck); got {type(encoder).__name__} with feature_info={info!r}")
        skip_channels = [f["num_chs"] for f in info[:-1]]
        self.encoder = encoder
        self.in_channels, self.out_channels = encoder.in_channels, out_channels
        self.dca = _make_dca(3, skip_channels, dca, dca_token_grid, dca_blocks, dca_max_attention_bytes)
        self.stem = DoubleConv(3, encoder.in_channels, stem_channels)
        self.decoder = UNetDecoder(3, info[-1]["num_chs"], [stem_channels, *skip_channels])
        self.head = nn.Conv3d(stem_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder.forward_intermediates(x)
        if len(features) != len(self.encoder.feature_info):
            raise ValueError(f"encoder.forward_intermediates returned {len(features)} maps; its "
                             f"feature_info lists {len(self.encoder.feature_info)} stages")
        skips = features[:-1]
        if self.dca is not None:
            skips = self.dca(skips)
        return self.head(self.decoder(features[-1], [self.stem(x), *skips]))


def _options(cls: type, *excluded: str) -> list[str]:
    return [p for p in inspect.signature(cls).parameters if p not in excluded]


def _register_unet(name: str, spatial_dims: int, dca: bool, in_channels: int, channels) -> None:
    @register_model(name, accepts=_options(UNet))
    def factory(**overrides) -> UNet:
        config = dict(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=2,
                      channels=channels, dca=dca)
        return UNet(**{**config, **overrides})

    factory.__name__ = name


def _register_encoder_unet(name: str, dca: bool) -> None:
    @register_model(name, accepts=["encoder_name", "in_channels", "encoder_kwargs", "out_channels",
                                   *_options(EncoderUNet3D, "encoder", "out_channels")])
    def factory(encoder_name: str = "dcformer_nano", in_channels: int | None = None,
                encoder_kwargs: dict | None = None, out_channels: int = 2, **overrides) -> EncoderUNet3D:
        # The encoder is looked up when the model is built, so any encoder registered by then
        # (not only at import time of this module) can be used.
        encoder_kwargs = dict(encoder_kwargs or {})
        if in_channels is not None:
            encoder_kwargs["in_channels"] = in_channels
        encoder = create_model(encoder_name, **encoder_kwargs)
        return EncoderUNet3D(encoder, out_channels, **{"dca": dca, **overrides})

    factory.__name__ = name


# 2D: RGB images at the paper's width; 3D: one-channel volumes at half that width.
for _dims, _in_channels, _channels in ((2, 3, (32, 64, 128, 256, 512)), (3, 1, (16, 32, 64, 128, 256))):
    _register_unet(f"unet{_dims}d", _dims, False, _in_channels, _channels)
    _register_unet(f"unet{_dims}d_dca", _dims, True, _in_channels, _channels)
_register_encoder_unet("dcformer_unet3d", dca=False)
_register_encoder_unet("dcformer_unet3d_dca", dca=True)
