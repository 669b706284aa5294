"""Small blocks shared by the baseline encoders (ViT3D, ConvNeXt3D, PoolFormer3D).

Conventions: "map" means a channels-first volume (B, C, D, H, W); "tokens" means channels-last
(..., C). ``to_channels_last`` / ``to_channels_first`` are permutes (views), so a map stored in
``torch.channels_last_3d`` memory becomes a contiguous channels-last tensor without a copy.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["to_channels_last", "to_channels_first", "LayerNorm3d", "Mlp", "LayerScale", "DropPath",
           "drop_path_rates", "Stage", "build_stages", "init_trunc_normal"]


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, D, H, W, C), a view."""
    return x.permute(0, 2, 3, 4, 1)


def to_channels_first(x: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W, C) -> (B, C, D, H, W), a view."""
    return x.permute(0, 4, 1, 2, 3)


class LayerNorm3d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, D, H, W) map (each voxel normalised on its own)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(to_channels_last(x), self.normalized_shape, self.weight, self.bias, self.eps)
        return to_channels_first(y)


class Mlp(nn.Module):
    """Linear(dim, hidden) -> GELU -> Linear(hidden, dim) over the last axis."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    """Learnable per-channel scale (CaiT / ConvNeXt), initialised to ``init_value``.

    ``channels_first=True`` scales a (B, C, D, H, W) map, otherwise the last axis.
    """

    def __init__(self, dim: int, init_value: float, channels_first: bool = False) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))
        self.channels_first = channels_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = self.gamma.view(-1, 1, 1, 1) if self.channels_first else self.gamma
        return x * gamma


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability ``p``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1); got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def drop_path_rates(rate: float, depths: list[int] | tuple[int, ...]) -> list[list[float]]:
    """Per-block drop-path probabilities rising linearly from 0 to ``rate``, split by stage."""
    total = sum(depths)
    flat = [rate * i / max(total - 1, 1) for i in range(total)]
    out, start = [], 0
    for d in depths:
        out.append(flat[start:start + d])
        start += d
    return out


class Stage(nn.Module):
    """One stage of a hierarchical encoder: a downsampling layer (the stem for stage 0), then blocks."""

    def __init__(self, downsample: nn.Module, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


def build_stages(downsamples: list[nn.Module], make_block: Callable[[int, float], nn.Module],
                 depths: Sequence[int], drop_path_rate: float) -> nn.ModuleList:
    """One ``Stage`` per downsampling layer, with ``depths[i]`` blocks ``make_block(i, drop_path)``
    whose drop-path probabilities rise linearly over the whole network."""
    rates = drop_path_rates(drop_path_rate, depths)
    return nn.ModuleList(Stage(down, [make_block(i, p) for p in rates[i]]) for i, down in enumerate(downsamples))


def init_trunc_normal(module: nn.Module) -> None:
    """For ``model.apply``: conv and linear weights ~ truncated N(0, 0.02), biases zero (timm's init)."""
    if isinstance(module, (nn.Conv3d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
