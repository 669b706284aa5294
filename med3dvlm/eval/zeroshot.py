"""Zero-shot multi-abnormality detection (the DCFormer paper's protocol on CT-RATE).

For each label X the dual encoder scores the volume against two prompts, "X is present." and
"X is not present."; a softmax over the pair gives p(present), thresholded at 0.5. Reported:

- per label: accuracy, precision, recall, F1 of the "present" class, weighted F1 (the F1 of both
  outcomes weighted by their support), and ROC AUC of p(present);
- overall: accuracy over all N x L decisions, support-weighted F1 (each label's F1 weighted by its
  positives), micro precision and recall (all decisions pooled), and the mean AUC over the labels
  that have both outcomes (AUC is undefined for a label with one; it is reported as None).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["zeroshot_prompts", "zeroshot_probabilities", "binary_auc", "detection_scores"]


def zeroshot_prompts(label: str) -> tuple[str, str]:
    """The prompt pair for ``label``: ("X is present.", "X is not present.")."""
    return f"{label} is present.", f"{label} is not present."


@torch.no_grad()
def zeroshot_probabilities(image_embeds: torch.Tensor, present_embeds: torch.Tensor,
                           absent_embeds: torch.Tensor, logit_scale: float = 1.0) -> torch.Tensor:
    """(N, L) p(present): softmax over the pair of each label's prompt similarities.

    ``image_embeds`` (N, d); ``present_embeds``/``absent_embeds`` (L, d), the two prompts' text
    embeddings per label. ``logit_scale`` multiplies the similarities before the softmax (a
    model's learned temperature; the bias cancels in a softmax over two).
    """
    if present_embeds.shape != absent_embeds.shape or present_embeds.dim() != 2:
        raise ValueError(f"present_embeds and absent_embeds must both be (L, d); got {tuple(present_embeds.shape)} "
                         f"and {tuple(absent_embeds.shape)}")
    if image_embeds.dim() != 2 or image_embeds.shape[1] != present_embeds.shape[1]:
        raise ValueError(f"image_embeds must be (N, {present_embeds.shape[1]}); got {tuple(image_embeds.shape)}")
    pair = torch.stack([image_embeds.double() @ present_embeds.double().T,
                        image_embeds.double() @ absent_embeds.double().T], dim=-1)  # (N, L, 2)
    return torch.softmax(pair * logit_scale, dim=-1)[..., 0]


def binary_auc(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """ROC AUC of ``scores`` for the 0/1 ``labels`` (Mann-Whitney, ties counted half); None when
    only one outcome occurs."""
    labels = labels.bool()
    positives, negatives = scores[labels].double(), scores[~labels].double()
    if positives.numel() == 0 or negatives.numel() == 0:
        return None
    greater = (positives[:, None] > negatives[None, :]).double().sum()
    ties = (positives[:, None] == negatives[None, :]).double().sum()
    return ((greater + 0.5 * ties) / (positives.numel() * negatives.numel())).item()


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def _f1(tp: float, fp: float, fn: float) -> float:
    return _ratio(2 * tp, 2 * tp + fp + fn)


def detection_scores(probabilities: torch.Tensor, labels: torch.Tensor, label_names: Sequence[str],
                     threshold: float = 0.5) -> dict:
    """Per-label and overall detection metrics (module docstring) of (N, L) ``probabilities``
    against (N, L) 0/1 ``labels``: ``{"per_label": {name: {...}}, "overall": {...}}``."""
    if probabilities.shape != labels.shape or probabilities.dim() != 2:
        raise ValueError(f"probabilities and labels must both be (N, L); got {tuple(probabilities.shape)} and "
                         f"{tuple(labels.shape)}")
    if len(label_names) != labels.shape[1]:
        raise ValueError(f"label_names has {len(label_names)} names for {labels.shape[1]} label columns")
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("labels must be 0 or 1")
    truth = labels.bool()
    predicted = probabilities >= threshold
    per_label, totals = {}, {"tp": 0.0, "fp": 0.0, "fn": 0.0, "tn": 0.0}
    weighted_f1, aucs = 0.0, []
    for j, name in enumerate(label_names):
        t, p = truth[:, j], predicted[:, j]
        tp, fp = float((t & p).sum()), float((~t & p).sum())
        fn, tn = float((t & ~p).sum()), float((~t & ~p).sum())
        for key, value in zip(("tp", "fp", "fn", "tn"), (tp, fp, fn, tn)):
            totals[key] += value
        f1_present, f1_absent = _f1(tp, fp, fn), _f1(tn, fn, fp)
        auc = binary_auc(probabilities[:, j], t)
        if auc is not None:
            aucs.append(auc)
        per_label[name] = {
            "accuracy": _ratio(tp + tn, len(t)), "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
            "f1": f1_present, "weighted_f1": _ratio(f1_present * (tp + fn) + f1_absent * (tn + fp), len(t)),
            "auc": auc, "positives": int(tp + fn), "count": len(t)}
        weighted_f1 += f1_present * (tp + fn)
    tp, fp, fn, tn = (totals[k] for k in ("tp", "fp", "fn", "tn"))
    overall = {"accuracy": _ratio(tp + tn, tp + fp + fn + tn), "weighted_f1": _ratio(weighted_f1, tp + fn),
               "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
               "auc": sum(aucs) / len(aucs) if aucs else None, "labels_with_auc": len(aucs),
               "positive_rate": _ratio(tp + fn, tp + fp + fn + tn)}
    return {"per_label": per_label, "overall": overall}
