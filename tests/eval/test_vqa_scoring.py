"""Closed-VQA rules on tricky answers and VQA scores per question type (med3dvlm.eval.vqa)."""
import pytest

from med3dvlm.eval import wordnet as wordnet_module
from med3dvlm.eval.metrics import TEXT_METRICS
from med3dvlm.eval.vqa import closed_choice, closed_correct_official, vqa_scores
from med3dvlm.eval.wordnet import WordNetUnavailable

CHOICES = ["liver", "kidney", "spleen", "liver cyst"]


@pytest.mark.parametrize("prediction, letter, official", [
    ("A. liver or B. kidney", "B", True),   # the loophole: both letters appear
    ("A. liver or B. kidney", "C", False),
    ("B. kidney", "B", True),
    ("B", "B", False),                      # no "B." in it
    ("(C) spleen", "C", False),
    ("The answer is D.", "D", True),
    ("a. liver", "A", False),               # case-sensitive
    ("Hepatitis B. is not an organ", "B", True),
])
def test_official_rule(prediction, letter, official):
    assert closed_correct_official(prediction, letter) is official


@pytest.mark.parametrize("prediction, choice", [
    ("A. liver or B. kidney", None),        # names two
    ("B", "B"),
    ("B.", "B"),
    ("B)", "B"),
    ("(C) spleen", "C"),
    ("The answer is D.", "D"),
    ("The answer is B because the organ is paired.", "B"),
    ("Answer: (c)", "C"),
    ("a. liver", "A"),
    ("b) kidney", "B"),
    ("c. the third option", "C"),           # by the letter alone, no choice text
    ("(C) the third option", "C"),
    ("spleen", "C"),                        # the choice text alone
    ("The Kidney.", "B"),
    ("liver cyst", "D"),                    # "liver" inside the longer choice does not count
    ("The liver and the kidney", None),     # two choice texts
    ("B. liver", None),                     # letter B, text of A
    ("pancreas", None),                     # names none
    ("", None),
])
def test_strict_rule(prediction, choice):
    assert closed_choice(prediction, CHOICES) == choice


def test_strict_rule_reads_a_small_a_in_prose_as_the_article():
    choices = ["kidney", "liver", "spleen", "pancreas"]
    assert closed_choice("a liver", choices) == "B"
    assert closed_choice("The answer is a liver lesion", choices) == "B"
    assert closed_choice("a. kidney", choices) == "A"


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="answer_choice must be one of A, B, C, D; got 'E'"):
        closed_correct_official("E.", "E")
    with pytest.raises(ValueError, match="choices must hold 4 texts"):
        closed_choice("A", ["liver", "kidney"])


def _record(question_type, closed, prediction, answer_choice="B", answer=None):
    answer = answer if answer is not None else (f"{answer_choice}. kidney" if closed else "kidney")
    return {"question_type": question_type, "closed": closed, "prediction": prediction, "answer": answer,
            "answer_choice": answer_choice, "choices": CHOICES}


def test_vqa_scores_per_type():
    records = [
        _record("organ", True, "B. kidney"),                 # right by both rules
        _record("organ", True, "A. liver or B. kidney"),     # right only by the official rule
        _record("plane", True, "kidney"),                    # right only by the strict rule
        _record("plane", True, "C. spleen"),                 # wrong by both
        _record("organ", False, "kidney"),
        _record("plane", False, "the left kidney", answer="left kidney"),
    ]
    scores = vqa_scores(records)
    closed = scores["closed"]
    assert (closed["count"], closed["official_correct"], closed["strict_correct"]) == (4, 2, 2)
    assert closed["official"] == 0.5 and closed["strict"] == 0.5 and closed["no_single_choice"] == 1
    assert list(closed["per_type"]) == ["organ", "plane"]  # order of first appearance
    organ, plane = closed["per_type"]["organ"], closed["per_type"]["plane"]
    assert (organ["count"], organ["official"], organ["strict"], organ["no_single_choice"]) == (2, 1.0, 0.5, 1)
    assert (plane["count"], plane["official"], plane["strict"], plane["no_single_choice"]) == (2, 0.0, 0.5, 0)

    open_ = scores["open"]
    assert open_["count"] == 2 and list(open_["per_type"]) == ["organ", "plane"]
    assert set(TEXT_METRICS) <= set(open_)
    assert open_["per_type"]["organ"]["rouge1"] == pytest.approx(1.0)
    # "the left kidney" against "left kidney": P = 2/3, R = 1, F = 0.8.
    assert open_["per_type"]["plane"]["rouge1"] == pytest.approx(0.8)
    assert open_["rouge1"] == pytest.approx((1.0 + 0.8) / 2)
    assert open_["per_type"]["plane"]["count"] == 1


def test_vqa_scores_parts_only_where_records_exist():
    assert set(vqa_scores([_record("organ", True, "B. kidney")])) == {"closed"}
    assert vqa_scores([]) == {}


def test_open_vqa_reports_meteor_missing_per_type(monkeypatch):
    def unavailable():
        raise WordNetUnavailable("no WordNet here")

    monkeypatch.setattr(wordnet_module, "load_wordnet", unavailable)
    open_ = vqa_scores([_record("organ", False, "kidney"), _record("plane", False, "liver")])["open"]
    for part in (open_, *open_["per_type"].values()):
        assert part["meteor"] is None and "no WordNet here" in part["missing"]["meteor"]
        assert part["bleu1"] is not None


def test_prior_answers_give_the_most_frequent_training_answer_per_question():
    from med3dvlm.eval.vqa import prior_answers

    train = [{"Question": "Which plane?", "Answer": "axial"}, {"Question": "Which plane?", "Answer": "axial"},
             {"Question": "Which plane?", "Answer": "coronal"}, {"Question": "Which organ?", "Answer": "liver"}]
    records = [
        {"question": "Which plane?", "closed": True, "choices": ["sagittal", "coronal", "axial", "oblique"]},
        {"question": "Which plane?", "closed": False, "choices": ["sagittal", "coronal", "axial", "oblique"]},
        # never seen: the most frequent answer over all of training ("axial", 2 of 4)
        {"question": "Which phase?", "closed": True, "choices": ["arterial", "axial", "liver", "delayed"]},
        # no choice was ever an answer to this question: ties go to the first choice
        {"question": "Which organ?", "closed": True, "choices": ["kidney", "spleen", "heart", "lung"]},
    ]
    assert prior_answers(train, records) == ["C. axial", "axial", "B. axial", "A. kidney"]
    with pytest.raises(ValueError, match="at least one training row"):
        prior_answers([], records)
