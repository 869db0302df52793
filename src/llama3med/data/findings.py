"""Finding maps: where an image's findings are, on the grid of its image tokens, for the `tower` stage.

A record is a LLaVA record with the boxes of its findings (lesions, nodules, ...), as fractions of the
image's width and height, which holds for any resolution the image is read at:

    {"id": "...", "image": "ct_0001.dcm", "finding_boxes": [[x0, y0, x1, y1], ...]}

An empty list marks an image without findings. Records are checked when the dataset is built, so a bad
one is skipped and counted (or, with `strict`, stops the run naming it) before the first step.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..processing import ImageLoadError, Llama3MedProcessor
from .conversations import RecordDataset, Source, draw, read_records, record_image

Box = tuple[float, float, float, float]


def finding_boxes(record: dict, name: str) -> list[Box]:
    """The record's `finding_boxes`, checked: four fractions each, `x0 <= x1` and `y0 <= y1`."""
    boxes = record.get("finding_boxes")
    if not isinstance(boxes, list):
        raise ValueError(f"{name}: finding_boxes must be a list of [x0, y0, x1, y1] boxes, got {boxes!r}")
    for box in boxes:
        numbers = isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
        if not numbers or not (0 <= box[0] <= box[2] <= 1 and 0 <= box[1] <= box[3] <= 1):
            raise ValueError(f"{name}: finding box {box!r} is not [x0, y0, x1, y1] in fractions of the image")
    return [tuple(float(v) for v in box) for box in boxes]


def finding_map(boxes: list[Box], grid: int) -> torch.Tensor:
    """`(grid * grid,)` of 1.0 where a box touches the token's cell of the image, row by row, else 0.0."""
    cells = torch.zeros(grid, grid)
    for x0, y0, x1, y1 in boxes:
        first_col, last_col = min(int(x0 * grid), grid - 1), max(math.ceil(x1 * grid) - 1, 0)
        first_row, last_row = min(int(y0 * grid), grid - 1), max(math.ceil(y1 * grid) - 1, 0)
        cells[first_row : last_row + 1, first_col : last_col + 1] = 1.0
    return cells.flatten()


@dataclass(frozen=True)
class FindingSample:
    record_id: str
    image: Path
    finding_map: torch.Tensor
    frame: int | None = None


class FindingMapDataset(RecordDataset):
    """Samples of `pixel_values` and `finding_map` (one target per image token) for the tower stage."""

    def __init__(
        self, sources: list[Source], processor: Llama3MedProcessor, grid: int, seed: int = 0, strict: bool = False
    ):
        super().__init__(processor, strict)
        self.samples: list[FindingSample] = []
        rng = random.Random(seed)
        for source in sources:
            for position, record in enumerate(draw(read_records(source.path), source.ratio, rng)):
                name = f"{source.path}: record {record.get('id', f'#{position}')}"
                try:
                    image, frame = record_image(record, source.image_root, name)
                    if image is None:
                        raise ValueError(f"{name}: no image")
                    cells = finding_map(finding_boxes(record, name), grid)
                    self.samples.append(FindingSample(str(record.get("id", "")), image, cells, frame))
                except (ValueError, ImageLoadError) as err:
                    self._skip(name, err)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict | None:
        sample = self.samples[index]
        pixel_values = self._load_image(sample.record_id, sample.image, sample.frame)
        if pixel_values is None:
            return None
        return {"pixel_values": pixel_values, "finding_map": sample.finding_map}


def collate_finding_maps(items: list[dict | None]) -> dict[str, torch.Tensor]:
    """Stacks a batch, without the samples whose image failed to load."""
    items = [item for item in items if item is not None]
    if not items:
        raise ValueError("every sample of the batch was skipped")
    return {key: torch.stack([item[key] for item in items]) for key in ("pixel_values", "finding_map")}
