"""The LLaVA-Med VQA protocol, computed the way its evaluator computes it, so numbers compare with the
published ones.

Answers and references are lower-cased and normalised as in the VQA-v2 evaluation that LLaVA-Med reuses
(punctuation, periods, number words, articles, contractions, commas). A closed question is a hit when the prediction
contains "yes" or "no" anywhere and contains the reference as a substring (so "no" inside "not" or
"nodule" counts: the evaluator's quirk, kept on purpose; `strict=True` instead compares the first
yes/no word). Open questions get token precision, recall and F1 with counts (the papers' "open"
column is the mean recall), exact match, BLEU-1/2/3, and the candidate-set accuracy.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from statistics import fmean as mean

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
# The VQA-v2 evaluation's table of contractions written without apostrophes, restored to their spelling.
CONTRACTIONS = dict(
    pair.split(":")
    for pair in """aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
    couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
    hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd
    howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd itd've:it'd've
    it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't mightnt've:mightn't've
    mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've neednt:needn't notve:not've
    oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't
    shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't shouldnt've:shouldn't've
    shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've somebody'dve:somebody'd've
    somebodyll:somebody'll somebodys:somebody's someoned:someone'd someoned've:someone'd've
    someone'dve:someone'd've someonell:someone'll someones:someone's somethingd:something'd
    somethingd've:something'd've something'dve:something'd've somethingll:something'll thats:that's
    thered:there'd thered've:there'd've there'dve:there'd've therere:there're theres:there's theyd:they'd
    theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas wasnt:wasn't
    wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're whats:what's
    whatve:what've whens:when's whered:where'd wheres:where's whereve:where've whod:who'd whod've:who'd've
    who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll whyre:why're whys:why's wont:won't
    wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll
    y'allll:y'all'll yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've
    you'dve:you'd've youll:you'll youre:you're youve:you've""".split()
)


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
    words = [CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES]
    return " ".join(words).replace(",", "")


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


def bleu(prediction: str, reference: str, max_n: int) -> float:
    """Sentence BLEU against one reference, uniform weights over 1..max_n-grams, no smoothing (a
    missing n-gram order gives 0), with the brevity penalty."""
    candidate, gold = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not candidate:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        grams = Counter(tuple(candidate[i : i + n]) for i in range(len(candidate) - n + 1))
        gold_grams = Counter(tuple(gold[i : i + n]) for i in range(len(gold) - n + 1))
        clipped = sum(min(count, gold_grams[gram]) for gram, count in grams.items())
        if clipped == 0:
            return 0.0
        log_precision += math.log(clipped / sum(grams.values())) / max_n
    brevity = 1.0 if len(candidate) > len(gold) else math.exp(1 - len(gold) / len(candidate))
    return brevity * math.exp(log_precision)


def closest_candidate(prediction: str, candidates: Sequence[str]) -> str | None:
    """The candidate answer whose tokens the prediction covers best (ties: the longer candidate), so a
    verbose but right answer ("the lesion is in the liver") maps to the dataset's "liver"."""
    words = set(normalize_answer(prediction).split())
    best, best_key = None, (0.0, 0)
    for candidate in candidates:
        tokens = candidate.split()
        key = (sum(token in words for token in tokens) / len(tokens), len(tokens)) if tokens else (0.0, 0)
        if key[0] > 0 and key > best_key:
            best, best_key = candidate, key
    return best


def score(records: Sequence[VQARecord], predictions: Mapping[str, str], strict: bool = False) -> dict:
    """Scores of `predictions` (question id -> text) against `records`, overall and by question type.

    Every record needs a prediction and every prediction a record; otherwise the ids are named.
    """
    ids = {r.id for r in records}
    missing, extra = sorted(ids - predictions.keys()), sorted(predictions.keys() - ids)
    if missing or extra:
        raise ValueError(f"predictions do not match the references: missing {missing[:5]}, extra {extra[:5]}")
    candidates = sorted({normalize_answer(r.answer) for r in records if r.answer_type == "OPEN"})
    groups: dict[str, list[VQARecord]] = defaultdict(list)
    for record in records:
        groups["all"].append(record)
        if record.question_type:
            groups[f"question_type={record.question_type}"].append(record)
    return {name: _group_scores(group, predictions, strict, candidates) for name, group in groups.items()}


def _group_scores(
    records: Sequence[VQARecord], predictions: Mapping[str, str], strict: bool, candidates: Sequence[str]
) -> dict:
    closed = [closed_hit(predictions[r.id], r.answer, strict) for r in records if r.answer_type == "CLOSED"]
    open_records = [r for r in records if r.answer_type == "OPEN"]
    result = {"n_closed": len(closed), "n_open": len(open_records)}
    if closed:
        result["closed_accuracy"] = sum(closed) / len(closed)
    if open_records:
        pairs = [(predictions[r.id], r.answer) for r in open_records]
        f1, precision, recall = zip(*(token_scores(p, r) for p, r in pairs), strict=True)
        result["open_recall"] = mean(recall)
        result["open_precision"] = mean(precision)
        result["open_f1"] = mean(f1)
        result["open_exact_match"] = mean(normalize_answer(p) == normalize_answer(r) for p, r in pairs)
        for n in (1, 2, 3):
            result[f"open_bleu{n}"] = mean(bleu(p, r, n) for p, r in pairs)
        hits = [closest_candidate(p, candidates) == normalize_answer(r) for p, r in pairs]
        result["open_candidate_accuracy"] = mean(hits)
    return result


def majority_baseline(records: Sequence[VQARecord]) -> float:
    """Closed accuracy of always giving each question's most common answer (by question text)."""
    by_question: dict[str, Counter] = defaultdict(Counter)
    closed = [r for r in records if r.answer_type == "CLOSED"]
    for record in closed:
        by_question[record.question][normalize_answer(record.answer)] += 1
    hits = sum(counts.most_common(1)[0][1] for counts in by_question.values())
    return hits / len(closed) if closed else 0.0
