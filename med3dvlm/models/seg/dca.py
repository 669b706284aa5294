"""Dual Cross-Attention (DCA) over the skip connections of a U-Net, in 2D and 3D.

Ates et al., "Dual Cross-Attention for Medical Image Segmentation" (EAAI 2023, arXiv 2303.17696).
The L encoder maps E_i (C_i channels each) pass through, top-down as in the paper's figure:

1. token embedding: average-pool every E_i to one shared token grid of N tokens, then a
   per-channel scale and bias (the official 1×1 depthwise convolution);
2. ``n_blocks`` DCA blocks, each channel cross-attention (CCA) then spatial cross-attention
   (SCA), both pre-LayerNorm with a residual;
3. back to each skip: 1×1 convolution with bias, resize to E_i's exact size, add E_i,
   BatchNorm, ReLU.

Memory: SCA forms an N × N attention map per head and per scale. Where it is materialised (the
unfused math path of ``F.scaled_dot_product_attention``, which PyTorch takes here on CPU when
training), autograd keeps the softmax for backward, so one sample holds

    attention bytes = n_blocks · L · spatial_heads · N² · 4      (fp32)

e.g. 39 MB for the paper's 2D setting (N = 28² = 784, L = 4, 4 heads), 268 MB for a 3D grid of
8×16×16 = 2048 tokens, 17 GB for 16×32×32. Grids above ``max_attention_bytes`` (1 GiB per sample
by default) raise an error stating the figure. Fused GPU kernels avoid storing the map, but the
compute still grows as N². The CCA maps (C_i × C_Σ per scale) are small next to it.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import ADAPTIVE_AVG_POOL, BATCH_NORM, CONV, LINEAR_MODE

__all__ = ["DualCrossAttention", "DCABlock", "ChannelCrossAttention", "SpatialCrossAttention",
           "PerChannelAffine", "resize_to"]



def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Linear resize of ``x`` (B, C, *spatial) to exactly ``size``, corners aligned as the official DCA."""
    size = tuple(size)
    if tuple(x.shape[2:]) == size:
        return x
    return F.interpolate(x, size=size, mode=LINEAR_MODE[x.dim() - 2], align_corners=True)


class PerChannelAffine(nn.Module):
    """``x * weight + bias`` over the last (channel) axis: a 1×1 depthwise convolution on tokens."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels))
        self.bias = nn.Parameter(torch.empty(channels))
        # The official depthwise 1×1 conv has fan-in 1, so PyTorch's default init draws weight
        # and bias from U(-1, 1); kept so that training starts where the paper's did.
        nn.init.uniform_(self.weight, -1.0, 1.0)
        nn.init.uniform_(self.bias, -1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias, x, self.weight)


class ChannelCrossAttention(nn.Module):
    """CCA for one scale: its C_i channels attend over the C_Σ channels of all scales.

    Each channel is a token whose features are its N spatial values, so the map is C_i × C_Σ per
    head. Scaled by 1/√C_Σ as in the paper and the official code (not by the feature length N).
    """

    def __init__(self, channels: int, total_channels: int, heads: int = 1) -> None:
        super().__init__()
        self.heads = heads
        self.scale = total_channels ** -0.5
        self.query = PerChannelAffine(channels)
        self.key = PerChannelAffine(total_channels)
        self.value = PerChannelAffine(total_channels)
        self.proj = PerChannelAffine(channels)

    def split_heads(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, heads, C/heads, N): channels become the attention sequence."""
        b, n, c = tokens.shape
        return tokens.transpose(1, 2).reshape(b, self.heads, c // self.heads, n)

    def forward(self, own: torch.Tensor, joint: torch.Tensor) -> torch.Tensor:
        """``own`` (B, N, C_i), ``joint`` (B, N, C_Σ) -> (B, N, C_i)."""
        q = self.split_heads(self.query(own))
        k = self.split_heads(self.key(joint))
        v = self.split_heads(self.value(joint))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, h, C_i/h, N)
        return self.proj(out.flatten(1, 2).transpose(1, 2))


class SpatialCrossAttention(nn.Module):
    """SCA for one scale: queries and keys from all scales' channels, values from this scale's.

    The map is N × N per head, scaled by 1/√(C_Σ/heads).
    """

    def __init__(self, channels: int, total_channels: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.query = PerChannelAffine(total_channels)
        self.key = PerChannelAffine(total_channels)
        self.value = PerChannelAffine(channels)
        self.proj = PerChannelAffine(channels)

    def split_heads(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, heads, N, C/heads)."""
        b, n, c = tokens.shape
        return tokens.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, own: torch.Tensor, joint: torch.Tensor) -> torch.Tensor:
        """``own`` (B, N, C_i), ``joint`` (B, N, C_Σ) -> (B, N, C_i)."""
        q = self.split_heads(self.query(joint))
        k = self.split_heads(self.key(joint))
        v = self.split_heads(self.value(own))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, C_i/h)
        return self.proj(out.transpose(1, 2).flatten(2))


class DCABlock(nn.Module):
    """CCA then SCA over the token lists of all scales; each pre-LayerNorm (eps 1e-6) with a residual."""

    def __init__(self, in_channels: Sequence[int], channel_heads: int = 1, spatial_heads: int = 4) -> None:
        super().__init__()
        total = sum(in_channels)
        self.channel_norm = nn.ModuleList(nn.LayerNorm(c, eps=1e-6) for c in in_channels)
        self.channel_attention = nn.ModuleList(
            ChannelCrossAttention(c, total, channel_heads) for c in in_channels)
        self.spatial_norm = nn.ModuleList(nn.LayerNorm(c, eps=1e-6) for c in in_channels)
        self.spatial_attention = nn.ModuleList(
            SpatialCrossAttention(c, total, spatial_heads) for c in in_channels)

    @staticmethod
    def cross_attend(tokens, norms, attentions) -> list[torch.Tensor]:
        normed = [norm(t) for norm, t in zip(norms, tokens)]
        joint = torch.cat(normed, dim=-1)
        return [t + attention(n, joint) for t, n, attention in zip(tokens, normed, attentions)]

    def forward(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        tokens = self.cross_attend(tokens, self.channel_norm, self.channel_attention)
        return self.cross_attend(tokens, self.spatial_norm, self.spatial_attention)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return value


class DualCrossAttention(nn.Module):
    """Dual Cross-Attention over L skip maps; returns L maps of the same shapes.

    Args:
        spatial_dims: 2 (skips (B, C_i, H_i, W_i)) or 3 (skips (B, C_i, D_i, H_i, W_i)).
        in_channels: C_i of every skip, shallow to deep, e.g. [32, 64, 128, 256].
        token_grid: the shared grid every skip is pooled to: an int (same on every axis) or one
            size per axis, e.g. (4, 8, 8) for anisotropic CT; no larger than any skip. ``None``
            pools to the coarsest skip's size at each call (the official U-Net's choice,
            input size / 8 = 28 at 224²).
        n_blocks: number of CCA + SCA blocks (1 in the paper).
        channel_heads, spatial_heads: heads of CCA (1) and SCA (4), as in the paper. Every C_i
            and C_Σ must be divisible by both.
        max_attention_bytes: refuse token grids whose SCA maps would take more than this many
            bytes per sample: n_blocks · L · spatial_heads · N² · 4. ``None`` disables the check.

    The defaults reproduce the official module: 110,560 parameters for [32, 64, 128, 256], in 2D
    and 3D alike. Unlike the official code, inputs need not be square or a power of two: each
    skip is pooled adaptively and resized back to its exact size.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: Sequence[int],
        token_grid: int | Sequence[int] | None,
        n_blocks: int = 1,
        channel_heads: int = 1,
        spatial_heads: int = 4,
        max_attention_bytes: int | None = 2**30,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3; got {spatial_dims!r}")
        in_channels = list(in_channels)
        if not in_channels:
            raise ValueError("in_channels must list the channels of at least one skip; got []")
        for i, c in enumerate(in_channels):
            _positive_int(c, f"in_channels[{i}]")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.n_blocks = _positive_int(n_blocks, "n_blocks")
        self.channel_heads = _positive_int(channel_heads, "channel_heads")
        self.spatial_heads = _positive_int(spatial_heads, "spatial_heads")
        self.max_attention_bytes = max_attention_bytes
        self.token_grid = self._parse_token_grid(token_grid)
        total = sum(in_channels)
        for heads_name, heads in (("channel_heads", channel_heads), ("spatial_heads", spatial_heads)):
            bad = [c for c in in_channels + [total] if c % heads]
            if bad:
                raise ValueError(
                    f"{heads_name}={heads} must divide every skip's channels and their sum "
                    f"(in_channels={in_channels}, sum {total}); {bad} are not divisible")
        if self.token_grid is not None:
            self.check_attention_memory(self.token_grid)

        self.token_proj = nn.ModuleList(PerChannelAffine(c) for c in in_channels)
        self.blocks = nn.ModuleList(
            DCABlock(in_channels, channel_heads, spatial_heads) for _ in range(n_blocks))
        conv, batch_norm = CONV[spatial_dims], BATCH_NORM[spatial_dims]
        self.out_proj = nn.ModuleList(conv(c, c, kernel_size=1) for c in in_channels)
        self.out_norm = nn.ModuleList(nn.Sequential(batch_norm(c), nn.ReLU()) for c in in_channels)

    def _parse_token_grid(self, token_grid) -> tuple[int, ...] | None:
        if token_grid is None:
            return None
        grid = (token_grid,) * self.spatial_dims if isinstance(token_grid, int) else tuple(token_grid)
        if len(grid) != self.spatial_dims or any(
                isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid):
            raise ValueError(
                f"token_grid must be a positive int or {self.spatial_dims} positive ints "
                f"(spatial_dims={self.spatial_dims}); got {token_grid!r}")
        return grid

    def attention_bytes(self, token_grid: Sequence[int]) -> int:
        """Bytes of fp32 SCA maps one sample keeps for backward: n_blocks · L · heads · N² · 4."""
        n_tokens = math.prod(token_grid)
        return self.n_blocks * len(self.in_channels) * self.spatial_heads * n_tokens**2 * 4

    def check_attention_memory(self, token_grid: Sequence[int]) -> None:
        if self.max_attention_bytes is None:
            return
        needed = self.attention_bytes(token_grid)
        if needed > self.max_attention_bytes:
            n_tokens = math.prod(token_grid)
            raise ValueError(
                f"token_grid {tuple(token_grid)} gives N = {n_tokens} tokens; the spatial attention "
                f"maps take n_blocks·L·spatial_heads·N²·4 = {self.n_blocks}·{len(self.in_channels)}·"
                f"{self.spatial_heads}·{n_tokens}²·4 = {needed:,} bytes ({needed / 2**30:.2f} GiB) per "
                f"sample, above max_attention_bytes = {self.max_attention_bytes:,}. Use a "
                f"coarser token_grid, or raise max_attention_bytes (None disables this check)")

    def check_skips(self, skips: Sequence[torch.Tensor]) -> tuple[int, ...]:
        """Clear errors for a wrong number, rank, batch or channel count of skips; returns the grid."""
        if isinstance(skips, torch.Tensor) or not isinstance(skips, (list, tuple)):
            raise TypeError(f"skips must be a list or tuple of {len(self.in_channels)} tensors; "
                            f"got {type(skips).__name__}")
        if len(skips) != len(self.in_channels):
            raise ValueError(f"expected {len(self.in_channels)} skips (len(in_channels)); got {len(skips)}")
        layout = "(B, C, H, W)" if self.spatial_dims == 2 else "(B, C, D, H, W)"
        for i, (skip, channels) in enumerate(zip(skips, self.in_channels)):
            if skip.dim() != self.spatial_dims + 2:
                raise ValueError(f"skips[{i}] must have shape {layout} (spatial_dims={self.spatial_dims}); "
                                 f"got {tuple(skip.shape)}")
            if skip.shape[1] != channels:
                raise ValueError(f"skips[{i}] must have in_channels[{i}] = {channels} channels; "
                                 f"got {skip.shape[1]}")
            if skip.shape[0] != skips[0].shape[0]:
                raise ValueError(f"all skips must share the batch size; skips[0] has {skips[0].shape[0]}, "
                                 f"skips[{i}] has {skip.shape[0]}")
        if self.token_grid is None:
            grid = tuple(min(s.shape[2 + a] for s in skips) for a in range(self.spatial_dims))
            self.check_attention_memory(grid)
            return grid
        for i, skip in enumerate(skips):
            if any(g > s for g, s in zip(self.token_grid, skip.shape[2:])):
                raise ValueError(f"token_grid {self.token_grid} must be no larger than every skip; "
                                 f"skips[{i}] has spatial size {tuple(skip.shape[2:])}")
        return self.token_grid

    def forward(self, skips: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        grid = self.check_skips(skips)
        pool = ADAPTIVE_AVG_POOL[self.spatial_dims]
        tokens = [proj(pool(skip, grid).flatten(2).transpose(1, 2))
                  for proj, skip in zip(self.token_proj, skips)]
        for block in self.blocks:
            tokens = block(tokens)
        outputs = []
        for t, skip, out_proj, out_norm in zip(tokens, skips, self.out_proj, self.out_norm):
            t = t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid)
            # 1×1 conv before the resize, not after as in the official code: the same result
            # (linear interpolation weights sum to 1, so it commutes with a 1×1 conv and its
            # bias) at N positions instead of H_i·W_i.
            outputs.append(out_norm(resize_to(out_proj(t), skip.shape[2:]) + skip))
        return outputs

    def extra_repr(self) -> str:
        return (f"spatial_dims={self.spatial_dims}, in_channels={self.in_channels}, "
                f"token_grid={self.token_grid}, n_blocks={self.n_blocks}")
