"""Benchmark loaders read each dataset's real layouts (written here in their published formats) into one
record type, and refuse malformed input by file and record."""

import collections
import io
import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from llama3med.data.benchmarks import (
    load_benchmark,
    load_candidate_answers,
    load_pathvqa,
    load_slake,
    load_vqa_rad,
    train_open_answers,
)


def png_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array([{"bytes": r[0], "path": None} for r in rows], type=image_type),
            "question": [r[1] for r in rows],
            "answer": [r[2] for r in rows],
        }
    )
    pq.write_table(table, path)


def test_vqa_rad_official_json_keeps_the_test_phrase_types(tmp_path):
    (tmp_path / "VQA_RAD Image Folder").mkdir()
    (tmp_path / "VQA_RAD Image Folder" / "synpic1.jpg").write_bytes(png_bytes(10))
    row = {"image_name": "synpic1.jpg", "answer_type": "CLOSED", "question_type": "PRES", "answer": "Yes"}
    row["image_organ"] = "ABD"
    rows = [
        {**row, "qid": 1, "phrase_type": "freeform", "question": "Is there a mass?"},
        {**row, "qid": 4, "phrase_type": "para", "question": "Where?", "answer": "Liver", "answer_type": "OPEN"},
        {**row, "qid": 2, "phrase_type": "test_freeform", "question": "Is there a mass?"},
        {
            **row,
            "qid": 3,
            "phrase_type": "test_para",
            "question": "How many masses?",
            "answer": 2,
            "answer_type": "OPEN",
        },
    ]
    (tmp_path / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    records = load_vqa_rad(tmp_path)
    assert [(r.id, r.answer, r.answer_type, r.question_type) for r in records] == [
        ("2", "Yes", "CLOSED", "PRES"),
        ("3", "2", "OPEN", "PRES"),
    ]
    assert {r.strata for r in records} == {(("organ", "ABD"),)}  # scored per organ too
    assert [r.id for r in load_vqa_rad(tmp_path, split="train")] == ["1", "4"]
    assert records[0].image_key == records[1].image_key  # one image, encoded once
    # The candidate set of the open "accuracy" is the train split's open answers, as in LLaVA-Med.
    assert train_open_answers("vqa-rad", tmp_path, records) == ["Liver"]
    assert train_open_answers("llava-med", tmp_path, records) is None


def test_parquet_layouts_embed_the_images_and_type_yes_no_answers_as_closed(tmp_path):
    write_parquet(
        tmp_path / "data" / "test-00000-of-00001.parquet",
        [(png_bytes(1), "Is it normal?", "no"), (png_bytes(2), "What organ?", "liver")],
    )
    for name in ("vqa-rad", "pathvqa"):
        records = load_benchmark(name, tmp_path)
        assert [(r.answer_type, r.dataset) for r in records] == [("CLOSED", name), ("OPEN", name)]
        assert isinstance(records[0].image, bytes) and records[0].image_key != records[1].image_key
    with pytest.raises(ValueError, match="no data/validation-\\*.parquet"):
        load_pathvqa(tmp_path, split="validation")


def test_slake_keeps_english_questions_by_default(tmp_path):
    (tmp_path / "imgs" / "xmlab1").mkdir(parents=True)
    (tmp_path / "imgs" / "xmlab1" / "source.jpg").write_bytes(png_bytes(5))
    base = {"img_name": "xmlab1/source.jpg", "answer_type": "OPEN", "content_type": "Organ", "answer": "Lung"}
    base |= {"modality": "CT", "location": "Lung"}
    rows = [
        {**base, "qid": 10, "q_lang": "en", "question": "Which organ?"},
        {**base, "qid": 11, "q_lang": "zh", "question": "哪个器官?"},
    ]
    (tmp_path / "test.json").write_text(json.dumps(rows, ensure_ascii=False))
    assert [(r.id, r.question_type) for r in load_slake(tmp_path)] == [("10", "Organ")]
    assert load_slake(tmp_path)[0].strata == (("modality", "CT"), ("location", "Lung"))  # scored by each too
    assert len(load_slake(tmp_path, language=None)) == 2
    train = [{**base, "qid": 1, "q_lang": "en", "question": "Which organ is this?", "answer": "Heart"}]
    (tmp_path / "train.json").write_text(json.dumps(train))
    test = load_slake(tmp_path)
    assert train_open_answers("slake", tmp_path, test) == ["Heart"]  # the release folder has the train split
    assert train_open_answers("slake", tmp_path / "test.json", test) is None  # a lone split file has not


def test_pathvqa_original_pickles_are_read_as_plain_data_only(tmp_path):
    (tmp_path / "qas" / "test").mkdir(parents=True)
    (tmp_path / "images" / "test").mkdir(parents=True)
    (tmp_path / "images" / "test" / "test_0001.jpg").write_bytes(png_bytes(3))
    rows = [{"image": "test_0001", "question": "Is this benign?", "answer": "yes"}]
    (tmp_path / "qas" / "test" / "test_qa.pkl").write_bytes(pickle.dumps(rows))
    records = load_pathvqa(tmp_path)
    assert [(r.answer, r.answer_type, r.image.name) for r in records] == [("yes", "CLOSED", "test_0001.jpg")]

    # Any class reference (here a harmless one) could be a callable run at load time, so none is allowed.
    (tmp_path / "qas" / "test" / "test_qa.pkl").write_bytes(pickle.dumps([collections.OrderedDict(rows[0])]))
    with pytest.raises(ValueError, match="refusing to load"):
        load_pathvqa(tmp_path)


def test_malformed_records_are_named(tmp_path):
    (tmp_path / "VQA_RAD Image Folder").mkdir()
    rows = [{"qid": 7, "phrase_type": "test_freeform", "image_name": "gone.jpg", "question": "Q?", "answer": "yes"}]
    (tmp_path / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="record 7: image .*gone.jpg not found"):
        load_vqa_rad(tmp_path)
    with pytest.raises(ValueError, match="unknown benchmark 'medqa'"):
        load_benchmark("medqa", tmp_path)
    (tmp_path / "train_open_answers.json").write_text('{"1": ["liver"]}')
    with pytest.raises(ValueError, match=r"train_open_answers.json: expected a JSON list"):
        load_candidate_answers(tmp_path / "train_open_answers.json")


def test_slake_reads_its_images_from_imgs_zip_where_the_release_is_still_zipped(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as archive:
        archive.writestr("imgs/xmlab1/source.jpg", png_bytes(5))
        archive.writestr("imgs/xmlab2/source.jpg", png_bytes(6))
    base = {"answer_type": "OPEN", "q_lang": "en", "question": "Which organ?", "answer": "Lung"}
    rows = [{**base, "qid": i, "img_name": f"xmlab{1 + i // 2}/source.jpg"} for i in range(4)]
    (tmp_path / "test.json").write_text(json.dumps(rows))
    records = load_slake(tmp_path)
    assert [r.image for r in records] == [png_bytes(5), png_bytes(5), png_bytes(6), png_bytes(6)]
    assert len({r.image_key for r in records}) == 2  # each image encoded once
    (tmp_path / "test.json").write_text(json.dumps([{**base, "qid": 9, "img_name": "xmlab3/source.jpg"}]))
    with pytest.raises(ValueError, match="record 9: image imgs/xmlab3/source.jpg not found in .*imgs.zip"):
        load_slake(tmp_path)


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """An offline machine's Hugging Face cache, in the hub client's own layout."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_hugging_face_dataset_id_is_read_from_the_hubs_copy(tmp_path, hub_cache):
    snapshot = hub_cache / "datasets--flaviagiammarino--vqa-rad" / "snapshots" / "0123abcd"
    write_parquet(snapshot / "data" / "test-00000-of-00001.parquet", [(png_bytes(1), "Is it normal?", "no")])
    (hub_cache / "datasets--flaviagiammarino--vqa-rad" / "refs").mkdir()
    (hub_cache / "datasets--flaviagiammarino--vqa-rad" / "refs" / "main").write_text("0123abcd")
    records = load_benchmark("vqa-rad", "flaviagiammarino/vqa-rad")
    assert [(r.question, r.answer, r.image) for r in records] == [("Is it normal?", "no", png_bytes(1))]


def test_an_id_neither_on_disk_nor_to_be_had_from_the_hub_is_named(hub_cache):
    with pytest.raises(ValueError, match="owner/missing: no such file or folder, and no Hugging Face dataset"):
        load_benchmark("pathvqa", "owner/missing")
