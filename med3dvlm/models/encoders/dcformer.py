"""DCFormer: a 3D encoder built from decomposed (D, H, W) depthwise convolutions.

Reads top-down like the paper's figure:

    stem   : 4 decomposed units (dense, per-branch BatchNorm, no activation): in -> c0, k=7, stride 4;
             then 3 x (c0 -> c0, k=3)
    stage i: MaxPool3d(3, 2, 1) -> 1x1x1 Conv3d (no bias) c_{i-1} -> c_i, then blocks
             x + layer_scale * MLP(DecomposedDepthwise(x)),  1D kernel sizes 13, 11, 9, 7

Layout: the stem runs NCDHW (its dense convs go to cuDNN / MKL-DNN). At the start of stage 1 the
map is converted ONCE to channels_last_3d, the only layout change: the fused depthwise kernel
reads channels-last natively and the MLP is a Linear over the last axis of a (B, D, H, W, C)
*view* of the same memory, so blocks need no permute copies.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from dcformer_kernels import DecomposedConv3d

from ..checkpoints import state_dict_under_anchor
from ..encoder import Encoder3D, Resample
from .layers import Mlp, to_channels_first, to_channels_last
from ..registry import register_variants

__all__ = ["DCFormer", "DCFormerConfig", "DCFORMER_VARIANTS", "load_official_dcformer"]


@dataclass(frozen=True)
class DCFormerConfig:
    """Blocks per stage and channels per stage, stem first (the official code's ``blocks`` and
    ``channels``); the defaults are DCFormer-nano."""

    depths: tuple[int, ...] = (1, 1, 1, 1, 1)
    dims: tuple[int, ...] = (32, 32, 64, 128, 256)
    kernel_sizes: tuple[int, ...] = (13, 11, 9, 7)
    in_channels: int = 1
    stem_kernel_size: int = 7
    stem_stride: int = 4
    mlp_ratio: int = 4
    layer_scale_init: float = 1e-6
    stem_act: str | None = None  # the released weights were trained without a stem activation
    backend: str = "auto"  # "torch" runs the unfused PyTorch path (for comparisons)
    num_classes: int = 0  # > 0: a pooled linear classification head


DCFORMER_VARIANTS = {
    "nano": DCFormerConfig((1, 1, 1, 1, 1), (32, 32, 64, 128, 256)),
    "naive": DCFormerConfig((1, 2, 2, 2, 2), (32, 64, 128, 256, 512)),
    "tiny": DCFormerConfig((1, 2, 3, 3, 2), (64, 96, 192, 384, 768)),
    "small": DCFormerConfig((1, 2, 3, 6, 2), (64, 96, 192, 384, 768)),
    "base": DCFormerConfig((1, 2, 6, 6, 2), (64, 128, 256, 512, 1024)),
    "large": DCFormerConfig((1, 2, 6, 12, 2), (64, 256, 512, 1024, 2048)),
}


class Stem(nn.Sequential):
    """Four dense decomposed units with per-branch BN; the first downsamples by ``stride``."""

    def __init__(self, in_channels: int, channels: int, kernel_size: int, stride: int, act: str | None,
                 backend: str) -> None:
        if act not in (None, "gelu"):
            raise ValueError(f"stem_act must be None or 'gelu'; got {act!r}")
        units = []
        for i in range(4):
            units.append(DecomposedConv3d(in_channels if i == 0 else channels, channels,
                                          kernel_size if i == 0 else 3, stride if i == 0 else 1,
                                          groups=1, norm="batch", backend=backend))
            if act == "gelu":
                units.append(nn.GELU())
        super().__init__(*units)


class DCFormerBlock(nn.Module):
    """x + scale * MLP(DecomposedDepthwise(x)) on a channels_last_3d map."""

    def __init__(self, dim: int, kernel_size: int, mlp_ratio: int, layer_scale_init: float, backend: str) -> None:
        super().__init__()
        self.dwconv = DecomposedConv3d(dim, dim, kernel_size, groups=dim, norm="batch", backend=backend)
        self.mlp = Mlp(dim, mlp_ratio * dim)
        self.scale = nn.Parameter(torch.full((dim,), layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, D, H, W) in channels_last memory -> (B, D, H, W, C) view: no copy
        y = self.mlp(to_channels_last(self.dwconv(x))) * self.scale
        return x + to_channels_first(y)


class Downsample(nn.Module):
    """MaxPool3d(3, 2, 1) then a bias-free 1x1x1 conv to the stage's width."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.pool = nn.MaxPool3d(3, 2, 1)
        self.proj = nn.Conv3d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(x))


class DCFormerStage(nn.Module):
    def __init__(self, in_channels: int, channels: int, depth: int, kernel_size: int, cfg: DCFormerConfig) -> None:
        super().__init__()
        self.downsample = Downsample(in_channels, channels)
        self.blocks = nn.Sequential(*(DCFormerBlock(channels, kernel_size, cfg.mlp_ratio, cfg.layer_scale_init,
                                                    cfg.backend) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The single layout change of the network (see the module docstring); a no-op after stage 1.
        x = self.downsample(x).contiguous(memory_format=torch.channels_last_3d)
        return self.blocks(x)


class DCFormer(Encoder3D):
    """DCFormer encoder: ``forward_intermediates`` returns the five stage maps (stem first)."""

    def __init__(self, config: DCFormerConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = self.resolve_config(config, DCFormerConfig, overrides)
        if len(cfg.depths) != 5 or len(cfg.dims) != 5 or len(cfg.kernel_sizes) != 4:
            raise ValueError(
                f"DCFormer expects 5 depths/dims entries (stem + 4 stages) and 4 kernel sizes; got "
                f"depths={cfg.depths}, dims={cfg.dims}, kernel_sizes={cfg.kernel_sizes}")
        if cfg.depths[0] != 1:
            # The official code would repeat the whole stem (each copy downsampling by stem_stride);
            # no released variant does, and silently building one stem would be a different model.
            raise ValueError(f"depths[0] (stem repeats) must be 1; got depths={cfg.depths}")
        self.config = cfg
        self.in_channels = cfg.in_channels
        c = cfg.dims
        stages = [Stem(cfg.in_channels, c[0], cfg.stem_kernel_size, cfg.stem_stride, cfg.stem_act, cfg.backend)]
        for i in range(4):
            stages.append(DCFormerStage(c[i], c[i + 1], cfg.depths[i + 1], cfg.kernel_sizes[i], cfg))
        self.stages = nn.ModuleList(stages)
        self.feature_info = [
            {"num_chs": ch, "reduction": (cfg.stem_stride * 2**i,) * 3, "module": f"stages.{i}"}
            for i, ch in enumerate(c)
        ]
        # The stem's strided unit pads k//2 and each stage's max-pool pads 1: every size rounds up.
        self.resampling = [[Resample(cfg.stem_kernel_size, cfg.stem_stride, cfg.stem_kernel_size // 2)]] + \
            [[Resample(3, 2, 1)]] * 4
        self.init_head(cfg.num_classes)

    def forward_official_tokens(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five stage outputs as the official code returns them: tokens (B, D'*H'*W', C)."""
        return [f.flatten(2).transpose(1, 2) for f in self.forward_intermediates(x)]


register_variants("dcformer", DCFormer, DCFORMER_VARIANTS)


# ------------------------------------------------------------------------------------------
# Official checkpoints
# ------------------------------------------------------------------------------------------
# The official forward permutes (B, C, D, H, W) -> (B, C, H, W, D) before every conv, so its
# branch c1 (kernel (k,1,1)) runs along the original H, c2 (1,k,1) along W and c3 (1,1,k) along D.
# Ours keep (D, H, W) with branches 0/1/2 along D/H/W: c1 -> 1, c2 -> 2, c3 -> 0, and each conv
# weight is re-laid onto our branch's kernel axis (a reshape of the singleton dims).
_OFFICIAL_BRANCH = {"c1": 1, "c2": 2, "c3": 0}
_ANCHOR = "s0.0.0.c1.0.weight"
_RULES = [
    (re.compile(r"^s0\.0\.(\d+)\.(c[123])\.0\.(weight|bias)$"), "stages.0.{0}.branches.{B}.{2}"),
    (re.compile(r"^s0\.0\.(\d+)\.(c[123])\.1\.(\w+)$"), "stages.0.{0}.norms.{B}.{2}"),
    (re.compile(r"^s([1-4])\.0\.proj\.weight$"), "stages.{0}.downsample.proj.weight"),
    (re.compile(r"^s([1-4])\.(\d+)\.dwconv\.(c[123])\.0\.(weight|bias)$"), "stages.{0}.blocks.{1}.dwconv.branches.{B}.{3}"),
    (re.compile(r"^s([1-4])\.(\d+)\.dwconv\.(c[123])\.1\.(\w+)$"), "stages.{0}.blocks.{1}.dwconv.norms.{B}.{3}"),
    (re.compile(r"^s([1-4])\.(\d+)\.mlp\.mlp\.0\.(weight|bias)$"), "stages.{0}.blocks.{1}.mlp.fc1.{2}"),
    (re.compile(r"^s([1-4])\.(\d+)\.mlp\.mlp\.3\.(weight|bias)$"), "stages.{0}.blocks.{1}.mlp.fc2.{2}"),
    (re.compile(r"^s([1-4])\.(\d+)\.scale$"), "stages.{0}.blocks.{1}.scale"),
]


def official_key_to_ours(key: str) -> str | None:
    """Map one official key (without prefix) to our parameter name; None if it has no match."""
    for pattern, template in _RULES:
        m = pattern.match(key)
        if m:
            groups = m.groups()
            branch = next((_OFFICIAL_BRANCH[g] for g in groups if g in _OFFICIAL_BRANCH), None)
            return template.format(*groups, B=branch)
    return None


def load_official_dcformer(state_dict: dict, variant: str, **overrides) -> DCFormer:
    """Our DCFormer-``variant`` holding the official weights, mapped strictly.

    Raises a KeyError listing missing and unexpected keys, or a ValueError on a shape mismatch.
    The result reproduces the official encoder: feed it (B, C, D, H, W) as is (no permutation) and
    use ``forward_official_tokens`` for the official (B, tokens, C) outputs.
    """
    if variant not in DCFORMER_VARIANTS:
        raise ValueError(f"unknown DCFormer variant {variant!r}; known: {', '.join(DCFORMER_VARIANTS)}")
    model = DCFormer(DCFORMER_VARIANTS[variant], **overrides)
    ours = model.state_dict()
    mapped, unexpected = {}, []
    for key, value in state_dict_under_anchor(state_dict, _ANCHOR, "DCFormer stem").items():
        name = official_key_to_ours(key)
        if name is None or name not in ours:
            unexpected.append(key)
            continue
        if value.numel() != ours[name].numel():
            raise ValueError(f"official {key} has shape {tuple(value.shape)}; {name} needs {tuple(ours[name].shape)}")
        mapped[name] = value.reshape(ours[name].shape)
    missing = sorted(set(ours) - set(mapped))
    if missing or unexpected:
        raise KeyError(f"official DCFormer-{variant} state dict does not match: missing {missing}; "
                       f"unexpected {sorted(unexpected)}")
    model.load_state_dict(mapped, strict=True)
    return model
