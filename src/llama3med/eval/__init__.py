"""Zero-shot VQA evaluation with the LLaVA-Med protocol: run, score, report."""

from .runner import generate_answers, run
from .scoring import (
    choice_chance,
    chosen_option,
    closed_auroc,
    closed_hit,
    confidence_intervals,
    majority_baseline,
    normalize_answer,
    paired_difference,
    score,
    token_scores,
)

__all__ = [
    "choice_chance",
    "chosen_option",
    "closed_auroc",
    "closed_hit",
    "confidence_intervals",
    "generate_answers",
    "majority_baseline",
    "normalize_answer",
    "paired_difference",
    "run",
    "score",
    "token_scores",
]
