"""The report copy baseline: the most typical training report, copied for every volume."""
import pytest

from med3dvlm.eval.metrics import caption_scores
from med3dvlm.eval.runner import EvalUsageError, copy_baseline

POOL = ["No acute abnormality. The liver is normal.",
        "A 2 cm nodule in the right upper lobe. The liver is normal.",
        "The liver is normal. No acute abnormality in the chest.",
        "Cardiomegaly."]


def test_the_most_typical_report_is_chosen_and_scored_on_every_reference():
    references = ["The liver is normal.", "Cardiomegaly with a small effusion."]
    report, scores = copy_baseline(POOL, references)
    # the first and third share most words with each other and with the second; the fourth with none
    assert report in (POOL[0], POOL[2])
    assert scores == caption_scores([report] * 2, references)


def test_candidates_limit_the_pool_and_one_report_is_refused():
    assert copy_baseline(POOL, ["x"], candidates=2)[0] in POOL[:2]
    with pytest.raises(EvalUsageError, match="at least 2 training reports"):
        copy_baseline(POOL[:1], ["x"])
