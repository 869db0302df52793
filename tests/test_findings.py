"""Finding maps for the tower stage: boxes become the image-token cells they touch; bad records are
skipped and counted, or fatal with strict."""

import json

import pytest
import torch

from llama3med import Llama3MedProcessor
from llama3med.data.conversations import Source
from llama3med.data.findings import FindingMapDataset, collate_finding_maps, finding_map
from llama3med.data.phantoms import write_phantom_set


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    write_phantom_set(root, 8, seed=2, size=96, image_format="png")
    return root


@pytest.fixture()
def processor(tokenizer):
    return Llama3MedProcessor(tokenizer=tokenizer, image_size=96, num_image_tokens=16)


def cells(grid_map: torch.Tensor, grid: int) -> set[tuple[int, int]]:
    """(row, column) of the marked cells."""
    return {(int(i) // grid, int(i) % grid) for i in grid_map.nonzero()}


def test_a_box_marks_every_cell_it_touches_and_no_other():
    assert cells(finding_map([(0.1, 0.1, 0.2, 0.2)], 4), 4) == {(0, 0)}
    assert cells(finding_map([(0.2, 0.6, 0.3, 0.8)], 4), 4) == {(2, 0), (2, 1), (3, 0), (3, 1)}
    assert cells(finding_map([(0.25, 0.0, 0.5, 0.25)], 4), 4) == {(0, 1)}  # edges on cell borders
    assert cells(finding_map([(0.9, 0.9, 1.0, 1.0), (0.0, 0.0, 0.0, 0.0)], 4), 4) == {(3, 3), (0, 0)}
    assert finding_map([], 4).tolist() == [0.0] * 16


def test_phantom_captions_give_one_map_per_image_with_lesions_only_where_there_are_some(phantoms, processor):
    source = Source(phantoms / "captions.json", phantoms / "images")
    dataset = FindingMapDataset([source], processor, grid=4)
    truth = [json.loads(line) for line in (phantoms / "phantoms.jsonl").read_text().splitlines()]
    assert len(dataset) == 8 and not dataset.skipped
    batch = collate_finding_maps([dataset[i] for i in range(len(dataset))])
    assert batch["pixel_values"].shape == (8, 3, 96, 96) and batch["finding_map"].shape == (8, 16)
    assert [bool(m.any()) for m in batch["finding_map"]] == [bool(t["lesions"]) for t in truth]


def test_bad_records_are_skipped_and_counted_and_strict_names_the_record_and_field(tmp_path, phantoms, processor):
    good = json.loads((phantoms / "captions.json").read_text())[0]
    records = [
        good,
        {**good, "id": "pixels", "finding_boxes": [[10, 20, 30, 40]]},
        {**good, "id": "no-image", "image": "missing.png"},
        {**good, "id": "no-boxes", "finding_boxes": None},
        {**good, "id": "upside-down", "finding_boxes": [[0.5, 0.5, 0.4, 0.6]]},
    ]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))
    dataset = FindingMapDataset([Source(path, phantoms / "images")], processor, grid=4)
    assert len(dataset) == 1 and dataset.skipped == {"bad image": 1, "malformed": 3}
    with pytest.raises(ValueError, match=r"record pixels: finding box \[10, 20, 30, 40\] is not \[x0, y0, x1, y1\]"):
        FindingMapDataset([Source(path, phantoms / "images")], processor, grid=4, strict=True)
