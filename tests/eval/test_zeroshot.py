"""Zero-shot detection: the prompt-pair softmax and the metrics, on hand-worked numbers."""
import math

import pytest
import torch

from med3dvlm.eval.zeroshot import binary_auc, detection_scores, zeroshot_probabilities, zeroshot_prompts


def test_prompts_follow_the_paper():
    assert zeroshot_prompts("Lung nodule") == ("Lung nodule is present.", "Lung nodule is not present.")


def test_probability_is_the_softmax_over_the_pair():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    present = torch.tensor([[1.0, 0.0]])  # label 0: "present" points along x
    absent = torch.tensor([[0.0, 1.0]])
    p = zeroshot_probabilities(image, present, absent, logit_scale=2.0)
    # image 0: similarities (1, 0) -> softmax(2, 0)[0]; image 1: (0, 1) -> softmax(0, 2)[0]
    assert p.shape == (2, 1)
    assert p[0, 0].item() == pytest.approx(1 / (1 + math.exp(-2)))
    assert p[1, 0].item() == pytest.approx(1 / (1 + math.exp(2)))


def test_probabilities_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="present_embeds and absent_embeds"):
        zeroshot_probabilities(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"image_embeds must be \(N, 3\)"):
        zeroshot_probabilities(torch.zeros(2, 4), torch.zeros(1, 3), torch.zeros(1, 3))


def test_auc_counts_ties_half_and_needs_both_outcomes():
    # positives 0.9, 0.5; negatives 0.5, 0.1: pairs (0.9>0.5), (0.9>0.1), (0.5=0.5 half), (0.5>0.1) -> 3.5/4
    scores = torch.tensor([0.9, 0.5, 0.5, 0.1])
    labels = torch.tensor([1, 1, 0, 0])
    assert binary_auc(scores, labels) == pytest.approx(3.5 / 4)
    assert binary_auc(-scores, labels) == pytest.approx(0.5 / 4)
    assert binary_auc(scores, torch.ones(4)) is None


def test_detection_scores_by_hand():
    # label a: truth 1 1 0 0, predicted (p >= 0.5) 1 0 1 0 -> tp 1 fp 1 fn 1 tn 1
    # label b: truth 1 0 0 0, predicted 1 0 0 0       -> tp 1 fp 0 fn 0 tn 3
    p = torch.tensor([[0.9, 0.8], [0.2, 0.1], [0.6, 0.3], [0.4, 0.2]])
    y = torch.tensor([[1, 1], [1, 0], [0, 0], [0, 0]])
    scores = detection_scores(p, y, ["a", "b"])
    a, b, overall = scores["per_label"]["a"], scores["per_label"]["b"], scores["overall"]
    assert (a["accuracy"], a["precision"], a["recall"], a["f1"]) == (0.5, 0.5, 0.5, 0.5)
    assert a["weighted_f1"] == pytest.approx(0.5)  # both outcomes' F1 are 0.5
    assert a["auc"] == pytest.approx(0.5)  # positives 0.9, 0.2 vs negatives 0.6, 0.4: 0.9 wins 2 of 4 pairs
    assert (b["accuracy"], b["precision"], b["recall"], b["f1"], b["auc"]) == (1.0, 1.0, 1.0, 1.0, 1.0)
    # pooled: tp 2, fp 1, fn 1, tn 4
    assert overall["accuracy"] == pytest.approx(6 / 8)
    assert overall["precision"] == pytest.approx(2 / 3)
    assert overall["recall"] == pytest.approx(2 / 3)
    # F1 weighted by positives: a has 2, b has 1 -> (0.5 * 2 + 1.0 * 1) / 3
    assert overall["weighted_f1"] == pytest.approx(2 / 3)
    assert overall["auc"] == pytest.approx((0.5 + 1.0) / 2)
    assert overall["labels_with_auc"] == 2


def test_detection_scores_refuse_bad_input():
    with pytest.raises(ValueError, match="both be"):
        detection_scores(torch.zeros(3, 2), torch.zeros(3, 3), ["a", "b"])
    with pytest.raises(ValueError, match="label_names has 1 names"):
        detection_scores(torch.zeros(3, 2), torch.zeros(3, 2), ["a"])
    with pytest.raises(ValueError, match="0 or 1"):
        detection_scores(torch.zeros(3, 2), torch.full((3, 2), 2.0), ["a", "b"])
