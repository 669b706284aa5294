"""Projectors from an image encoder's stage tokens to a language model's embedding width.

MixerProjector, Med3DVLM's dual-stream MLP-Mixer (REFERENCE 5), reads top-down like its figure:

    low stream : second-to-last stage tokens (256 x 384) -> mixer (192 x H/2) -> mixer (128 x H)
    high stream: last stage tokens           ( 32 x 768) -> mixer ( 64 x H/2) -> mixer (128 x H)
    output     : the two streams concatenated along the tokens -> 256 x H
    mixer layer: LayerNorm -> token MLP (across tokens) -> LayerNorm -> channel MLP; each MLP is
                 Linear -> GELU -> Linear; no residuals (a token or width change allows none)

MLPProjector is the M3D-style baseline: average-pool one stage's map to a token grid, then a
two-layer MLP. Both take tokens (B, N, C) (a map's D', H', W' flattened in that order).
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoints import state_dict_under_anchor
from ..encoder import Encoder3D, as_triple

__all__ = ["MixerLayer", "MixerProjector", "MLPProjector", "build_projector", "load_official_projector"]


class ProjectionMlp(nn.Module):
    """Linear(in, out) -> GELU -> Linear(out, out) over the last axis."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, out_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(out_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MixerLayer(nn.Module):
    """(B, in_tokens, in_channels) -> (B, out_tokens, out_channels): token mixing, then channel mixing.

    Both LayerNorms normalise over the input channels (the token MLP keeps the width).
    """

    def __init__(self, in_tokens: int, out_tokens: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.token_norm = nn.LayerNorm(in_channels)
        self.token_mlp = ProjectionMlp(in_tokens, out_tokens)
        self.channel_norm = nn.LayerNorm(in_channels)
        self.channel_mlp = ProjectionMlp(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token_mlp(self.token_norm(x).transpose(1, 2)).transpose(1, 2)
        return self.channel_mlp(self.channel_norm(x))


def _positive_ints(value, name: str) -> tuple[int, ...]:
    out = tuple(value)
    if not out or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in out):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints; got {value!r}")
    return out


class MixerProjector(nn.Module):
    """Med3DVLM's dual-stream MLP-Mixer projector (47,221,248 parameters at the paper's sizes).

    Args:
        low_input_size: (tokens, channels) of the low stream's input (paper: stage 3, (256, 384)).
        high_input_size: (tokens, channels) of the high stream's input (paper: stage 4, (32, 768)).
        output_dim: the language model's hidden size H (paper: 3584, Qwen2.5-7B).
        low_token_sizes, high_token_sizes: each stream's token count after each mixer layer; both
            streams have the same number of layers (paper: (192, 128) and (64, 128)).
        channel_sizes: the width after each layer, shared by the streams; default H / 2^(n-1-i)
            for layer i of n, i.e. (H/2, H) for the paper's two layers.
    """

    def __init__(self, low_input_size: Sequence[int] = (256, 384), high_input_size: Sequence[int] = (32, 768),
                 output_dim: int = 3584, low_token_sizes: Sequence[int] = (192, 128),
                 high_token_sizes: Sequence[int] = (64, 128), channel_sizes: Sequence[int] | None = None) -> None:
        super().__init__()
        low_input_size = _positive_ints(low_input_size, "low_input_size")
        high_input_size = _positive_ints(high_input_size, "high_input_size")
        if len(low_input_size) != 2 or len(high_input_size) != 2:
            raise ValueError(f"low_input_size and high_input_size must be (tokens, channels); got "
                             f"{low_input_size} and {high_input_size}")
        low_token_sizes = _positive_ints(low_token_sizes, "low_token_sizes")
        high_token_sizes = _positive_ints(high_token_sizes, "high_token_sizes")
        depth = len(low_token_sizes)
        if len(high_token_sizes) != depth:
            raise ValueError(f"low_token_sizes and high_token_sizes must have one entry per layer, as many for "
                             f"both streams; got {low_token_sizes} and {high_token_sizes}")
        if channel_sizes is None:
            channel_sizes = tuple(output_dim // 2 ** (depth - 1 - i) for i in range(depth))
        channel_sizes = _positive_ints(channel_sizes, "channel_sizes")
        if len(channel_sizes) != depth or channel_sizes[-1] != output_dim:
            raise ValueError(f"channel_sizes must have {depth} entries (one per layer) ending in output_dim="
                             f"{output_dim}; got {channel_sizes}")
        self.low_input_size, self.high_input_size = low_input_size, high_input_size
        self.low_token_sizes, self.high_token_sizes = low_token_sizes, high_token_sizes
        self.channel_sizes = channel_sizes
        self.output_dim = output_dim
        self.low_stream = self._stream(low_input_size, low_token_sizes, channel_sizes)
        self.high_stream = self._stream(high_input_size, high_token_sizes, channel_sizes)
        self.num_tokens = low_token_sizes[-1] + high_token_sizes[-1]

    @staticmethod
    def _stream(input_size: tuple[int, int], token_sizes: tuple[int, ...], channel_sizes: tuple[int, ...]):
        tokens, channels = (input_size[0],) + token_sizes, (input_size[1],) + channel_sizes
        return nn.Sequential(*(MixerLayer(tokens[i], tokens[i + 1], channels[i], channels[i + 1])
                               for i in range(len(token_sizes))))

    def forward(self, low_tokens: torch.Tensor, high_tokens: torch.Tensor) -> torch.Tensor:
        """(B, N_low, C_low), (B, N_high, C_high) -> (B, num_tokens, output_dim)."""
        _check_tokens("low_tokens", low_tokens, self.low_input_size)
        _check_tokens("high_tokens", high_tokens, self.high_input_size)
        return torch.cat([self.low_stream(low_tokens), self.high_stream(high_tokens)], dim=1)


class MLPProjector(nn.Module):
    """M3D-style baseline: one stage's map average-pooled to ``pooled_grid`` (D', H', W'), then
    Linear(C, H) -> GELU -> Linear(H, H) on each pooled token.

    Args:
        in_channels: the stage's channels C.
        input_grid: the stage's map size (D, H, W) for the model's input volume.
        output_dim: the language model's hidden size.
        pooled_grid: the token grid after pooling (each axis must divide the map's); default: no
            pooling, one token per map voxel.
    """

    def __init__(self, in_channels: int, input_grid: Sequence[int], output_dim: int,
                 pooled_grid: Sequence[int] | None = None) -> None:
        super().__init__()
        self.input_grid = as_triple(tuple(input_grid), "input_grid", minimum=1)
        self.pooled_grid = self.input_grid if pooled_grid is None else \
            as_triple(tuple(pooled_grid), "pooled_grid", minimum=1)
        if any(n % p for n, p in zip(self.input_grid, self.pooled_grid)):
            raise ValueError(f"pooled_grid {self.pooled_grid} must divide the input grid {self.input_grid} "
                             f"along every axis (equal windows)")
        self.in_channels, self.output_dim = in_channels, output_dim
        self.num_tokens = math.prod(self.pooled_grid)
        self.mlp = ProjectionMlp(in_channels, output_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, D*H*W, C) -> (B, num_tokens, output_dim)."""
        _check_tokens("tokens", tokens, (math.prod(self.input_grid), self.in_channels))
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], self.in_channels, *self.input_grid)
        pooled = F.adaptive_avg_pool3d(grid, self.pooled_grid)
        return self.mlp(pooled.flatten(2).transpose(1, 2))


def _check_tokens(name: str, tokens: torch.Tensor, expected: Sequence[int]) -> None:
    if tokens.dim() != 3 or tuple(tokens.shape[1:]) != tuple(expected):
        raise ValueError(f"{name} must be (B, {expected[0]}, {expected[1]}) (tokens, channels); got "
                         f"{tuple(tokens.shape)}. Feed volumes of the size the model was built for")


PROJECTOR_TYPES = ("mixer", "mlp")


def build_projector(projector_type: str, encoder: Encoder3D, image_size: Sequence[int],
                    feature_layers: Sequence[int], output_dim: int, **options) -> nn.Module:
    """The projector for ``encoder`` on volumes of ``image_size``: token counts and widths come
    from the encoder's ``feature_info`` and ``feature_sizes``. ``feature_layers`` picks the stages
    (negative counts from the last): two for "mixer" (low, high), one for "mlp"."""
    if projector_type not in PROJECTOR_TYPES:
        raise ValueError(f"projector_type must be one of {PROJECTOR_TYPES}; got {projector_type!r}")
    needed = 2 if projector_type == "mixer" else 1
    layers = encoder.stage_indices(list(feature_layers))
    if len(layers) != needed:
        raise ValueError(f"the {projector_type!r} projector takes {needed} stage(s) (vision_feature_layers); got "
                         f"{list(feature_layers)}")
    sizes = encoder.feature_sizes(image_size)
    channels = [info["num_chs"] for info in encoder.feature_info]
    if projector_type == "mlp":
        return MLPProjector(channels[layers[0]], sizes[layers[0]], output_dim, **options)
    low, high = ((math.prod(sizes[i]), channels[i]) for i in layers)
    return MixerProjector(low, high, output_dim, **options)


# ------------------------------------------------------------------------------------------
# Official checkpoints
# ------------------------------------------------------------------------------------------
# Official names (reference/projector_official_state_dict_keys.json): {low,high}_mixer.{i}.ln1/ln2
# and .mlp1/.mlp2.mm_projector.{0, 1.1} (the second Linear sits after a GELU in a Sequential).
_OFFICIAL_PROJECTOR_ANCHOR = "low_mixer.0.ln1.weight"
_OFFICIAL_PROJECTOR_RULES = {
    "ln1": "token_norm", "ln2": "channel_norm",
    "mlp1.mm_projector.0": "token_mlp.fc1", "mlp1.mm_projector.1.1": "token_mlp.fc2",
    "mlp2.mm_projector.0": "channel_mlp.fc1", "mlp2.mm_projector.1.1": "channel_mlp.fc2",
}
_OFFICIAL_PROJECTOR_KEY = re.compile(r"^(low|high)_mixer\.(\d+)\.(.+)\.(weight|bias)$")


def official_projector_key(name: str) -> str:
    """Our MixerProjector parameter name -> the released code's key for it."""
    stream, layer, module, kind = re.match(r"^(low|high)_stream\.(\d+)\.(.+)\.(weight|bias)$", name).groups()
    official = next(k for k, v in _OFFICIAL_PROJECTOR_RULES.items() if v == module)
    return f"{stream}_mixer.{layer}.{official}.{kind}"


def load_official_projector(state_dict: dict) -> MixerProjector:
    """A MixerProjector holding the released weights, built from their shapes, mapped strictly.

    ``state_dict`` may be a full model checkpoint: the projector's entries are found by the prefix
    of its ``low_mixer.0.ln1.weight``. Raises a KeyError listing missing and unexpected keys.
    """
    official = state_dict_under_anchor(state_dict, _OFFICIAL_PROJECTOR_ANCHOR, "projector")

    def shape(key: str) -> tuple[int, ...]:
        if key not in official:
            raise KeyError(f"official projector state dict lacks {key!r}, needed to infer its sizes")
        return tuple(official[key].shape)

    depth = 1 + max(int(m.group(2)) for m in map(_OFFICIAL_PROJECTOR_KEY.match, official) if m)
    streams = {}
    for stream in ("low", "high"):
        first = f"{stream}_mixer.0"
        tokens = [shape(f"{stream}_mixer.{i}.mlp1.mm_projector.0.weight")[0] for i in range(depth)]
        widths = [shape(f"{stream}_mixer.{i}.mlp2.mm_projector.0.weight")[0] for i in range(depth)]
        streams[stream] = ((shape(f"{first}.mlp1.mm_projector.0.weight")[1], shape(f"{first}.ln1.weight")[0]),
                           tokens, widths)
    (low_in, low_tokens, widths), (high_in, high_tokens, _) = streams["low"], streams["high"]
    projector = MixerProjector(low_in, high_in, widths[-1], low_tokens, high_tokens, widths)

    names = {official_projector_key(name): name for name in projector.state_dict()}
    missing = sorted(set(names) - set(official))
    unexpected = sorted(set(official) - set(names))
    if missing or unexpected:
        raise KeyError(f"official projector state dict does not match: missing {missing}; unexpected {unexpected}")
    projector.load_state_dict({names[key]: value for key, value in official.items()}, strict=True)
    return projector
