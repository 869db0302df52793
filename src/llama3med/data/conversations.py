"""Training data: LLaVA conversation files mixed with ratios, validated up front, images loaded lazily.

Every record is checked when the dataset is built (structure, placeholder, token length, image file
present), so a bad record is skipped and counted, or with `strict` stops the run naming it, before the
first step rather than hours into a run. Images are read only when a sample is drawn.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..processing import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    ImageLoadError,
    Llama3MedProcessor,
    SampleTooLongError,
    llava_to_messages,
    pad_sequences,
    parse_window,
    with_system,
)
from ..processing.images import Window

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """One conversation file, its image folder, and how much of it to draw (2.0 = twice, 0.5 = half)."""

    path: Path
    image_root: Path
    ratio: float = 1.0


@dataclass(frozen=True)
class Sample:
    source: int
    record_id: str
    image: Path | None
    input_ids: list[int]
    labels: list[int]
    frame: int | None = None
    window: Window = None


def record_frame(record: dict, name: str) -> int | None:
    """A record's `frame`: which slice of a volume or DICOM series (from the feet), or frame of a
    multi-frame DICOM, its image is; None (no field): the middle one."""
    frame = record.get("frame")
    if frame is not None and (isinstance(frame, bool) or not isinstance(frame, int) or frame < 0):
        raise ValueError(f"{name}: frame must be a whole number from 0, got {frame!r}")
    return frame


def record_window(record: dict, name: str) -> Window:
    """A record's `window`: a CT preset's name, `"CENTRE,WIDTH"` or `[centre, width]`; None without one."""
    value = record.get("window")
    try:
        return None if value is None else parse_window(value)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


class SeveralImagesError(ValueError):
    """A record of several images (PubMedVision has some): a Llama3-Med conversation holds one."""


def record_image(record: dict, image_root: Path, name: str) -> tuple[Path | None, int | None]:
    """A record's image (a file, or a directory of one DICOM series, under `image_root`) and its frame,
    both checked, so that a bad record is named before training starts. The image may be a list of one,
    as PubMedVision writes its images."""
    image, frame = record.get("image"), record_frame(record, name)
    if isinstance(image, list):
        if len(image) > 1:
            raise SeveralImagesError(f"{name}: {len(image)} images; a Llama3-Med conversation holds one")
        image = image[0] if image else ""
    if image is None:
        if frame is not None:
            raise ValueError(f"{name}: a frame but no image")
        return None, None
    if not isinstance(image, str) or not image:
        raise ValueError(f"{name}: image must be a file name, got {image!r}")
    path = image_root / image
    if not path.exists():
        raise ImageLoadError(path, "file not found")
    return path, frame


LLAVA_MED_DOMAINS = {
    "chest_xray": "chest X-ray",
    "mri": "MRI",
    "ct_scan": "CT",
    "histology": "histology",
    "gross": "gross pathology",
}


def domain_name(domain) -> str | None:
    """A record's kind of image as words: a string as it is, or LLaVA-Med's flags
    (`{"chest_xray": false, "ct_scan": true, ...}`) as the names of those set; None when none is."""
    if isinstance(domain, dict):
        names = [LLAVA_MED_DOMAINS.get(key, key) for key, value in domain.items() if value is True]
        return ", ".join(names) or None
    return str(domain) if domain not in (None, "") else None


def read_records(path: Path) -> list[dict]:
    """A JSON list or JSON lines of records; malformed input names the file and line."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: invalid JSON: {err.msg}") from None
    if not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: every record must be a JSON object")
    return records


def write_atomically(path: Path, content: str | bytes) -> None:
    """`content` as `path`, whole or not at all: written beside it, then renamed over it. The temporary
    name is this process's own, since processes under torchrun may write the same file."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    if isinstance(content, bytes):
        partial.write_bytes(content)
    else:
        partial.write_text(content, encoding="utf-8")
    os.replace(partial, path)


def read_appended_rows(path: Path) -> list[dict]:
    """Complete rows of a JSONL file written line by line; a line cut by a crash is skipped."""
    rows = []
    if Path(path).is_file():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def repair_appended_rows(path: Path) -> list[dict]:
    """Like `read_appended_rows`, and rewrites the file without the cut line, so appending can resume."""
    rows = read_appended_rows(path)
    if Path(path).is_file():
        Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return rows


def draw(records: list[dict], ratio: float, rng: random.Random) -> list[dict]:
    """`ratio` copies of `records`: whole repeats, then a random part for the fraction."""
    if ratio < 0:
        raise ValueError(f"sampling ratio must be >= 0, got {ratio}")
    whole, fraction = int(ratio), ratio - int(ratio)
    return records * whole + rng.sample(records, math.floor(fraction * len(records)))


class RecordDataset(Dataset):
    """Training samples built from records: a bad record is skipped and counted by reason, or with `strict`
    stops the run naming it; an image that turns out unreadable only when drawn skips its sample too."""

    def __init__(self, processor: Llama3MedProcessor, strict: bool):
        self.processor = processor
        self.strict = strict
        self.skipped: Counter[str] = Counter()

    def _skip(self, name: str, err: Exception) -> None:
        if self.strict:
            raise ValueError(f"{name}: {err}") from None
        if isinstance(err, ImageLoadError):
            self.skipped["bad image"] += 1
        elif isinstance(err, SampleTooLongError):
            self.skipped["too long"] += 1
        elif isinstance(err, SeveralImagesError):
            self.skipped["several images"] += 1
        else:
            self.skipped["malformed"] += 1

    def _load_image(
        self, record_id: str, image: Path, frame: int | None = None, window: Window = None
    ) -> torch.Tensor | None:
        """The processed image, or None (counted) when it cannot be read: a run does not crash on it."""
        try:
            return self.processor.preprocess_image(image, window=window, frame=frame)
        except ImageLoadError as err:  # e.g. truncated
            self._skip(f"record {record_id}", err)
            logger.warning("skipped record %s: %s", record_id, err)  # visible from dataloader workers
            return None


class ConversationDataset(RecordDataset):
    """Samples of `input_ids`, `labels` (assistant turns only) and `pixel_values` for training; `system`
    opens each conversation that has no system message of its own."""

    def __init__(
        self,
        sources: list[Source],
        processor: Llama3MedProcessor,
        max_length: int,
        seed: int = 0,
        strict: bool = False,
        system: str | None = None,
    ):
        super().__init__(processor, strict)
        self.system = system
        self.samples: list[Sample] = []
        rng = random.Random(seed)
        for number, source in enumerate(sources):
            for position, record in enumerate(draw(read_records(source.path), source.ratio, rng)):
                name = f"{source.path}: record {record.get('id', f'#{position}')}"
                try:
                    self.samples.append(self._encode(number, source, record, name, max_length))
                except (ValueError, ImageLoadError) as err:
                    self._skip(name, err)

    def _encode(self, number: int, source: Source, record: dict, name: str, max_length: int) -> Sample:
        messages = with_system(llava_to_messages(record.get("conversations"), record=name), self.system)
        image, frame = record_image(record, source.image_root, name)
        if image is not None and not any(IMAGE_PLACEHOLDER in m["content"] for m in messages):
            first = next((m for m in messages if m["role"] == "user"), messages[0])  # not a system message
            first["content"] = f"{IMAGE_PLACEHOLDER}\n{first['content']}"
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            raise ValueError(f"{name}: no assistant answer to learn from")
        encoded = self.processor.encode_conversation(messages, num_images=int(image is not None), max_length=max_length)
        shown = {"frame": frame, "window": record_window(record, name)}
        return Sample(number, str(record.get("id", "")), image, encoded["input_ids"], encoded["labels"], **shown)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        """Token counts, for grouping samples of similar length into batches."""
        return [len(s.input_ids) for s in self.samples]

    def __getitem__(self, index: int) -> dict | None:
        sample = self.samples[index]
        item = {"input_ids": sample.input_ids, "labels": sample.labels}
        if sample.image is not None:
            item["pixel_values"] = self._load_image(sample.record_id, sample.image, sample.frame, sample.window)
            if item["pixel_values"] is None:
                return None
        return item


class ConversationCollator:
    """Right-pads a batch; drops samples whose image failed to load; stacks the images there are."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict | None]) -> dict[str, torch.Tensor]:
        items = [item for item in items if item is not None]
        if not items:
            raise ValueError("every sample of the batch was skipped")
        input_ids, attention_mask = pad_sequences([i["input_ids"] for i in items], self.pad_token_id, "right")
        labels, _ = pad_sequences([i["labels"] for i in items], IGNORE_INDEX, "right")
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        images = [i["pixel_values"] for i in items if "pixel_values" in i]
        if images:
            batch["pixel_values"] = torch.stack(images)
        return batch
