"""What the model suite measures: which encoders, at which sizes, and the paper's figures to meet."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from med3dvlm.models import create_model, list_models


@dataclass(frozen=True)
class Encoder:
    """A registry encoder plus the config overrides it is benchmarked with."""

    name: str
    overrides: tuple[tuple[str, object], ...] = ()

    @property
    def label(self) -> str:
        """The ``model`` column: the registry name, with overrides in brackets."""
        if not self.overrides:
            return self.name
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in self.overrides)})"

    @property
    def family(self) -> str:
        return self.name.split("_")[0]

    @property
    def is_dcformer(self) -> bool:
        return self.family == "dcformer"

    def build(self, **extra) -> nn.Module:
        return create_model(self.name, **dict(self.overrides), **extra)

    def available(self) -> bool:
        return self.name in list_models()


# The DCFormer paper's ViT baselines passed 4 as the MLP hidden width (docs/baselines.md).
PAPER_VIT = (("mlp_hidden", 4),)

# Timed encoders, in priority order: under a time budget the head of the list runs first
# (DCFormer-small is Med3DVLM's encoder; then one of each baseline family at a comparable size).
SUITE = [
    Encoder("dcformer_small"),
    Encoder("vit3d_tiny", PAPER_VIT),
    Encoder("convnext3d_tiny"),
    Encoder("poolformer3d_tiny"),
    Encoder("dcformer_tiny"),
    Encoder("dcformer_nano"),
    Encoder("dcformer_naive"),
    Encoder("vit3d_naive", PAPER_VIT),
    Encoder("convnext3d_nano"),
    Encoder("poolformer3d_nano"),
    Encoder("convnext3d_naive"),
    Encoder("poolformer3d_naive"),
    Encoder("dcformer_base"),
]

# Inputs (B, C, D, H, W). CPU: small enough for a few minutes on two cores. GPU: Med3DVLM's input.
CPU_INPUT = (2, 1, 64, 64, 64)
GPU_INPUT = (2, 1, 128, 256, 256)
CPU_EXCLUDED = ("dcformer_base",)  # 34M parameters: its AdamW step alone dominates a CPU run

# The DCFormer paper's input: 512x512x256 (H x W x D), i.e. (D, H, W) = (256, 512, 512) here.
PAPER_INPUT = (1, 1, 256, 512, 512)
PROJECTION_DIM = 512


@dataclass(frozen=True)
class PaperEntry:
    """One row of the DCFormer paper's table, as printed: params in millions, fvcore GFLOPs (G multiply-adds)."""

    encoder: Encoder
    params_m: str
    gflops: str
    projection_head: bool  # the paper's figure counts a Linear(c_last, 512) head on the pooled map
    note: str = ""


_SAME_SIZE = "config sized to the paper's parameter count only; its compute differs (docs/baselines.md)"
PAPER_TABLE = [
    PaperEntry(Encoder("dcformer_nano"), "0.92", "34.21", True),
    PaperEntry(Encoder("dcformer_naive"), "5.85", "49.48", False),
    PaperEntry(Encoder("dcformer_tiny"), "15.1", "168.2", True),
    PaperEntry(Encoder("vit3d_naive", PAPER_VIT), "11.10", "39.05", False),
    PaperEntry(Encoder("vit3d_tiny", PAPER_VIT), "26.34", "86.43", False),
    PaperEntry(Encoder("convnext3d_nano"), "3.19", "31.92", False, _SAME_SIZE),
    PaperEntry(Encoder("convnext3d_naive"), "15.63", "96.84", False, _SAME_SIZE),
    PaperEntry(Encoder("convnext3d_tiny"), "31.59", "156.31", False, _SAME_SIZE),
    PaperEntry(Encoder("poolformer3d_nano"), "2.79", "27.14", False, _SAME_SIZE),
    PaperEntry(Encoder("poolformer3d_naive"), "11.31", "63.75", False, _SAME_SIZE),
    PaperEntry(Encoder("poolformer3d_tiny"), "20.68", "117.46", False, _SAME_SIZE),
]

# FlopCounterMode totals of the official encoder (eval mode, input (1, 1, D, H, W)), REFERENCE.md §2.
REFERENCE_FLOP_COUNTER = {
    ("dcformer_nano", (1, 1, 256, 512, 512)): 64_217_022_464,
    ("dcformer_naive", (1, 1, 256, 512, 512)): 94_263_312_384,
    ("dcformer_tiny", (1, 1, 256, 512, 512)): 327_117_176_832,
    ("dcformer_small", (1, 1, 256, 512, 512)): 341_740_093_440,
    ("dcformer_small", (1, 1, 128, 256, 256)): 42_717_511_680,
}
