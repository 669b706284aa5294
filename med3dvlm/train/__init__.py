"""Training: segmentation (``python -m med3dvlm.train.seg``) and its losses."""
from .losses import DiceCELoss, dice_ce_loss, dice_iou

__all__ = ["DiceCELoss", "dice_ce_loss", "dice_iou"]
