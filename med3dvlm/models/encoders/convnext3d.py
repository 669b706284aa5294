"""ConvNeXt3D: ConvNeXt (Liu et al., 2022) with every 2D op made 3D.

Reads top-down:

    stem    : Conv3d(k = s = 4) -> LayerNorm            (stage 0 starts with it)
    stage i : LayerNorm -> Conv3d(k = s = 2) between stages, then blocks
    block   : x + DropPath(gamma * MLP(LN(DWConv 7^3(x))))   MLP = Linear(C, 4C) -> GELU -> Linear(4C, C)

There is no final norm: ``forward_intermediates`` returns the 4 stage maps at reductions 4, 8, 16, 32
(as timm's ConvNeXt, whose head holds the final LayerNorm).

The variants match the parameter counts of the DCFormer paper's ConvNeXt baselines (3.19M, 15.63M,
31.59M, no projection head). The paper does not publish their widths and depths; we keep the stage
widths of the DCFormer variant of the same name and chose depths that give the published counts
(docs/baselines.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..encoder import Encoder3D, Resample
from .layers import (DropPath, LayerNorm3d, LayerScale, Mlp, build_stages, init_trunc_normal,
                     to_channels_first, to_channels_last)
from ..registry import register_variants

__all__ = ["ConvNeXt3D", "ConvNeXt3DConfig", "CONVNEXT3D_VARIANTS"]


@dataclass(frozen=True)
class ConvNeXt3DConfig:
    """Four stages; the defaults are ConvNeXt3D-nano."""

    depths: tuple[int, ...] = (2, 3, 8, 2)
    dims: tuple[int, ...] = (32, 64, 128, 256)
    in_channels: int = 1
    stem_patch: int = 4
    kernel_size: int = 7
    mlp_ratio: int = 4
    layer_scale_init: float = 1e-6
    drop_path_rate: float = 0.0
    num_classes: int = 0  # > 0: a pooled linear classification head


CONVNEXT3D_VARIANTS = {
    "nano": ConvNeXt3DConfig((2, 3, 8, 2), (32, 64, 128, 256)),
    "naive": ConvNeXt3DConfig((1, 2, 4, 5), (64, 128, 256, 512)),
    "tiny": ConvNeXt3DConfig((3, 3, 13, 2), (96, 192, 384, 768)),
}


class ConvNeXtBlock(nn.Module):
    """Depthwise k^3 conv on the map, then LayerNorm, MLP and layer scale over channels-last voxels."""

    def __init__(self, dim: int, kernel_size: int, mlp_ratio: int, layer_scale_init: float, drop_path: float) -> None:
        super().__init__()
        self.dwconv = nn.Conv3d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio * dim)
        self.layer_scale = LayerScale(dim, layer_scale_init)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = to_channels_last(self.dwconv(x))
        y = self.layer_scale(self.mlp(self.norm(y)))
        return x + self.drop_path(to_channels_first(y))


class ConvNeXt3D(Encoder3D):
    """ConvNeXt3D encoder: ``forward_intermediates`` returns the 4 stage maps."""

    def __init__(self, config: ConvNeXt3DConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = self.resolve_config(config, ConvNeXt3DConfig, overrides)
        if len(cfg.depths) != 4 or len(cfg.dims) != 4:
            raise ValueError(f"ConvNeXt3D expects 4 depths and 4 dims; got depths={cfg.depths}, dims={cfg.dims}")
        if isinstance(cfg.kernel_size, bool) or not isinstance(cfg.kernel_size, int) or cfg.kernel_size < 1 \
                or cfg.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int (same-size padding); got {cfg.kernel_size!r}")
        self.config = cfg
        self.in_channels = cfg.in_channels
        d = cfg.dims
        stem = nn.Sequential(nn.Conv3d(cfg.in_channels, d[0], cfg.stem_patch, stride=cfg.stem_patch), LayerNorm3d(d[0]))
        downsamples = [stem] + [nn.Sequential(LayerNorm3d(d[i - 1]), nn.Conv3d(d[i - 1], d[i], 2, stride=2))
                                for i in range(1, 4)]
        self.stages = build_stages(
            downsamples, lambda i, p: ConvNeXtBlock(d[i], cfg.kernel_size, cfg.mlp_ratio, cfg.layer_scale_init, p),
            cfg.depths, cfg.drop_path_rate)
        self.feature_info = [{"num_chs": ch, "reduction": (cfg.stem_patch * 2**i,) * 3, "module": f"stages.{i}"}
                             for i, ch in enumerate(d)]
        # Unpadded patchify convs: sizes round down, and each needs at least its kernel.
        self.resampling = [[Resample(cfg.stem_patch, cfg.stem_patch)]] + [[Resample(2, 2)]] * 3
        self.init_head(cfg.num_classes)
        self.apply(init_trunc_normal)


register_variants("convnext3d", ConvNeXt3D, CONVNEXT3D_VARIANTS)
