"""The LLaVA-Med VQA protocol, computed the way its evaluator computes it, so numbers compare with the
published ones.

Answers and references are lower-cased and normalised as in the VQA-v2 evaluation that LLaVA-Med reuses
(punctuation, periods, number words, articles, commas). A closed question is a hit when the prediction
contains "yes" or "no" anywhere and contains the reference as a substring (so "no" inside "not" or
"nodule" counts: the evaluator's quirk, kept on purpose; `strict=True` instead compares the first
yes/no word). Open questions get token precision, recall and F1 with counts; the papers' "open"
column is the mean recall.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

from ..data.benchmarks import VQARecord

PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the evaluator's pattern, look-behind typo and all
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation and sentence periods, map number words to digits, drop articles
    and commas."""
    text = text.lower()
    out = text
    for mark in PUNCTUATION:
        if f"{mark} " in text or f" {mark}" in text or COMMA_STRIP.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    out = PERIOD_STRIP.sub("", out)
    words = [NUMBER_WORDS.get(word, word) for word in out.split()]
    return " ".join(word for word in words if word not in ARTICLES).replace(",", "")


def closed_hit(prediction: str, reference: str, strict: bool = False) -> bool:
    prediction, reference = normalize_answer(prediction), normalize_answer(reference)
    if strict:
        first = next((word for word in prediction.split() if word in ("yes", "no")), None)
        return first == reference
    return ("yes" in prediction or "no" in prediction) and reference in prediction


def token_scores(prediction: str, reference: str) -> tuple[float, float, float]:
    """(F1, precision, recall) over whitespace tokens; a shared token counts as often as the prediction
    has it, as in the evaluator."""
    candidate = Counter(normalize_answer(prediction).split())
    gold = Counter(normalize_answer(reference).split())
    if not candidate or not gold:
        return 0.0, 0.0, 0.0
    tp = sum(n for word, n in candidate.items() if word in gold)
    fp = sum(n for word, n in candidate.items() if word not in gold)
    fn = sum(n for word, n in gold.items() if word not in candidate)
    if tp == 0:
        return 0.0, 0.0, 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall), precision, recall


def score(records: Sequence[VQARecord], predictions: Mapping[str, str], strict: bool = False) -> dict:
    """Scores of `predictions` (question id -> text) against `records`, overall and by question type.

    Every record needs a prediction and every prediction a record; otherwise the ids are named.
    """
    ids = {r.id for r in records}
    missing, extra = sorted(ids - predictions.keys()), sorted(predictions.keys() - ids)
    if missing or extra:
        raise ValueError(f"predictions do not match the references: missing {missing[:5]}, extra {extra[:5]}")
    groups: dict[str, list[VQARecord]] = defaultdict(list)
    for record in records:
        groups["all"].append(record)
        if record.question_type:
            groups[f"question_type={record.question_type}"].append(record)
    return {name: _group_scores(group, predictions, strict) for name, group in groups.items()}


def _group_scores(records: Sequence[VQARecord], predictions: Mapping[str, str], strict: bool) -> dict:
    closed = [closed_hit(predictions[r.id], r.answer, strict) for r in records if r.answer_type == "CLOSED"]
    open_scores = [token_scores(predictions[r.id], r.answer) for r in records if r.answer_type == "OPEN"]
    exact = [
        normalize_answer(predictions[r.id]) == normalize_answer(r.answer) for r in records if r.answer_type == "OPEN"
    ]
    result = {"n_closed": len(closed), "n_open": len(open_scores)}
    if closed:
        result["closed_accuracy"] = sum(closed) / len(closed)
    if open_scores:
        result["open_recall"] = sum(s[2] for s in open_scores) / len(open_scores)
        result["open_precision"] = sum(s[1] for s in open_scores) / len(open_scores)
        result["open_f1"] = sum(s[0] for s in open_scores) / len(open_scores)
        result["open_exact_match"] = sum(exact) / len(exact)
    return result


def majority_baseline(records: Sequence[VQARecord]) -> float:
    """Closed accuracy of always giving each question's most common answer (by question text)."""
    by_question: dict[str, Counter] = defaultdict(Counter)
    closed = [r for r in records if r.answer_type == "CLOSED"]
    for record in closed:
        by_question[record.question][normalize_answer(record.answer)] += 1
    hits = sum(counts.most_common(1)[0][1] for counts in by_question.values())
    return hits / len(closed) if closed else 0.0
