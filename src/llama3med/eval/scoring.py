"""The LLaVA-Med VQA protocol, computed the way the Llama3-Med paper's evaluator (LLaVA-Med's
`run_eval.py` and `eval_metrics/`, one fix applied) computes it, so numbers compare with published ones.

Answers and references are lower-cased and normalised as in the VQA-v2 evaluation that LLaVA-Med reuses
(punctuation, periods, number words, articles, contractions, commas). A closed question is a hit when the
prediction contains "yes" or "no" anywhere and contains the reference as a substring (so "no" inside
"not" or "nodule" counts: the evaluator's quirk, kept on purpose; `strict=True` instead compares the
first yes/no word). Every closed question counts, as in the Llama3-Med evaluator; LLaVA-Med's
`run_eval.py` silently drops wrong yes/no answers from the denominator (an `else` is missing).
Open questions get token precision, recall and F1 with counts (the papers' "open" column is the mean
recall), the evaluator's "exact match" and sentence BLEU (NLTK's, unsmoothed), and the candidate-set
accuracy. `tests/test_eval.py` checks every number against the evaluator on a prepared answers file.
Multiple-choice questions, which that protocol does not have, get their accuracy: the option an answer
picks (`chosen_option`: its letter, else the one option whose text it gives) against the right one.
"""

from __future__ import annotations

import functools
import math
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from statistics import fmean as mean

import numpy as np

from ..data.benchmarks import OPTION_LETTERS, VQARecord

PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the evaluator's pattern, look-behind typo and all
PERIODS_STRIPPED = 32  # the evaluator passes `re.UNICODE` (32) where `re.sub` takes its count
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
    out = PERIOD_STRIP.sub("", out, count=PERIODS_STRIPPED)
    words = [NUMBER_WORDS.get(word, word) for word in out.split()]
    words = [CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES]
    return " ".join(words).replace(",", "")


def first_yes_or_no(answer: str) -> str | None:
    """The answer's first "yes" or "no" word once normalised (`--strict`'s closed answer); None if it has neither."""
    return next((word for word in normalize_answer(answer).split() if word in ("yes", "no")), None)


def closed_hit(prediction: str, reference: str, strict: bool = False) -> bool:
    if strict:
        return first_yes_or_no(prediction) == normalize_answer(reference)
    prediction, reference = normalize_answer(prediction), normalize_answer(reference)
    return ("yes" in prediction or "no" in prediction) and reference in prediction


def chosen_option(prediction: str, options: Sequence[str]) -> str | None:
    """The letter of the option an answer picks, read as multiple-choice evaluations of generative
    models read it: a letter alone or leading the answer ("B", "(B)", "B.", "B: kidney"), one after
    "answer" or "option" ("The answer is B"), else the one option whose text the answer holds (of
    "liver" and "liver cyst", an answer "liver cyst" picks the latter). None when it picks none or
    several: such answers count as wrong."""
    letters = OPTION_LETTERS[: len(options)]
    text = prediction.strip()
    alone = re.fullmatch(rf"\(?([{letters}])\)?\.?", text, flags=re.IGNORECASE)
    leading = re.match(rf"\(?([{letters}])[.:),]", text)
    named = re.search(rf"\b(?i:answer|option|choice)\b\W*(?:(?i:is)\W+)?\(?([{letters}])\b", text)
    if found := alone or leading or named:
        return found.group(1).upper()
    said = f" {normalize_answer(text)} "
    words = [normalize_answer(option) for option in options]
    given = [i for i, option in enumerate(words) if option and f" {option} " in said]
    widest = [i for i in given if not any(words[i] in words[j] for j in given if j != i)]
    return letters[widest[0]] if len(widest) == 1 else None


def picked_option(record: VQARecord, log_probs: Sequence[float]) -> str:
    """The option `rank_options` answers with: the likeliest, the first of equals."""
    return record.options[list(log_probs).index(max(log_probs))]


def option_probabilities(log_probs: Sequence[float]) -> list[float]:
    """Ranked options' probabilities among themselves, from their answers' log-probabilities."""
    shares = [math.exp(log_p - max(log_probs)) for log_p in log_probs]
    return [share / sum(shares) for share in shares]


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


def exact_match(prediction: str, reference: str) -> float:
    """The evaluator's "exact match score": the reference's distinct words found in the prediction,
    divided by the prediction's word count (1.0 for an identical answer, less for a wordy one)."""
    candidate, gold = normalize_answer(prediction).split(), set(normalize_answer(reference).split())
    return sum(word in candidate for word in gold) / len(candidate) if candidate else 0.0


BLEU_WEIGHTS = {  # BLEU-n is the n-gram order alone, as the evaluator weights it
    "open_bleu": (0.25, 0.25, 0.25, 0.25),
    "open_bleu1": (1, 0, 0, 0),
    "open_bleu2": (0, 1, 0, 0),
    "open_bleu3": (0, 0, 1, 0),
}


def bleu(prediction: str, reference: str, weights: Sequence[float]) -> float:
    """NLTK's `sentence_bleu` against one reference, as the evaluator calls it: no smoothing, so an order
    without a match contributes `log(sys.float_info.min)` times its weight, and no unigram match gives 0."""
    candidate, gold = normalize_answer(prediction).split(), normalize_answer(reference).split()
    precisions = []
    for n in range(1, len(weights) + 1):
        grams = Counter(tuple(candidate[i : i + n]) for i in range(len(candidate) - n + 1))
        gold_grams = Counter(tuple(gold[i : i + n]) for i in range(len(gold) - n + 1))
        clipped = sum(min(count, gold_grams[gram]) for gram, count in grams.items())
        precisions.append(clipped / max(1, sum(grams.values())) if clipped else sys.float_info.min)
    if precisions[0] == sys.float_info.min:
        return 0.0
    brevity = 1.0 if len(candidate) > len(gold) else math.exp(1 - len(gold) / len(candidate))
    return brevity * math.exp(math.fsum(w * math.log(p) for w, p in zip(weights, precisions, strict=True)))


def closest_candidate(prediction: str, candidates: Sequence[str]) -> str:
    """The candidate answer with the largest share of its distinct words in the prediction, the first one
    on ties (even when nothing matches), so a verbose answer ("the lesion is in the liver") maps to
    "liver". This is the evaluator's open "accuracy"; `candidates` are normalised, in the file's order."""
    words = set(normalize_answer(prediction).split())
    shares = [len(words & c) / len(c) if c else 0.0 for c in map(_distinct_words, candidates)]
    return candidates[shares.index(max(shares))]


@functools.lru_cache(maxsize=65536)
def _distinct_words(answer: str) -> frozenset[str]:
    """A candidate's words, split once however many predictions are compared with it."""
    return frozenset(answer.split())


def candidate_answers(answers: Sequence[str]) -> list[str]:
    """Normalised candidate answers in their first-appearance order, duplicates dropped."""
    return list(dict.fromkeys(normalize_answer(str(answer)) for answer in answers))


def score(
    records: Sequence[VQARecord],
    predictions: Mapping[str, str],
    strict: bool = False,
    candidates: Sequence[str] | None = None,
) -> dict:
    """Scores of `predictions` (question id -> text) against `records`, overall, by question type and
    by each of the release's other groupings (`VQARecord.strata`: SLAKE's modality and location,
    VQA-RAD's organ), as `all`, `question_type=PRES`, `modality=CT`, ... in that order.

    `candidates` is the answer set of the open "accuracy" (LLaVA-Med uses the training split's open
    answers, `train_open_answers.json`); by default, the open answers of `records` themselves.
    Every record needs a prediction and every prediction a record; otherwise the ids are named.
    """
    check_predictions(records, predictions)
    if candidates is None:
        candidates = [r.answer for r in records if r.answer_type == "OPEN"]
    candidates = candidate_answers(candidates)
    groups: dict[str, list[VQARecord]] = defaultdict(list)
    kinds = {"all": 0, "question_type": 1}
    for record in records:
        groups["all"].append(record)
        if record.question_type:
            groups[f"question_type={record.question_type}"].append(record)
        for name, value in record.strata:
            kinds.setdefault(name, len(kinds))
            groups[f"{name}={value}"].append(record)
    ordered = sorted(groups, key=lambda group: kinds[group.split("=")[0]])  # stable: first seen first
    return {name: _group_scores(groups[name], predictions, strict, candidates) for name in ordered}


def check_predictions(records: Sequence[VQARecord], predictions: Mapping[str, str]) -> None:
    """One prediction per record and a record per prediction; otherwise the ids are named."""
    ids = {r.id for r in records}
    missing, extra = sorted(ids - predictions.keys()), sorted(predictions.keys() - ids)
    if missing or extra:
        raise ValueError(f"predictions do not match the references: missing {missing[:5]}, extra {extra[:5]}")


def _group_scores(
    records: Sequence[VQARecord], predictions: Mapping[str, str], strict: bool, candidates: Sequence[str]
) -> dict:
    closed = [closed_hit(predictions[r.id], r.answer, strict) for r in records if r.answer_type == "CLOSED"]
    open_records = [r for r in records if r.answer_type == "OPEN"]
    chosen = [(chosen_option(predictions[r.id], r.options), r.answer) for r in records if r.answer_type == "CHOICE"]
    result = {"n_closed": len(closed), "n_open": len(open_records)}
    if chosen:
        result["n_choice"] = len(chosen)
        result["choice_accuracy"] = mean(pick == answer for pick, answer in chosen)
        result["choice_unread"] = mean(pick is None for pick, _ in chosen)  # answers that picked no option
    if closed:
        result["closed_accuracy"] = sum(closed) / len(closed)
    if open_records:
        pairs = [(predictions[r.id], r.answer) for r in open_records]
        f1, precision, recall = zip(*(token_scores(p, r) for p, r in pairs), strict=True)
        result["open_recall"] = mean(recall)
        result["open_precision"] = mean(precision)
        result["open_f1"] = mean(f1)
        result["open_exact_match"] = mean(exact_match(p, r) for p, r in pairs)
        for name, weights in BLEU_WEIGHTS.items():
            result[name] = mean(bleu(p, r, weights) for p, r in pairs)
        if candidates:
            hits = [closest_candidate(p, candidates) == normalize_answer(r) for p, r in pairs]
            result["open_candidate_accuracy"] = mean(hits)
    return result


HEADLINE_METRICS = {"closed_accuracy": (0, 1), "open_recall": (2, 3), "choice_accuracy": (4, 5)}  # sums' rows


def question_score(record: VQARecord, prediction: str, strict: bool = False) -> float:
    """One answer's term in its kind's headline figure: 1 or 0 for a closed or multiple-choice question
    (hit or not), the token recall for an open one."""
    if record.answer_type == "CLOSED":
        return float(closed_hit(prediction, record.answer, strict))
    if record.answer_type == "CHOICE":
        return float(chosen_option(prediction, record.options) == record.answer)
    return token_scores(prediction, record.answer)[2]


def _image_sums(records: Sequence[VQARecord], predictions: Mapping[str, str], strict: bool) -> np.ndarray:
    """`(6, images)`: per image, in the records' order of images, the closed hits, closed questions, open
    recall, open questions, multiple-choice hits and multiple-choice questions."""
    check_predictions(records, predictions)
    keys = {key: i for i, key in enumerate(dict.fromkeys(r.image_key for r in records))}
    rows = {"CLOSED": 0, "OPEN": 2, "CHOICE": 4}
    sums = np.zeros((6, len(keys)))
    for record in records:
        row = rows[record.answer_type]
        sums[row : row + 2, keys[record.image_key]] += question_score(record, predictions[record.id], strict), 1
    return sums


def _bootstrap(
    sums: Sequence[np.ndarray], level: float, resamples: int, seed: int, combine: Callable[..., np.ndarray]
) -> dict:
    """Percentile intervals of `combine(metric of each sums)` over resamples of the images, the same draws
    for every `sums` (so that two runs on one test set are compared image by image)."""
    images = sums[0].shape[1]
    draws = np.random.default_rng(seed).multinomial(images, np.full(images, 1 / images), size=resamples)
    resampled = [draws @ s.T for s in sums]  # each (resamples, 4): a resample's sums over its drawn images
    intervals = {"level": level, "resamples": resamples, "unit": "image"}
    for name, (total, count) in HEADLINE_METRICS.items():
        kept = resampled[0][:, count] > 0  # a resample may draw no image with such questions
        if kept.any():
            values = combine(*(r[kept, total] / r[kept, count] for r in resampled))
            low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
            intervals[name] = [float(low), float(high)]
    return intervals


def confidence_intervals(
    records: Sequence[VQARecord],
    predictions: Mapping[str, str],
    strict: bool = False,
    level: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Percentile-bootstrap intervals of the whole set's closed accuracy and open recall (the papers' two
    columns), resampling images rather than questions: the questions about one image share its
    difficulty, so resampling them one by one would make the intervals too narrow (SLAKE asks about ten
    questions per image). The seed is fixed, so the same answers always give the same intervals."""
    return _bootstrap([_image_sums(records, predictions, strict)], level, resamples, seed, lambda values: values)


def paired_difference(
    records: Sequence[VQARecord],
    predictions: Mapping[str, str],
    baseline: Mapping[str, str],
    strict: bool = False,
    level: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """`predictions` minus `baseline` on the same questions: each headline metric's difference and its
    paired-bootstrap interval (both runs' answers on the same resampled images). Much tighter than two
    separate intervals, since what makes an image hard is shared; an interval that excludes 0 is a
    difference the test images do not explain."""
    sums = [_image_sums(records, answers, strict) for answers in (predictions, baseline)]
    result = _bootstrap(sums, level, resamples, seed, lambda ours, theirs: ours - theirs)
    for name, (total, count) in HEADLINE_METRICS.items():
        if name in result:
            ours, theirs = (s[total].sum() / s[count].sum() for s in sums)
            result[name] = {"difference": float(ours - theirs), "interval": result[name]}
    return result


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """The area under the ROC curve: the chance that a positive scores above a negative, ties counting
    half (the Mann-Whitney statistic, from average ranks)."""
    order = np.argsort(scores, kind="stable")
    _, inverse, counts = np.unique(scores[order], return_inverse=True, return_counts=True)
    ranks = np.empty(len(scores))
    ranks[order] = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based, ties given their mean rank
    positives = int(labels.sum())
    negatives = len(labels) - positives
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def closed_auroc(
    records: Sequence[VQARecord],
    p_yes: Mapping[str, float],
    level: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> dict | None:
    """How well the model's P(yes) ranks the closed questions whose reference is "yes" above those whose
    reference is "no" (0.5: no better than chance, 1: every yes above every no), as clinical readers are
    compared at every threshold rather than one; with a percentile-bootstrap interval over images, as for
    the accuracies. Beside it, how far P(yes) is from the truth as a probability (`calibration`).
    None without a P(yes) for both kinds (an answers file from an endpoint without logprobs, say)."""
    rows = [
        (r.image_key, normalize_answer(r.answer) == "yes", p_yes[r.id])
        for r in records
        if r.answer_type == "CLOSED" and normalize_answer(r.answer) in ("yes", "no") and p_yes.get(r.id) is not None
    ]
    labels = np.array([is_yes for _, is_yes, _ in rows], dtype=bool)
    scores = np.array([p for _, _, p in rows], dtype=float)
    if not labels.any() or labels.all():
        return None
    of_image: dict[str, list[int]] = defaultdict(list)
    for index, (key, _, _) in enumerate(rows):
        of_image[key].append(index)
    per_image = [np.array(indices) for indices in of_image.values()]
    rng, values = np.random.default_rng(seed), []
    for _ in range(resamples):
        drawn = np.concatenate([per_image[i] for i in rng.integers(0, len(per_image), len(per_image))])
        if labels[drawn].any() and not labels[drawn].all():
            values.append(auroc(labels[drawn], scores[drawn]))
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return {
        "auroc": auroc(labels, scores),
        "n_yes": int(labels.sum()),
        "n_no": int((~labels).sum()),
        "interval": [float(low), float(high)],
        "level": level,
        **calibration(labels, scores),
    }


def calibration(labels: np.ndarray, scores: np.ndarray, bins: int = 10) -> dict:
    """The Brier score (mean squared distance of P(yes) from the truth, 0 at best; 0.25 for always 0.5)
    and the expected calibration error: over `bins` equal-width bins of P(yes), the share of questions
    in each times the gap between its mean P(yes) and its share of yes answers. A model can rank well
    (AUROC) and still be over-sure; these say by how much."""
    truth = labels.astype(float)
    which = np.minimum((scores * bins).astype(int), bins - 1)
    gaps = [abs(scores[which == b].mean() - truth[which == b].mean()) * (which == b).mean() for b in np.unique(which)]
    return {"brier": float(((scores - truth) ** 2).mean()), "ece": float(sum(gaps)), "ece_bins": bins}


def choice_chance(records: Sequence[VQARecord]) -> float | None:
    """The multiple-choice accuracy of picking an option at random; None without such questions."""
    counts = [len(r.options) for r in records if r.answer_type == "CHOICE"]
    return mean(1 / count for count in counts) if counts else None


def choice_calibration(records: Sequence[VQARecord], log_probs: Mapping[str, Sequence[float]]) -> dict | None:
    """How sure ranked multiple-choice answers are against how often they are right: the mean probability
    of the option picked, the share right, and `calibration` of that top-option probability (10 bins),
    as for P(yes). None without ranked answers."""
    ranked = [(r, log_probs[r.id]) for r in records if r.answer_type == "CHOICE" and log_probs.get(r.id)]
    if not ranked:
        return None
    right = np.array([OPTION_LETTERS[r.options.index(picked_option(r, scores))] == r.answer for r, scores in ranked])
    confidence = np.array([max(option_probabilities(scores)) for _, scores in ranked])
    return {"n": len(ranked), "mean_confidence": float(confidence.mean()), "accuracy": float(right.mean())} | (
        calibration(right, confidence)
    )


def majority_baseline(records: Sequence[VQARecord]) -> float | None:
    """Closed accuracy of always giving each question's most common answer (by question text); None
    without closed questions."""
    by_question: dict[str, Counter] = defaultdict(Counter)
    closed = [r for r in records if r.answer_type == "CLOSED"]
    for record in closed:
        by_question[record.question][normalize_answer(record.answer)] += 1
    hits = sum(counts.most_common(1)[0][1] for counts in by_question.values())
    return hits / len(closed) if closed else None
