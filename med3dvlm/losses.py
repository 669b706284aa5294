"""Losses: segmentation (soft Dice + cross-entropy, 2D and 3D) and, re-exported from
``dcformer_kernels``, the fused SigLIP loss the dual encoder trains with.

Dice of two masks A, B is 2|A∩B| / (|A| + |B|); the loss uses its soft form on softmax
probabilities (the hard form on label maps is ``med3dvlm.eval.metrics.dice_iou``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dcformer_kernels import SigLIPLoss, siglip_loss

__all__ = ["dice_ce_loss", "DiceCELoss", "SigLIPLoss", "siglip_loss", "check_labels"]


def check_labels(name: str, labels: torch.Tensor, shape: tuple, num_classes: int) -> None:
    """A ValueError naming ``name`` unless ``labels`` are integer classes in [0, num_classes) of ``shape``."""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or tuple(labels.shape) != shape:
        raise ValueError(f"{name} must be integer class labels of shape {shape}; "
                         f"got {labels.dtype} of shape {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{name} labels must lie in [0, {num_classes - 1}]; "
                         f"got [{int(labels.min())}, {int(labels.max())}]")


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, include_background: bool = True,
                 smooth: float = 1e-5, dice_weight: float = 1.0, ce_weight: float = 1.0) -> torch.Tensor:
    """``ce_weight`` · cross-entropy + ``dice_weight`` · (1 - soft Dice).

    ``logits`` (B, K, *spatial), ``target`` (B, *spatial) integer labels in [0, K). Dice is taken
    per sample and class, ``(2·Σ p·y + smooth) / (Σ p + Σ y + smooth)``, then averaged (over
    classes 1..K-1 only when ``include_background`` is False), as MONAI's DiceCELoss does with
    ``softmax=True, to_onehot_y=True``.
    """
    if logits.dim() < 3:
        raise ValueError(f"logits must have shape (B, K, *spatial); got {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    check_labels("target", target, (logits.shape[0], *logits.shape[2:]), num_classes)
    ce = F.cross_entropy(logits, target)
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(target, num_classes).movedim(-1, 1).to(probs.dtype)
    dims = tuple(range(2, logits.dim()))
    dice = (2 * (probs * onehot).sum(dims) + smooth) / (probs.sum(dims) + onehot.sum(dims) + smooth)
    if not include_background:
        dice = dice[:, 1:]
    return ce_weight * ce + dice_weight * (1 - dice.mean())


class DiceCELoss(nn.Module):
    """Module form of ``dice_ce_loss``."""

    def __init__(self, include_background: bool = True, smooth: float = 1e-5,
                 dice_weight: float = 1.0, ce_weight: float = 1.0) -> None:
        super().__init__()
        self.include_background, self.smooth = include_background, smooth
        self.dice_weight, self.ce_weight = dice_weight, ce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice_ce_loss(logits, target, self.include_background, self.smooth,
                            self.dice_weight, self.ce_weight)
