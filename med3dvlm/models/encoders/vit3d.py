"""ViT3D: a plain 3D Vision Transformer (pre-norm blocks, learnable position embedding).

Reads top-down:

    patch embedding : [LayerNorm over each patch's voxels] -> Conv3d(kernel = stride = patch)
                      -> [LayerNorm]   (the bracketed norms are ``embed_norm=True``)
    tokens          : [class token] + patch tokens + position embedding (patch tokens only)
    blocks          : x + Attention(LN(x)), x + MLP(LN(x)); attention by F.scaled_dot_product_attention
    final LayerNorm

Feature stages: the ``depth`` blocks are cut into 4 equal groups (``depth * i // 4`` for i = 1..4),
as timm does for ViT feature extraction; stage i returns the patch tokens after its last block,
reshaped to a (B, dim, D/pd, H/ph, W/pw) map (the class token is left out). Only the last stage
includes the final LayerNorm. Every stage has the patch size as its reduction.

Input sizes: each of D, H, W must be a multiple of the patch size (else a ValueError says so); a grid
other than the one ``img_size`` gives is handled by trilinear interpolation of the position embedding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..encoder import Encoder3D, Resample, as_triple
from .layers import DropPath, Mlp, drop_path_rates, init_trunc_normal
from ..registry import register_variants

__all__ = ["ViT3D", "ViT3DConfig", "VIT3D_VARIANTS", "Attention"]


@dataclass(frozen=True)
class ViT3DConfig:
    """Sizes are (D, H, W). The defaults are M3D-CLIP's vision tower."""

    img_size: tuple[int, int, int] = (32, 256, 256)  # the grid the position embedding is learned for
    patch_size: tuple[int, int, int] = (4, 16, 16)
    in_channels: int = 1
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    head_dim: int = 64  # attention inner width is num_heads * head_dim, which may differ from dim
    mlp_ratio: float = 4.0
    # Hidden width of the MLP; overrides mlp_ratio. The DCFormer paper's ViT baselines passed 4 here
    # (a hidden width of 4, not a ratio): mlp_hidden=4 reproduces their parameter counts.
    mlp_hidden: int | None = None
    qkv_bias: bool = False
    class_token: bool = True
    # LayerNorm over each patch's C*pd*ph*pw voxels before the projection and over dim after it
    # (the 3D ViT of the vit-pytorch package); the DCFormer paper's ViT counts need it.
    embed_norm: bool = False
    drop_path_rate: float = 0.0
    num_classes: int = 0  # > 0: a linear classification head on the mean patch token

    def __post_init__(self) -> None:
        object.__setattr__(self, "img_size", as_triple(self.img_size, "img_size", minimum=1))
        object.__setattr__(self, "patch_size", as_triple(self.patch_size, "patch_size", minimum=1))
        if any(s % p for s, p in zip(self.img_size, self.patch_size)):
            raise ValueError(f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        if self.depth < 4:
            raise ValueError(f"depth must be >= 4 (the blocks are cut into 4 feature stages); got {self.depth}")

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(s // p for s, p in zip(self.img_size, self.patch_size))

    @property
    def hidden(self) -> int:
        return self.mlp_hidden if self.mlp_hidden is not None else int(self.dim * self.mlp_ratio)


_DCFORMER_PAPER_VIT = dict(img_size=(256, 512, 512), patch_size=32, num_heads=8, head_dim=64, embed_norm=True)

VIT3D_VARIANTS = {
    "m3d_clip": ViT3DConfig(),
    "naive": ViT3DConfig(dim=256, depth=4, **_DCFORMER_PAPER_VIT),
    "tiny": ViT3DConfig(dim=512, depth=8, **_DCFORMER_PAPER_VIT),
}


class PatchVoxelNorm(nn.Module):
    """LayerNorm over the C*pd*ph*pw voxels of each non-overlapping patch (affine per voxel)."""

    def __init__(self, in_channels: int, patch_size: tuple[int, int, int], eps: float = 1e-5) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.shape = (in_channels, *patch_size)
        self.weight = nn.Parameter(torch.ones(self.shape))
        self.bias = nn.Parameter(torch.zeros(self.shape))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        pd, ph, pw = self.patch_size
        # (B, C, gd, pd, gh, ph, gw, pw) -> (B, gd, gh, gw, C, pd, ph, pw): normalise the last 4 axes
        patches = x.reshape(b, c, d // pd, pd, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        patches = F.layer_norm(patches, self.shape, self.weight, self.bias, self.eps)
        return patches.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, c, d, h, w)


class PatchEmbed3D(nn.Module):
    """(B, C, D, H, W) -> patch tokens (B, N, dim) in (D, H, W) raster order, and the grid."""

    def __init__(self, in_channels: int, patch_size: tuple[int, int, int], dim: int, embed_norm: bool) -> None:
        super().__init__()
        self.voxel_norm = PatchVoxelNorm(in_channels, patch_size) if embed_norm else nn.Identity()
        self.proj = nn.Conv3d(in_channels, dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim) if embed_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        y = self.proj(self.voxel_norm(x))
        return self.norm(y.flatten(2).transpose(1, 2)), tuple(y.shape[2:])


class Attention(nn.Module):
    """Multi-head self-attention; inner width num_heads * head_dim, projected back to dim."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        # SDPA picks the flash / memory-efficient kernels on CUDA where the dtype and shapes allow.
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: ViT3DConfig, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.num_heads, cfg.head_dim, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = Mlp(cfg.dim, cfg.hidden)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViTStage(nn.Module):
    """A group of blocks; the last stage also holds the final LayerNorm."""

    def __init__(self, blocks: list[Block], norm: nn.Module | None = None) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.norm = norm if norm is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(x))


class ViT3D(Encoder3D):
    """3D ViT encoder: ``forward_intermediates`` returns 4 maps (B, dim, D/pd, H/ph, W/pw)."""

    def __init__(self, config: ViT3DConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = self.resolve_config(config, ViT3DConfig, overrides)
        self.config = cfg
        self.in_channels = cfg.in_channels
        self.patch_size = cfg.patch_size
        self.patch_embed = PatchEmbed3D(cfg.in_channels, cfg.patch_size, cfg.dim, cfg.embed_norm)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.dim, *cfg.grid))  # stored as a map: easy to resize

        ends = [cfg.depth * (i + 1) // 4 for i in range(4)]
        rates = drop_path_rates(cfg.drop_path_rate, [e - s for s, e in zip([0] + ends[:-1], ends)])
        self.stages = nn.ModuleList(
            ViTStage([Block(cfg, p) for p in stage_rates], nn.LayerNorm(cfg.dim) if i == 3 else None)
            for i, stage_rates in enumerate(rates)
        )
        self.feature_info = [{"num_chs": cfg.dim, "reduction": cfg.patch_size, "module": f"stages.{i}"}
                             for i in range(4)]
        self.resampling = [[Resample(cfg.patch_size, cfg.patch_size)], [], [], []]
        self.init_head(cfg.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_trunc_normal)

    def check_input(self, x: torch.Tensor) -> None:
        super().check_input(x)
        if any(s % p for s, p in zip(x.shape[2:], self.patch_size)):
            raise ValueError(
                f"ViT3D cuts the volume into {self.patch_size} patches; the input volume {tuple(x.shape[2:])} "
                f"is not a multiple of it along every axis (crop or pad it first)")

    def position_embedding(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """(1, N, dim) for a grid, trilinearly resized when it differs from the configured grid."""
        pos = self.pos_embed
        if tuple(pos.shape[2:]) != tuple(grid):
            pos = F.interpolate(pos, size=grid, mode="trilinear", align_corners=False)
        return pos.flatten(2).transpose(1, 2)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Tokens entering the first block: (B, [1 +] N, dim), and the patch grid."""
        tokens, grid = self.patch_embed(x)
        tokens = tokens + self.position_embedding(grid).to(tokens.dtype)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.to(tokens.dtype).expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return tokens, grid

    def tokens_to_map(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        patches = tokens[:, 1:] if self.cls_token is not None else tokens
        return patches.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)

    def run_stages(self, x: torch.Tensor, last: int):
        tokens, grid = self.embed(x)
        for stage in self.stages[: last + 1]:
            tokens = self.run_stage(stage, tokens)
            yield self.tokens_to_map(tokens, grid)


register_variants("vit3d", ViT3D, VIT3D_VARIANTS)
