"""LLaVA-Med's visual-chat evaluation: a judge LLM reads a figure's caption and context, a question
about the figure, the reference answer (GPT-4's, written from the caption) and the model's answer, and
scores each from 1 to 10. The figure reported is the relative score: the mean over questions of
model / reference x 100, overall, by question type and by image domain, as LLaVA-Med's paper reports it.

The judge never sees the image; it grades against the caption. LLaVA-Med's judge, gpt-4-0314, has been
retired, so scores are comparable only between runs under one named judge, which every review records.
Reviews are appended one by one as they arrive; a rerun asks only for those not yet written, and a
reply whose scores cannot be read is kept in `reviews.rejected.jsonl` with its reason, not asked again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..data.conversations import read_records, repair_appended_rows
from ..datagen.pipeline import rejects_path
from ..datagen.teachers import FatalError, PermanentError, RetryPolicy, complete_with_retries

# LLaVA-Med's image domains, in the order its summary takes a record's first flagged one
DOMAINS = ("chest_xray", "mri", "histology", "gross", "ct_scan")
TYPES = ("conversation", "detailed_description")
PROMPT_ID = "chat_judge_v1"
REVIEW_TOKENS = 512
ORDERS = ("reference_first", "model_first")

JUDGE_SYSTEM = "You grade answers to questions about biomedical figures carefully and impartially."
JUDGE_TASK = (
    "A user looked at a biomedical figure and asked the question above. You cannot see the figure; its "
    "caption and the text that mentions it describe what it shows. Grade each assistant's answer for how "
    "helpful, relevant, accurate and detailed it is, with one overall score from 1 (worst) to 10 (best).\n"
    "On the first line write only the two scores, Assistant 1's then Assistant 2's, separated by a space. "
    "From the next line, explain your grades. Judge the content only: neither the order in which the "
    "answers are shown nor their length should sway you."
)


class BadReview(ValueError):
    """A judge's reply without two readable scores on its first line."""


@dataclass(frozen=True)
class ChatQuestion:
    id: str
    question: str
    reference: str  # the answer the model's is graded against (LLaVA-Med's `gpt4_answer`)
    caption: str  # "fig_label: fig_caption"
    context: str  # the article's sentences that mention the figure
    type: str | None
    domain: str | None


def chat_domain(domain) -> str | None:
    """LLaVA-Med's domain flags (`{"chest_xray": false, "ct_scan": true, ...}`) as the first one set, in
    its order; a string as it is."""
    if isinstance(domain, dict):
        return next((name for name in DOMAINS if domain.get(name) is True), None)
    return str(domain) if domain not in (None, "") else None


def read_chat_questions(path: str | Path) -> list[ChatQuestion]:
    """LLaVA-Med's visual-chat questions (`llava_med_eval_qa50_qa.jsonl`): `question_id`, `text`,
    `gpt4_answer`, `fig_label`, `fig_caption`, `in_text_mention`, `type` and `domain` per record."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: questions file not found")
    questions, seen = [], set()
    for position, raw in enumerate(read_records(path)):
        qid = raw.get("question_id")
        name = f"{path}: record {qid if qid is not None else f'#{position}'}"
        if qid is None:
            raise ValueError(f"{name}: needs a 'question_id'")
        for field in ("text", "gpt4_answer", "fig_caption"):
            if not str(raw.get(field) or "").strip():
                raise ValueError(f"{name}: needs '{field}' (the judge grades against the reference and caption)")
        if str(qid) in seen:
            raise ValueError(f"{name}: duplicate question_id")
        seen.add(str(qid))
        mentions = raw.get("in_text_mention") or ""
        if isinstance(mentions, list):
            mentions = " ".join(str(m.get("tokens", m) if isinstance(m, dict) else m) for m in mentions)
        label = str(raw.get("fig_label") or "").strip()
        caption = str(raw["fig_caption"]).strip()
        questions.append(
            ChatQuestion(
                str(qid),
                str(raw["text"]).replace("<image>", "").strip(),
                str(raw["gpt4_answer"]).strip(),
                f"{label}: {caption}" if label else caption,
                str(mentions).strip() or "none",
                str(raw["type"]) if raw.get("type") else None,
                chat_domain(raw.get("domain")),
            )
        )
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions


def judge_prompt(question: ChatQuestion, first: str, second: str) -> str:
    """What the judge reads: the figure's description, the question, and two answers to grade."""
    return (
        f"[Figure]\nCaption: {question.caption}\nMentioned in the article: {question.context}\n\n"
        f"[Question]\n{question.question}\n\n"
        f"[Assistant 1]\n{first}\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{second}\n[End of Assistant 2]\n\n"
        f"[Task]\n{JUDGE_TASK}"
    )


def parse_scores(reply: str) -> tuple[float, float]:
    """The two scores on the reply's first non-empty line ("8 6", "8, 6", "Assistant 1: 8 Assistant 2: 6")."""
    line = next((line for line in reply.splitlines() if line.strip()), "")
    numbers = re.findall(r"\d+(?:\.\d+)?", re.sub(r"assistant\s*[12]", " ", line, flags=re.IGNORECASE))
    if len(numbers) != 2:
        raise BadReview(f"the first line does not hold two scores: {line[:80]!r}")
    scores = float(numbers[0]), float(numbers[1])
    if not all(1 <= s <= 10 for s in scores):
        raise BadReview(f"scores outside 1 to 10: {line[:80]!r}")
    return scores


def answer_hash(question: ChatQuestion, answer: str) -> str:
    """What a review graded, so that a resumed run never keeps a review of another answer."""
    graded = json.dumps([question.question, question.reference, question.caption, question.context, answer])
    return hashlib.sha256(graded.encode()).hexdigest()[:16]


@dataclass
class JudgeStats:
    written: int = 0
    rejected: int = 0
    failed: int = 0
    requests: int = 0
    retries: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


def pending_reviews(
    questions: list[ChatQuestion], answers: dict[str, str], out: Path, both_orders: bool
) -> list[tuple[ChatQuestion, str]]:
    """The (question, order) pairs `out` and its rejects file do not hold yet. Every question needs its
    answer, and a review in `out` of another answer than `answers` holds now is refused: the answers
    changed since the judging began."""
    missing = [q.id for q in questions if q.id not in answers]
    if missing:
        raise ValueError(f"no answer to {len(missing)} of {len(questions)} questions (first: {missing[0]})")
    done, by_id = set(), {q.id: q for q in questions}
    for row in repair_appended_rows(out) + repair_appended_rows(rejects_path(out)):
        done.add((str(row["question_id"]), row["order"]))
        question = by_id.get(str(row["question_id"]))
        if question is not None and row.get("answer_hash") != answer_hash(question, answers[question.id]):
            raise ValueError(
                f"{out}: its review of question {question.id} graded another answer than the one given now; "
                "judge these answers into another --out"
            )
    orders = ORDERS if both_orders else ORDERS[:1]
    return [(q, order) for q in questions for order in orders if (q.id, order) not in done]


async def judge_answers(
    questions: list[ChatQuestion],
    answers: dict[str, str],
    out: str | Path,
    judge,
    both_orders: bool = False,
    concurrency: int = 8,
    retry: RetryPolicy | None = None,
    max_requests: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> JudgeStats:
    """Ask `judge` (a teacher: `.complete`, `.name`, `.model`) to grade each answer against its reference,
    appending one review per question to `out` (two with `both_orders`: the answers shown in either
    order, to average out the judge's preference for a position), at temperature 0 where the API takes
    one, so that a rerun grades alike."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pending = pending_reviews(questions, answers, out, both_orders)
    total = len(questions) * (2 if both_orders else 1)
    retry = retry or RetryPolicy()
    stats, rng = JudgeStats(), random.Random(seed)
    fatal: list[str] = []
    semaphore = asyncio.Semaphore(concurrency)
    bar = tqdm(total=total, initial=total - len(pending), unit="review", desc="judge", disable=not progress)

    with out.open("a", encoding="utf-8") as good, rejects_path(out).open("a", encoding="utf-8") as bad:

        async def one(question: ChatQuestion, order: str) -> None:
            answer = answers[question.id]
            pair = (question.reference, answer) if order == "reference_first" else (answer, question.reference)
            messages = [{"role": "user", "content": judge_prompt(question, *pair)}]
            async with semaphore:
                if fatal:
                    return
                try:
                    reply = await complete_with_retries(
                        judge, JUDGE_SYSTEM, messages, REVIEW_TOKENS, retry, rng, stats, max_requests, temperature=0.0
                    )
                except FatalError as err:
                    fatal.append(f"the judge {judge.model} cannot be used: {err}")
                    return
                except PermanentError:
                    stats.failed += 1  # not written: a rerun asks again
                    return
            stats.input_tokens += reply.input_tokens
            stats.output_tokens += reply.output_tokens
            row = {
                "question_id": question.id,
                "order": order,
                "type": question.type,
                "domain": question.domain,
                "judge": judge.model,
                "prompt": PROMPT_ID,
                "answer_hash": answer_hash(question, answer),
            }
            try:
                first, second = parse_scores(reply.text)
            except BadReview as err:
                bad.write(json.dumps({**row, "reason": str(err), "review": reply.text}) + "\n")
                bad.flush()
                stats.rejected += 1
            else:
                reference, model = (first, second) if order == "reference_first" else (second, first)
                row |= {"reference_score": reference, "model_score": model, "review": reply.text}
                good.write(json.dumps(row) + "\n")
                good.flush()
                stats.written += 1
            bar.update()

        await asyncio.gather(*(one(question, order) for question, order in pending))
    bar.close()
    if fatal:
        raise ValueError(f"{fatal[0]}; the {stats.written} reviews written so far are kept in {out}")
    return stats


def summarize_reviews(reviews: list[dict]) -> dict[str, dict[str, float]]:
    """Mean reference and model scores and the relative score (mean of model / reference x 100) per
    group: each question type, each domain, and `overall`. A question judged in both orders counts
    once, with its scores averaged over the orders."""
    scores: dict[str, list[tuple[float, float]]] = defaultdict(list)
    meta: dict[str, dict] = {}
    for row in reviews:
        scores[str(row["question_id"])].append((row["reference_score"], row["model_score"]))
        meta[str(row["question_id"])] = row
    groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for qid, pairs in scores.items():
        reference = sum(r for r, _ in pairs) / len(pairs)
        model = sum(m for _, m in pairs) / len(pairs)
        for group in (meta[qid].get("type"), meta[qid].get("domain"), "overall"):
            if group:
                groups[group].append((reference, model))
    order = [*TYPES, *DOMAINS, "overall"]
    named = sorted(groups, key=lambda g: (order.index(g) if g in order else len(order) - 1, g))
    return {group: _group_scores(groups[group]) for group in named}


def _group_scores(pairs: list[tuple[float, float]]) -> dict[str, float]:
    return {
        "n": len(pairs),
        "reference_score": sum(r for r, _ in pairs) / len(pairs),
        "model_score": sum(m for _, m in pairs) / len(pairs),
        "relative_score": 100 * sum(m / r for r, m in pairs) / len(pairs),
    }


def format_summary(summary: dict[str, dict[str, float]], judge: str) -> str:
    lines = [
        f"judge: {judge}",
        f"{'group':<22}{'n':>5}{'reference':>11}{'model':>8}{'relative %':>12}",
    ]
    for group, row in summary.items():
        lines.append(
            f"{group:<22}{row['n']:>5}{row['reference_score']:>11.2f}{row['model_score']:>8.2f}"
            f"{row['relative_score']:>12.1f}"
        )
    return "\n".join(lines)
