"""Evaluation: segmentation metrics, image-text retrieval, text metrics and VQA scoring."""
from .metrics import caption_scores, caption_scores_per_sample, dice_iou
from .retrieval import retrieval_recall
from .vqa import closed_choice, closed_correct_official, vqa_scores

# med3dvlm.eval.wordnet is not imported here: it runs as ``python -m med3dvlm.eval.wordnet``.
__all__ = ["caption_scores", "caption_scores_per_sample", "closed_choice", "closed_correct_official",
           "dice_iou", "retrieval_recall", "vqa_scores"]
