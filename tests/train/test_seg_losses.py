"""The segmentation loss: soft Dice + cross-entropy (med3dvlm.losses)."""
import pytest
import torch
import torch.nn as nn

from med3dvlm.losses import DiceCELoss, dice_ce_loss


def test_dice_ce_loss_by_hand():
    logits = torch.tensor([[[2.0, 0.0, 1.0]], [[0.0, 1.0, 1.0]]]).unsqueeze(0)  # (1, 2, 1, 3)
    target = torch.tensor([[[0, 1, 1]]])
    p = logits.softmax(1)[0, :, 0]  # (2, 3)
    y = torch.tensor([[1.0, 0, 0], [0, 1, 1]])
    ce = -(p * y).sum(0).log().mean()
    dice = (2 * (p * y).sum(1) + 1e-5) / (p.sum(1) + y.sum(1) + 1e-5)
    torch.testing.assert_close(dice_ce_loss(logits, target), ce + 1 - dice.mean())
    torch.testing.assert_close(dice_ce_loss(logits, target, include_background=False), ce + 1 - dice[1])
    weighted = DiceCELoss(include_background=False, smooth=1e-5, dice_weight=0.3, ce_weight=2.0)
    torch.testing.assert_close(weighted(logits, target), 2.0 * ce + 0.3 * (1 - dice[1]))


def test_dice_ce_loss_is_near_zero_for_a_confident_right_answer():
    target = torch.randint(0, 3, (2, 5, 6, 7))
    logits = 30.0 * nn.functional.one_hot(target, 3).movedim(-1, 1).float()
    assert dice_ce_loss(logits, target) < 1e-4
    assert dice_ce_loss(-logits, target) > 1.5


def test_dice_ce_loss_names_bad_targets():
    with pytest.raises(ValueError, match=r"target must be integer class labels of shape \(2, 4, 4\)"):
        dice_ce_loss(torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target labels must lie in \[0, 2\]; got \[0, 3\]"):
        dice_ce_loss(torch.randn(1, 3, 2, 2), torch.tensor([[[0, 3], [1, 2]]]))
