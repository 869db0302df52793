"""Benchmark loaders: each yields `VQARecord`s, one record type for every dataset and layout.

Closed questions are yes/no questions (LLaVA-Med's `answer_type` CLOSED); open questions are the rest.
Malformed input is refused with the file and record named, never silently dropped: a benchmark number
over a silently shrunken test set would not be comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..processing import IMAGE_PLACEHOLDER
from .conversations import read_records

ANSWER_TYPES = ("OPEN", "CLOSED")


@dataclass(frozen=True)
class VQARecord:
    id: str
    image: Path
    question: str
    answer: str
    answer_type: str  # OPEN or CLOSED
    dataset: str
    split: str = "test"
    question_type: str | None = None


def answer_type_of(answer: str) -> str:
    """Where a dataset gives no type: yes/no answers are closed, everything else open."""
    return "CLOSED" if answer.strip().lower() in ("yes", "no") else "OPEN"


def load_llava_med(
    path: str | Path, image_root: str | Path | None = None, dataset: str = "llava-med"
) -> list[VQARecord]:
    """LLaVA-Med's evaluation format: `[{id, image, conversations: [human, gpt], answer_type}]`.

    Images are looked up under `image_root`, by default the file's `images/` folder when it exists, else
    the file's own folder.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: benchmark file not found")
    if image_root is None:
        image_root = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    image_root = Path(image_root)
    records, seen = [], set()
    for position, raw in enumerate(read_records(path)):
        name = f"{path}: record {raw.get('id', f'#{position}')}"
        turns = raw.get("conversations") or raw.get("conversatons")  # a typo some released files carry
        if not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, dict) for t in turns[:2]):
            raise ValueError(f"{name}: needs conversations with a question and an answer")
        question = str(turns[0].get("value", "")).replace(IMAGE_PLACEHOLDER, "").strip()
        answer = str(turns[1].get("value", "")).strip()
        if not question or not answer:
            raise ValueError(f"{name}: empty question or answer")
        if "id" not in raw or "image" not in raw:
            raise ValueError(f"{name}: needs 'id' and 'image'")
        record_id = str(raw["id"])
        if record_id in seen:
            raise ValueError(f"{name}: duplicate id")
        seen.add(record_id)
        answer_type = str(raw.get("answer_type") or answer_type_of(answer)).upper()
        if answer_type not in ANSWER_TYPES:
            raise ValueError(f"{name}: answer_type must be OPEN or CLOSED, got {raw.get('answer_type')!r}")
        image = image_root / str(raw["image"])
        if not image.is_file():
            raise ValueError(f"{name}: image {image} not found")
        question_type = raw.get("question_type")
        records.append(
            VQARecord(
                record_id, image, question, answer, answer_type, dataset, "test", question_type and str(question_type)
            )
        )
    if not records:
        raise ValueError(f"{path}: no records")
    return records
