"""Evaluation metrics: hard Dice and IoU of label maps; BLEU, ROUGE and METEOR of generated text.

Dice of two masks A, B is 2|A∩B| / (|A| + |B|); IoU is |A∩B| / |A∪B|.

The text metrics follow the official Med3DVLM scripts (REFERENCE 5), which score each generated
report or answer against its reference with HF ``evaluate`` and macro-average the per-sample
scores. ``evaluate`` fetches its metric code and NLTK data at run time, so the packages underneath
are called directly here (``sacrebleu``, ``rouge-score``, ``nltk``; the ``eval`` extra), and
WordNet comes from Debian's files (``med3dvlm.eval.wordnet``).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch

from ..losses import check_labels

__all__ = ["TEXT_METRICS", "caption_scores", "caption_scores_per_sample", "dice_iou",
           "macro_average", "meteor_tokens", "meteor_unavailable"]

TEXT_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rougeL", "meteor")
# NLTK's (and HF evaluate's) METEOR parameters: F-mean weight, fragmentation shape and weight.
METEOR_ALPHA, METEOR_BETA, METEOR_GAMMA = 0.9, 3.0, 0.5


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


def caption_scores(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """BLEU-1..4, ROUGE-1, ROUGE-L and METEOR of each prediction against its reference,
    macro-averaged: keys ``bleu1``..``bleu4``, ``rouge1``, ``rougeL``, ``meteor`` (floats in [0, 1])
    and ``missing`` ({metric: why it was not computed}, empty when all were).

    Without WordNet, ``meteor`` is None and ``missing["meteor"]`` says how to install it: a METEOR
    without its synonym stage would be a different metric, so none is reported. Per-sample scores
    and the tokenizer of each metric: ``caption_scores_per_sample``.
    """
    return macro_average(caption_scores_per_sample(predictions, references))


def caption_scores_per_sample(predictions: Sequence[str],
                              references: Sequence[str]) -> dict[str, list[float | None]]:
    """Each metric of ``TEXT_METRICS`` for each (prediction, reference) pair, in [0, 1].

    - ``bleu1``..``bleu4``: sacrebleu's BLEU of the pair with maximum n-gram order 1..4, the "13a"
      tokenizer (mteval-v13a: punctuation split off, case kept) and the brevity penalty, without
      smoothing: HF ``evaluate``'s ``bleu`` (the official scripts' BLEU-1 is its ``max_order=1``)
      is unsmoothed, so these equal what it gives for one pair. The price: BLEU-n is 0 for any pair
      without a matching n-gram, which for short answers makes BLEU-3 and BLEU-4 mostly 0.
    - ``rouge1``, ``rougeL``: rouge-score's F-measure, no stemming, with its own tokenizer
      (lower-cased; anything but ASCII letters and digits separates tokens and is dropped).
    - ``meteor``: NLTK's ``single_meteor_score`` (exact, Porter-stem, then WordNet-synonym matches;
      NLTK looks synonyms up on the stems, so e.g. "large" never matches "big"), alpha 0.9,
      beta 3, gamma 0.5, both texts lower-cased. Tokens: the official ``word_tokenize`` splits
      sentences with Punkt's English model (downloaded data) and then applies NLTK's Treebank-style
      ``NLTKWordTokenizer``; here Punkt runs with untrained parameters (no data needed), which also
      ends a sentence after abbreviations such as "Dr." or "e.g." (splitting off their period).
      None for every pair when WordNet is unavailable (see ``caption_scores``).

    An empty or blank prediction (or reference) scores 0 on every metric.
    """
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"predictions and references must pair up one to one; got "
                         f"{len(predictions)} predictions and {len(references)} references")
    for name, texts in (("predictions", predictions), ("references", references)):
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{name}[{index}] must be a str; got {type(text).__name__}")
    pairs = list(zip(predictions, references))
    scores = {f"bleu{order}": [_bleu(p, r, order) for p, r in pairs] for order in range(1, 5)}
    rouge = [_rouge_scorer().score(r, p) for p, r in pairs]
    scores["rouge1"] = [score["rouge1"].fmeasure for score in rouge]
    scores["rougeL"] = [score["rougeL"].fmeasure for score in rouge]
    scores["meteor"] = [None] * len(pairs) if meteor_unavailable() else [_meteor(p, r) for p, r in pairs]
    return scores


def macro_average(per_sample: dict[str, list[float | None]]) -> dict:
    """The mean of each metric of ``caption_scores_per_sample``'s result (or of a selection of its
    samples, e.g. one question type), as ``caption_scores`` returns it."""
    lengths = {metric: len(values) for metric, values in per_sample.items()}
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise ValueError(f"per_sample must hold one non-empty list per metric, all of one length; "
                         f"got lengths {lengths}")
    means = {metric: None if None in values else math.fsum(values) / len(values)
             for metric, values in per_sample.items()}
    # METEOR is the only metric that can go uncomputed (no WordNet).
    missing = {"meteor": meteor_unavailable() or "WordNet was unavailable when these were scored"}
    return {**means, "missing": missing if means.get("meteor", 0.0) is None else {}}


def meteor_unavailable() -> str | None:
    """Why METEOR cannot be computed here (no WordNet), or None when it can."""
    # Imported here, as are the text packages, so that ``python -m med3dvlm.eval.wordnet`` does not
    # find its module already imported by this package.
    from .wordnet import WordNetUnavailable, load_wordnet

    try:
        load_wordnet()
    except WordNetUnavailable as error:
        return f"no WordNet for its synonym matches. {error}"
    return None


@functools.lru_cache(maxsize=None)
def _bleu_metric(order: int):
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize="13a", max_ngram_order=order, smooth_method="none", effective_order=False)


def _bleu(prediction: str, reference: str, order: int) -> float:
    # corpus_score of one pair: the same statistics as sentence_score, without the advice it logs
    # on every call to turn on effective_order, which is off on purpose (see above).
    return _bleu_metric(order).corpus_score([prediction], [[reference]]).score / 100


@functools.lru_cache(maxsize=None)
def _rouge_scorer():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rouge1", "rougeL"], use_stemmer=False)


@functools.lru_cache(maxsize=None)
def _meteor_tokenizers():
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    return PunktSentenceTokenizer(), NLTKWordTokenizer()


def meteor_tokens(text: str) -> list[str]:
    """``word_tokenize`` without downloaded data: untrained Punkt sentences, then Treebank words."""
    sentences, words = _meteor_tokenizers()
    return [token for sentence in sentences.tokenize(text) for token in words.tokenize(sentence)]


def _meteor(prediction: str, reference: str) -> float:
    from nltk.translate.meteor_score import single_meteor_score

    from .wordnet import load_wordnet

    # NLTK returns 0 when nothing matches, an empty prediction included.
    return single_meteor_score(meteor_tokens(reference), meteor_tokens(prediction),
                               wordnet=load_wordnet(), alpha=METEOR_ALPHA, beta=METEOR_BETA,
                               gamma=METEOR_GAMMA)
