"""VQA scoring: closed questions by the official and by a strict rule, open ones by text metrics.

The official scripts count a closed answer right when the string "<letter>." appears anywhere in
it (REFERENCE 5), so "A. liver or B. kidney" is right whichever of the two is the key. The strict
rule parses which one choice the answer gives and compares that with the key.

``prior_answers`` is the image-blind baseline: for each question, the answer most often right for
the same question text in training. A model that beats chance but not this baseline has learned
the answer distribution, not to read the image.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Iterable, Sequence

from .metrics import caption_scores_per_sample, macro_average

__all__ = ["closed_choice", "closed_correct_official", "prior_answers", "vqa_scores"]

LETTERS = "ABCD"
# A choice letter given as such: "B.", "B)", "(B)", "B:" anywhere, followed by a space or the end.
_LETTER_MARK = re.compile(r"(?<!\w)\(?([A-D])[.):](?=\s|$)")
# The same in lower case only at the very start, where it cannot be the article "a" in a sentence.
_LEADING_LOWER_MARK = re.compile(r"^\(?([a-d])[.):](?=\s|$)")
# "The answer is B because", "Answer: (c)": a capital letter as a word, or a small one followed by
# punctuation or the end ("the answer is a liver lesion" is prose).
_ANSWER_IS = re.compile(r"(?i:\banswer(?:\s+is|\s*:))\s*\(?([A-D](?!\w)|[a-d](?=[.,;:!)]|\s*$))")
# The whole answer is one letter: "B", "b", "(B)", "B!".
_LETTER_ONLY = re.compile(r"^\(?([A-Da-d])\)?[.!]?$")


def closed_correct_official(prediction: str, letter: str) -> bool:
    """The official rule: the answer contains "<letter>." (case-sensitive, anywhere)."""
    return f"{_check_letter(letter)}." in prediction


def closed_choice(prediction: str, choices: Sequence[str]) -> str | None:
    """The letter of the one choice ``prediction`` gives, or None when it names none or several.

    A choice is named by its letter ("B", "B.", "(B)", "B)", "b." at the start, "The answer is B")
    or by its text (case-insensitive, whole words; a choice whose text shows up only inside a
    longer named choice's text, "liver" in "liver cyst", does not count). "A. liver or B. kidney"
    names two; so does "B. liver" when "liver" is choice A's text. A capital A-D followed by ".",
    ")" or ":" is a letter anywhere, so "vitamin D." names D.
    """
    if len(choices) != len(LETTERS):
        raise ValueError(f"choices must hold {len(LETTERS)} texts (A-D); got {len(choices)}")
    text = prediction.strip()
    named = {match.upper() for pattern in (_LETTER_MARK, _LEADING_LOWER_MARK, _ANSWER_IS, _LETTER_ONLY)
             for match in pattern.findall(text)}
    named |= _choices_by_text(text, choices)
    return named.pop() if len(named) == 1 else None


def _choices_by_text(text: str, choices: Sequence[str]) -> set[str]:
    spans = {letter: [m.span() for m in re.finditer(rf"(?<!\w){re.escape(choice.strip())}(?!\w)",
                                                     text, re.IGNORECASE)]
             for letter, choice in zip(LETTERS, choices) if choice.strip()}

    def inside_another(letter: str, span: tuple[int, int]) -> bool:
        first, last = span
        return any(other != letter and start <= first and last <= end and end - start > last - first
                   for other, other_spans in spans.items() for start, end in other_spans)

    return {letter for letter, found in spans.items()
            if any(not inside_another(letter, span) for span in found)}


def vqa_scores(records: Iterable[dict]) -> dict:
    """Closed and open VQA scores, overall and per question type.

    Each record has ``question_type``, ``closed`` (bool), ``prediction``, ``answer`` (the target
    text), ``answer_choice`` (the key's letter) and ``choices`` (the four texts). Returns
    ``{"closed": {...}, "open": {...}}`` with a part only where such records exist. Closed:
    ``count``, ``official`` and ``strict`` (accuracies), ``official_correct``, ``strict_correct``
    and ``no_single_choice`` (answers naming no one choice), and ``per_type`` with the same per
    question type. Open: ``count`` and ``caption_scores``' keys (the prediction against
    ``answer``), and ``per_type`` likewise. Question types keep their order of first appearance.
    """
    records = list(records)
    closed = [record for record in records if record["closed"]]
    open_ = [record for record in records if not record["closed"]]
    return {**({"closed": _closed_scores(closed)} if closed else {}),
            **({"open": _open_scores(open_)} if open_ else {})}


def _closed_scores(records: list[dict]) -> dict:
    official = [closed_correct_official(r["prediction"], r["answer_choice"]) for r in records]
    choices = [closed_choice(r["prediction"], r["choices"]) for r in records]
    strict = [choice == _check_letter(r["answer_choice"]) for choice, r in zip(choices, records)]

    def part(rows: list[int]) -> dict:
        right_official, right_strict = sum(official[i] for i in rows), sum(strict[i] for i in rows)
        return {"count": len(rows), "official": right_official / len(rows),
                "strict": right_strict / len(rows), "official_correct": right_official,
                "strict_correct": right_strict,
                "no_single_choice": sum(choices[i] is None for i in rows)}

    return _overall_and_per_type(records, part)


def _open_scores(records: list[dict]) -> dict:
    per_sample = caption_scores_per_sample([r["prediction"] for r in records],
                                           [r["answer"] for r in records])

    def part(rows: list[int]) -> dict:
        return {"count": len(rows), **macro_average(
            {metric: [values[i] for i in rows] for metric, values in per_sample.items()})}

    return _overall_and_per_type(records, part)


def _overall_and_per_type(records: list[dict], part: Callable[[list[int]], dict]) -> dict:
    """``part`` of all records, and under ``per_type`` of each question type's records."""
    rows_of_type: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        rows_of_type.setdefault(str(record["question_type"]), []).append(index)
    return {**part(list(range(len(records)))),
            "per_type": {name: part(rows) for name, rows in rows_of_type.items()}}


def _check_letter(letter: str) -> str:
    if not isinstance(letter, str) or letter.strip() not in tuple(LETTERS):
        raise ValueError(f"answer_choice must be one of A, B, C, D; got {letter!r}")
    return letter.strip()


def prior_answers(train_rows: Iterable[dict], records: Sequence[dict]) -> list[str]:
    """The image-blind answer to each record (the fields ``vqa_scores`` reads), from ``train_rows``
    (M3D-VQA rows: ``Question``, ``Answer``): the answer given most often in training to the same
    question text (over all training answers when the text is new). A closed question gets
    ``"<letter>. <choice>"`` for the choice given most often (ties: the first in choice order), an
    open one that answer's text."""
    by_question: dict[str, Counter] = {}
    overall: Counter = Counter()
    for row in train_rows:
        by_question.setdefault(row["Question"], Counter())[row["Answer"]] += 1
        overall[row["Answer"]] += 1
    if not overall:
        raise ValueError("prior_answers needs at least one training row")
    answers = []
    for record in records:
        counts = by_question.get(record["question"], overall)
        if record["closed"]:
            best = max(range(len(record["choices"])), key=lambda i: (counts[record["choices"][i]], -i))
            answers.append(f"{LETTERS[best]}. {record['choices'][best]}")
        else:
            answers.append(counts.most_common(1)[0][0])
    return answers

