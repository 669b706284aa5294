"""PoolFormer3D: PoolFormer (MetaFormer, Yu et al., 2022) with every 2D op made 3D.

Reads top-down:

    stem    : Conv3d(k=7, s=4, p=2)                      (stage 0 starts with it)
    stage i : Conv3d(k=3, s=2, p=1) between stages, then blocks
    block   : x + DropPath(gamma1 * (AvgPool3d(3, 1, 1)(GN(x)) - GN(x)))
              x + DropPath(gamma2 * MLP(GN(x)))          GN = GroupNorm(1, C); MLP ratio 4

The pooling token mixer subtracts its input because the block's residual already adds it back.
There is no final norm: ``forward_intermediates`` returns the 4 stage maps at reductions 4, 8, 16, 32.

The variants match the parameter counts of the DCFormer paper's PoolFormer baselines (2.79M,
11.31M, 20.68M, no projection head). The paper does not publish their widths and depths; nano and
naive keep the stage widths of the DCFormer variant of the same name, tiny uses PoolFormer-S widths
(no depths reach 20.68M at DCFormer-tiny's widths); depths were chosen to give the published counts
(docs/baselines.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..encoder import Encoder3D, Resample
from .layers import (DropPath, LayerScale, Mlp, build_stages, init_trunc_normal, to_channels_first,
                     to_channels_last)
from ..registry import register_variants

__all__ = ["PoolFormer3D", "PoolFormer3DConfig", "POOLFORMER3D_VARIANTS"]


@dataclass(frozen=True)
class PoolFormer3DConfig:
    """Four stages; the defaults are PoolFormer3D-nano."""

    depths: tuple[int, ...] = (4, 4, 3, 2)
    dims: tuple[int, ...] = (32, 64, 128, 256)
    in_channels: int = 1
    pool_size: int = 3
    mlp_ratio: int = 4
    layer_scale_init: float = 1e-5
    drop_path_rate: float = 0.0
    num_classes: int = 0  # > 0: a pooled linear classification head


POOLFORMER3D_VARIANTS = {
    "nano": PoolFormer3DConfig((4, 4, 3, 2), (32, 64, 128, 256)),
    "naive": PoolFormer3DConfig((2, 2, 4, 2), (64, 128, 256, 512)),
    "tiny": PoolFormer3DConfig((1, 6, 12, 2), (64, 128, 320, 512)),
}

_STEM_KERNEL, _STEM_STRIDE, _STEM_PADDING = 7, 4, 2


class Pooling(nn.Module):
    """Mean over the k^3 neighbourhood (stride 1, same size; voxels outside the map not counted)
    minus the identity.

    Written as pooled-zero-padded input / pooled-zero-padded ones because ``nn.AvgPool3d`` refuses
    maps smaller than its kernel even with padding, and late stages of small volumes are 1 or 2 wide.
    """

    def __init__(self, pool_size: int) -> None:
        super().__init__()
        if pool_size < 1 or pool_size % 2 == 0:
            raise ValueError(f"pool_size must be a positive odd int; got {pool_size}")
        self.pool_size = pool_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = (self.pool_size // 2,) * 6
        ones = x.new_ones((1, 1, *x.shape[2:]))
        total = F.avg_pool3d(F.pad(x, pad), self.pool_size, stride=1)
        count = F.avg_pool3d(F.pad(ones, pad), self.pool_size, stride=1)
        return total / count - x


class PoolFormerBlock(nn.Module):
    def __init__(self, dim: int, pool_size: int, mlp_ratio: int, layer_scale_init: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(1, dim)
        self.token_mixer = Pooling(pool_size)
        self.layer_scale1 = LayerScale(dim, layer_scale_init, channels_first=True)
        self.norm2 = nn.GroupNorm(1, dim)
        self.mlp = Mlp(dim, mlp_ratio * dim)
        self.layer_scale2 = LayerScale(dim, layer_scale_init, channels_first=True)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale1(self.token_mixer(self.norm1(x))))
        y = to_channels_first(self.mlp(to_channels_last(self.norm2(x))))
        return x + self.drop_path(self.layer_scale2(y))


class PoolFormer3D(Encoder3D):
    """PoolFormer3D encoder: ``forward_intermediates`` returns the 4 stage maps."""

    def __init__(self, config: PoolFormer3DConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = self.resolve_config(config, PoolFormer3DConfig, overrides)
        if len(cfg.depths) != 4 or len(cfg.dims) != 4:
            raise ValueError(f"PoolFormer3D expects 4 depths and 4 dims; got depths={cfg.depths}, dims={cfg.dims}")
        self.config = cfg
        self.in_channels = cfg.in_channels
        d = cfg.dims
        downsamples = [nn.Conv3d(cfg.in_channels, d[0], _STEM_KERNEL, _STEM_STRIDE, _STEM_PADDING)]
        downsamples += [nn.Conv3d(d[i - 1], d[i], 3, stride=2, padding=1) for i in range(1, 4)]
        self.stages = build_stages(
            downsamples, lambda i, p: PoolFormerBlock(d[i], cfg.pool_size, cfg.mlp_ratio, cfg.layer_scale_init, p),
            cfg.depths, cfg.drop_path_rate)
        self.feature_info = [{"num_chs": ch, "reduction": (_STEM_STRIDE * 2**i,) * 3, "module": f"stages.{i}"}
                             for i, ch in enumerate(d)]
        self.resampling = [[Resample(_STEM_KERNEL, _STEM_STRIDE, _STEM_PADDING)]] + [[Resample(3, 2, 1)]] * 3
        self.init_head(cfg.num_classes)
        self.apply(init_trunc_normal)


register_variants("poolformer3d", PoolFormer3D, POOLFORMER3D_VARIANTS)
