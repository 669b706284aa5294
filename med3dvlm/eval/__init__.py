"""Evaluation: segmentation metrics and image-text retrieval."""
from .metrics import dice_iou
from .retrieval import retrieval_recall

__all__ = ["dice_iou", "retrieval_recall"]
