"""Segmentation metrics: hard Dice and IoU of label maps, 2D and 3D.

Dice of two masks A, B is 2|A∩B| / (|A| + |B|); IoU is |A∩B| / |A∪B|.
"""
from __future__ import annotations

import torch

from ..losses import check_labels

__all__ = ["dice_iou"]


@torch.no_grad()
def dice_iou(prediction: torch.Tensor, target: torch.Tensor, num_classes: int,
             include_background: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard Dice and IoU per sample and class, each (B, K') with K' = K - 1 without background.

    ``prediction`` and ``target`` are label maps (B, *spatial). A class absent from both scores 1.
    """
    check_labels("target", target, tuple(target.shape), num_classes)
    check_labels("prediction", prediction, tuple(target.shape), num_classes)
    first = 0 if include_background else 1
    classes = torch.arange(first, num_classes, device=target.device)
    pred = prediction.flatten(1).unsqueeze(1) == classes[:, None]  # (B, K', voxels)
    true = target.flatten(1).unsqueeze(1) == classes[:, None]
    intersection = (pred & true).sum(-1).double()
    pred_size, true_size = pred.sum(-1).double(), true.sum(-1).double()
    union = pred_size + true_size - intersection
    empty = union == 0
    dice = torch.where(empty, 1.0, 2 * intersection / (pred_size + true_size).clamp_min(1))
    iou = torch.where(empty, 1.0, intersection / union.clamp_min(1))
    return dice.float(), iou.float()
