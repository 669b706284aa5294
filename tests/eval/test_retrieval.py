"""Retrieval recall on embeddings built so that every pair's rank is known."""
import pytest
import torch

from med3dvlm.eval.retrieval import retrieval_recall

# scores[i, j] = <image i, text j>: images are the unit vectors, so text j's embedding is column j.
SCORES = torch.tensor([[0.9, 0.1, 0.2, 0.3],   # image 0: own text first                    -> rank 1
                       [0.8, 0.5, 0.9, 0.1],   # image 1: 0.8 and 0.9 above its 0.5          -> rank 3
                       [0.1, 0.2, 0.3, 0.3],   # image 2: tied with text 3, ties count against -> rank 2
                       [0.4, 0.9, 0.8, 0.7]])  # image 3: 0.9 and 0.8 above its 0.7          -> rank 3
# texts (columns): 0 -> rank 1; 1 (0.5 under 0.9) -> 2; 2 (0.3 under 0.9, 0.8) -> 3; 3 (0.7, top) -> 1


def test_recall_at_k_from_known_ranks():
    recall = retrieval_recall(torch.eye(4), SCORES.T.contiguous(), ks=(1, 2, 3))
    assert recall == pytest.approx({"i2t_r1": 1 / 4, "i2t_r2": 2 / 4, "i2t_r3": 4 / 4,
                                    "t2i_r1": 2 / 4, "t2i_r2": 3 / 4, "t2i_r3": 4 / 4})


def test_a_collapsed_embedding_scores_nothing_below_n():
    constant = torch.ones(5, 3)
    recall = retrieval_recall(constant, constant, ks=(1, 4, 5))
    assert recall["i2t_r1"] == recall["t2i_r4"] == 0.0 and recall["i2t_r5"] == 1.0


def test_refuses_bad_shapes_and_ks():
    with pytest.raises(ValueError, match="one shape"):
        retrieval_recall(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="positive ints"):
        retrieval_recall(torch.zeros(3, 2), torch.zeros(3, 2), ks=(0,))
