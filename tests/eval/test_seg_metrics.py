"""Hard Dice and IoU of label maps (med3dvlm.eval.metrics)."""
import torch

from med3dvlm.eval.metrics import dice_iou


def test_dice_iou_by_hand():
    target = torch.tensor([[[1, 1, 0, 0], [2, 2, 2, 0]]])
    pred = torch.tensor([[[1, 0, 0, 0], [2, 2, 0, 0]]])
    dice, iou = dice_iou(pred, target, 3)
    torch.testing.assert_close(dice, torch.tensor([[2 * 1 / 3, 2 * 2 / 5]]))
    torch.testing.assert_close(iou, torch.tensor([[1 / 2, 2 / 3]]))
    dice, _ = dice_iou(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long), 2)
    assert dice.item() == 1.0  # absent from both
