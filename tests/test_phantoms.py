"""The phantom VQA generator: deterministic, realistic values, lesions where the answers say they are."""

import hashlib
import json

import numpy as np
import pytest

from llama3med.cli import main
from llama3med.data.phantoms import (
    DESCRIBE,
    SIZE_CLASSES,
    WORDINGS,
    make_phantom,
    phantom_uint8,
    write_phantom_set,
)
from llama3med.processing import llava_to_messages, load_image


def digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_the_same_seed_gives_the_same_files_and_another_seed_other_images(tmp_path):
    write_phantom_set(tmp_path / "a", 6, seed=3, size=256, image_format="png")
    write_phantom_set(tmp_path / "b", 6, seed=3, size=256, image_format="png")
    write_phantom_set(tmp_path / "c", 6, seed=4, size=256, image_format="png")
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    a = {v for k, v in digest(tmp_path / "a").items() if k.endswith(".png")}
    c = {v for k, v in digest(tmp_path / "c").items() if k.endswith(".png")}
    assert not a & c


def test_ct_values_are_in_hounsfield_units():
    phantom = next(p for p in (make_phantom(0, i, 256) for i in range(20)) if p.modality == "CT")
    corner = phantom.values[:10, :10]
    assert -1050 < corner.mean() < -950  # air
    assert phantom.values.max() > 600  # bone


def test_lesions_lie_inside_their_organ_and_are_darker_than_it_on_ct():
    found = 0
    for index in range(30):
        phantom = make_phantom(1, index, 512)
        if phantom.modality != "CT":
            continue
        for lesion in phantom.lesions:
            row, col = int(lesion.y * 512), int(lesion.x * 512)
            assert phantom.values[row - 1 : row + 2, col - 1 : col + 2].mean() < 30  # lesion ~5 HU, organs 35-60
            low, high = SIZE_CLASSES[lesion.size_class]
            assert low <= lesion.radius <= high
            found += 1
    assert found >= 5


def test_small_lesions_are_a_few_pixels_across_at_1152_px():
    radii = [lesion.radius * 1152 for i in range(40) for lesion in make_phantom(2, i, 64).lesions]
    small = [r for r in radii if r <= SIZE_CLASSES["small"][1] * 1152]
    assert small and all(2 <= 2 * r <= 10 for r in small)  # 2-10 px across at 1152, under 4 px at 384


def test_the_written_sets_are_in_llava_and_llava_med_formats(tmp_path):
    counts = write_phantom_set(tmp_path, 8, seed=5, size=128)
    captions = json.loads((tmp_path / "captions.json").read_text())
    conversations = json.loads((tmp_path / "conversations.json").read_text())
    tests = json.loads((tmp_path / "test.json").read_text())
    assert counts == {"images": 8, "captions": 8, "conversations": len(conversations), "questions": len(tests)}
    assert 8 <= len(conversations) < 16  # one per slice, and a description-only one for some
    for record in captions + conversations:
        messages = llava_to_messages(record["conversations"], record=record["id"])
        assert messages[0]["content"].startswith("<image>\n")
        assert sum(m["content"].count("<image>") for m in messages) == 1
        assert (tmp_path / "images" / record["image"]).is_file()
    assert {t["answer_type"] for t in tests} == {"OPEN", "CLOSED"}
    assert all(t["conversations"][1]["value"] in ("yes", "no") for t in tests if t["answer_type"] == "CLOSED")
    truth = [json.loads(line) for line in (tmp_path / "phantoms.jsonl").read_text().splitlines()]
    for record in truth:
        count = next(t for t in tests if t["id"].startswith(record["id"]) and t["question_type"] == "count")
        assert count["conversations"][1]["value"] == str(len(record["lesions"]))


def test_each_caption_carries_a_box_around_each_of_its_lesions(tmp_path):
    write_phantom_set(tmp_path, 12, seed=3, size=128)
    captions = {c["id"]: c for c in json.loads((tmp_path / "captions.json").read_text())}
    truth = [json.loads(line) for line in (tmp_path / "phantoms.jsonl").read_text().splitlines()]
    assert any(record["lesions"] for record in truth) and any(not record["lesions"] for record in truth)
    for record in truth:
        boxes = captions[record["id"]]["finding_boxes"]
        assert len(boxes) == len(record["lesions"])
        for (x0, y0, x1, y1), lesion in zip(boxes, record["lesions"], strict=True):
            assert (x0 + x1) / 2 == pytest.approx(lesion["x"]) and (y0 + y1) / 2 == pytest.approx(lesion["y"])
            assert x1 - x0 == pytest.approx(2 * lesion["radius"]) and y1 - y0 == pytest.approx(2 * lesion["radius"])


def test_conversations_ask_no_question_that_gives_away_an_answer_not_yet_given(tmp_path):
    write_phantom_set(tmp_path, 40, seed=5, size=64)
    conversations = json.loads((tmp_path / "conversations.json").read_text())
    kind_of = {wording: kind for (kind, _), wordings in WORDINGS.items() for wording in wordings}
    first_kinds = set()
    for record in conversations:
        asked = [turn["value"].removeprefix("<image>\n") for turn in record["conversations"][::2]]
        if asked == [DESCRIBE]:
            continue
        kinds = [kind_of[question] for question in asked]
        # Only slices with lesions are asked about size, organ and side: never before presence and count.
        about_a_lesion = [i for i, kind in enumerate(kinds) if kind in ("size", "organ", "side")]
        assert ("presence" in kinds) == ("count" in kinds)
        if "presence" in kinds:
            assert all(i > kinds.index("presence") and i > kinds.index("count") for i in about_a_lesion)
        first_kinds.add(kinds[0])
    # Yet every kind of question sometimes comes first, as an evaluation asks it.
    assert first_kinds == {"presence", "count", "modality", "size", "organ", "side"}


def test_training_conversations_word_each_question_several_ways_and_tests_ask_the_first(tmp_path):
    write_phantom_set(tmp_path, 40, seed=6, size=64)
    conversations = json.loads((tmp_path / "conversations.json").read_text())
    tests = json.loads((tmp_path / "test.json").read_text())
    asked = {turn["value"].removeprefix("<image>\n") for r in conversations for turn in r["conversations"][::2]}
    assert all(len(asked & set(wordings)) >= 2 for wordings in WORDINGS.values())
    assert DESCRIBE in asked  # instruction tuning keeps the captioning it started from
    first_wordings = {wordings[0] for wordings in WORDINGS.values()}
    assert {t["conversations"][0]["value"].removeprefix("<image>\n") for t in tests} == first_wordings


def test_dicom_phantoms_load_with_their_soft_tissue_window(tmp_path):
    write_phantom_set(tmp_path, 4, seed=0, size=128)
    truth = [json.loads(line) for line in (tmp_path / "phantoms.jsonl").read_text().splitlines()]
    ct = next(r for r in truth if r["modality"] == "CT")
    shown = np.asarray(load_image(tmp_path / "images" / ct["image"]))[..., 0]
    phantom = make_phantom(0, int(ct["id"].rsplit("-", 1)[1]), 128)
    assert np.abs(shown.astype(int) - phantom_uint8(phantom).astype(int)).max() <= 1  # stored values are rounded


def test_nifti_phantoms_load_to_the_dicom_phantoms_images(tmp_path):
    """As dcm2niix converts: same stored values and scaling, voxels in L, P, S order, the window as cal range."""
    write_phantom_set(tmp_path / "dcm", 6, seed=3, size=128, image_format="dcm")
    write_phantom_set(tmp_path / "nii", 6, seed=3, size=128, image_format="nii.gz")
    truth = [json.loads(line) for line in (tmp_path / "nii" / "phantoms.jsonl").read_text().splitlines()]
    assert {record["modality"] for record in truth} == {"CT", "MR"}
    for record in truth:
        nifti = np.asarray(load_image(tmp_path / "nii" / "images" / record["image"]))
        dicom = np.asarray(load_image(tmp_path / "dcm" / "images" / record["image"].replace(".nii.gz", ".dcm")))
        assert record["image"].endswith(".nii.gz") and np.array_equal(nifti, dicom)


def test_the_cli_writes_a_set(tmp_path, capsys):
    assert main(["data", "phantoms", "--out", str(tmp_path), "--n", "3", "--seed", "9", "--size", "64"]) == 0
    assert "3 images" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["data", "phantoms", "--out", str(tmp_path), "--n", "0"])
