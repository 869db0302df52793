"""Training data: mixing with ratios, bad records skipped and counted (or fatal with --strict), padding."""

import json

import nibabel
import numpy as np
import pytest
import torch

from llama3med import Llama3MedProcessor
from llama3med.data.conversations import ConversationCollator, ConversationDataset, Source
from llama3med.data.phantoms import write_phantom_set
from llama3med.processing import IGNORE_INDEX


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    write_phantom_set(root, 6, seed=0, size=96, image_format="png")
    return root


@pytest.fixture()
def processor(tokenizer):
    return Llama3MedProcessor(tokenizer=tokenizer, image_size=96, num_image_tokens=16)


def bad_records_file(tmp_path, phantoms):
    good = json.loads((phantoms / "conversations.json").read_text())[0]
    (tmp_path / "cut.png").write_bytes((phantoms / "images" / good["image"]).read_bytes()[:200])
    records = [
        good,
        {**good, "id": "no-image", "image": "missing.png"},
        {**good, "id": "bad-role", "conversations": [{"from": "robot", "value": "hi"}]},
        {**good, "id": "empty", "conversations": []},
        {**good, "id": "no-answer", "conversations": [{"from": "human", "value": "<image>\nHi"}]},
        {**good, "id": "long", "conversations": [good["conversations"][0], {"from": "gpt", "value": "big " * 500}]},
        {**good, "id": "truncated", "image": str(tmp_path / "cut.png")},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_bad_records_are_skipped_and_counted(tmp_path, phantoms, processor):
    dataset = ConversationDataset([Source(bad_records_file(tmp_path, phantoms), phantoms / "images")], processor, 400)
    assert dataset.skipped == {"bad image": 1, "malformed": 3, "too long": 1}
    assert len(dataset) == 2  # the good record, and the truncated image found only when loaded
    items = [dataset[0], dataset[1]]
    assert items[1] is None and dataset.skipped["bad image"] == 2
    batch = ConversationCollator(processor.tokenizer.pad_token_id)(items)
    assert batch["input_ids"].shape[0] == 1 and batch["pixel_values"].shape == (1, 3, 96, 96)


def test_strict_fails_naming_the_record(tmp_path, phantoms, processor):
    with pytest.raises(ValueError, match="record no-image: .*missing.png: file not found"):
        ConversationDataset(
            [Source(bad_records_file(tmp_path, phantoms), phantoms / "images")], processor, 400, strict=True
        )


def test_a_system_turn_comes_first_and_the_image_placeholder_goes_in_the_users_turn(tmp_path, phantoms, processor):
    good = json.loads((phantoms / "conversations.json").read_text())[0]
    question, answer = good["conversations"][0]["value"], good["conversations"][1]["value"]
    system = {"from": "system", "value": "You are a radiologist."}
    unmarked = {"from": "human", "value": question.replace("<image>", "").strip()}
    records = [
        {**good, "id": "marked", "conversations": [system, *good["conversations"][:2]]},
        {**good, "id": "unmarked", "conversations": [system, unmarked, {"from": "gpt", "value": answer}]},
    ]
    path = tmp_path / "with-system.json"
    path.write_text(json.dumps(records))
    dataset = ConversationDataset([Source(path, phantoms / "images")], processor, 400, strict=True)
    messages = [
        {"role": "system", "content": system["value"]},
        {"role": "user", "content": "<image>\n" + unmarked["value"]},
    ]
    expected = processor.encode_conversation([*messages, {"role": "assistant", "content": answer}], num_images=1)
    assert list(dataset[0]["input_ids"]) == list(dataset[1]["input_ids"]) == list(expected["input_ids"])
    whole = tmp_path / "whole.json"
    whole.write_text(json.dumps([{**good, "conversations": [system, *good["conversations"]]}]))
    opened = ConversationDataset([Source(whole, phantoms / "images")], processor, 400)[0]
    given = ConversationDataset(
        [Source(phantoms / "conversations.json", phantoms / "images")], processor, 400, system=system["value"]
    )
    assert list(given[0]["input_ids"]) == list(opened["input_ids"])  # a recipe's `system`: as if each opened so


def test_pubmedvision_records_train_with_their_one_image_and_those_of_several_are_counted(
    tmp_path, phantoms, processor
):
    """PubMedVision (HuatuoGPT-Vision's set) names its images in a list and writes no placeholder."""
    good = json.loads((phantoms / "conversations.json").read_text())[0]
    question = good["conversations"][0]["value"].replace("<image>", "").strip()
    turns = [{"from": "human", "value": question}, good["conversations"][1]]
    records = [
        {"id": "one", "image": [good["image"]], "conversations": turns, "modality": "CT"},
        {"id": "two", "image": [good["image"], good["image"]], "conversations": turns, "modality": "CT"},
    ]
    path = tmp_path / "PubMedVision_InstructionTuning_VQA.json"
    path.write_text(json.dumps(records))
    dataset = ConversationDataset([Source(path, phantoms / "images")], processor, 400)
    assert len(dataset) == 1 and dataset.skipped == {"several images": 1}
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([{**records[0], "image": good["image"]}]))
    assert list(dataset[0]["input_ids"]) == list(
        ConversationDataset([Source(plain, phantoms / "images")], processor, 400)[0]["input_ids"]
    )
    with pytest.raises(ValueError, match="record two: 2 images; a Llama3-Med conversation holds one"):
        ConversationDataset([Source(path, phantoms / "images")], processor, 400, strict=True)


def test_sources_mix_with_ratios_deterministically(phantoms, processor):
    sources = [
        Source(phantoms / "conversations.json", phantoms / "images", ratio=2.0),
        Source(phantoms / "captions.json", phantoms / "images", ratio=0.5),
    ]
    first = ConversationDataset(sources, processor, 512, seed=1)
    again = ConversationDataset(sources, processor, 512, seed=1)
    conversations, captions = (len(json.loads(source.path.read_text())) for source in sources)
    assert [s.source for s in first.samples].count(0) == 2 * conversations
    assert [s.source for s in first.samples].count(1) == captions // 2
    assert [s.record_id for s in first.samples] == [s.record_id for s in again.samples]


def test_images_are_not_loaded_until_drawn(phantoms, processor):
    dataset = ConversationDataset([Source(phantoms / "captions.json", phantoms / "images")], processor, 512)
    assert all(sample.image.suffix == ".png" for sample in dataset.samples)
    assert dataset[0]["pixel_values"].shape == (3, 96, 96)


def test_the_collator_pads_right_and_masks_padding_in_labels(phantoms, processor):
    dataset = ConversationDataset([Source(phantoms / "conversations.json", phantoms / "images")], processor, 512)
    batch = ConversationCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(3)])
    lengths = batch["attention_mask"].sum(1)
    assert lengths.tolist() == dataset.lengths[:3]
    for row, length in enumerate(lengths):
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, :length] == torch.tensor(dataset.samples[row].input_ids)).all()


def volume_records(tmp_path, phantoms):
    """A three-slice NIfTI volume and a record per slice; and the same record with bad frames."""
    voxels = np.random.default_rng(0).integers(-1000, 1000, size=(40, 30, 3), dtype=np.int16)
    nibabel.save(nibabel.Nifti1Image(voxels, np.eye(4)), tmp_path / "ct.nii.gz")
    good = json.loads((phantoms / "conversations.json").read_text())[0]
    slices = [{**good, "id": f"slice{k}", "image": "ct.nii.gz", "frame": k} for k in range(3)]
    bad = [{**slices[0], "id": f"bad{i}", "frame": frame} for i, frame in enumerate(["1", -1, True, 1.5])]
    return slices, bad


def test_a_record_may_name_a_slice_of_a_volume_as_its_image(tmp_path, phantoms, processor):
    slices, bad = volume_records(tmp_path, phantoms)
    path = tmp_path / "volume.json"
    path.write_text(json.dumps([*slices, *bad, {**slices[0], "id": "too-deep", "frame": 3}]))
    dataset = ConversationDataset([Source(path, tmp_path)], processor, 400)
    assert dataset.skipped == {"malformed": 4} and len(dataset) == 4  # a slice past the last is found when drawn
    for k in range(3):
        expected = processor.preprocess_image(tmp_path / "ct.nii.gz", frame=k)
        assert torch.equal(dataset[k]["pixel_values"], expected)
    assert not torch.equal(dataset[0]["pixel_values"], dataset[1]["pixel_values"])
    assert dataset[3] is None and dataset.skipped["bad image"] == 1
    with pytest.raises(ValueError, match=r"record bad0: frame must be a whole number from 0, got '1'"):
        ConversationDataset([Source(path, tmp_path)], processor, 400, strict=True)


def test_a_record_may_name_the_window_its_ct_is_seen_through(tmp_path, phantoms, processor):
    slices, _ = volume_records(tmp_path, phantoms)
    windowed = [{**slices[0], "id": "lung", "window": "lung"}, {**slices[0], "id": "numbers", "window": [40, 400]}]
    path = tmp_path / "windowed.json"
    path.write_text(json.dumps([slices[0], *windowed, {**slices[0], "id": "bad", "window": "sharp"}]))
    dataset = ConversationDataset([Source(path, tmp_path)], processor, 400)
    assert dataset.skipped == {"malformed": 1} and len(dataset) == 3
    volume = tmp_path / "ct.nii.gz"
    assert torch.equal(dataset[1]["pixel_values"], processor.preprocess_image(volume, window="lung", frame=0))
    assert torch.equal(dataset[2]["pixel_values"], processor.preprocess_image(volume, window="soft_tissue", frame=0))
    assert not torch.equal(dataset[0]["pixel_values"], dataset[1]["pixel_values"])  # the file's own range
    with pytest.raises(ValueError, match=r"record bad: window must be CENTRE,WIDTH or one of"):
        ConversationDataset([Source(path, tmp_path)], processor, 400, strict=True)


def test_a_benchmark_s_train_split_becomes_conversations_worded_as_eval_asks(tmp_path, processor, capsys):
    from test_benchmarks import png_bytes, write_parquet

    from llama3med.cli import main
    from llama3med.data.benchmarks import load_benchmark, prompt_text

    shared = png_bytes(40)
    write_parquet(
        tmp_path / "vqa-rad" / "data" / "train-00000-of-00001.parquet",
        [
            (shared, "Is there a mass?", "yes"),
            (shared, "Which lobe?", "right lobe"),
            (png_bytes(90), "Is it MRI?", "no"),
        ],
    )
    out = tmp_path / "vqa-rad-train"
    argv = ["data", "vqa-conversations", "--benchmark", "vqa-rad", "--data", str(tmp_path / "vqa-rad")]
    assert main([*argv, "--prompt", "short", "--out", str(out)]) == 0
    assert "3 conversations (2 images written)" in capsys.readouterr().out
    records = load_benchmark("vqa-rad", tmp_path / "vqa-rad", "train")
    written = json.loads((out / "conversations.json").read_text())
    assert [c["conversations"][0]["value"] for c in written] == [f"<image>\n{prompt_text(r, 'short')}" for r in records]
    assert [c["answer_type"] for c in written] == ["CLOSED", "OPEN", "CLOSED"]
    assert written[0]["image"] == written[1]["image"] != written[2]["image"]
    assert (out / written[0]["image"]).read_bytes() == shared

    dataset = ConversationDataset([Source(out / "conversations.json", out)], processor, 400, strict=True)
    assert len(dataset) == 3 and not dataset.skipped
    item = dataset[1]
    supervised = [t for t, label in zip(item["input_ids"], item["labels"], strict=True) if label != IGNORE_INDEX]
    assert processor.tokenizer.decode(supervised).startswith("right lobe")
    assert torch.equal(dataset[0]["pixel_values"], processor.preprocess_image(out / written[0]["image"]))

    system = "You are a radiologist."  # as `eval --system` will ask the tuned model
    assert main([*argv, "--system", system, "--out", str(tmp_path / "with-system")]) == 0
    with_system = json.loads((tmp_path / "with-system" / "conversations.json").read_text())
    assert all(c["conversations"][0] == {"from": "system", "value": system} for c in with_system)
    item = ConversationDataset([Source(tmp_path / "with-system" / "conversations.json", out)], processor, 400)[1]
    prompt = processor.chat_prompt([{"role": "system", "content": system}, {"role": "user", "content": "x"}])
    assert processor.tokenizer.decode(item["input_ids"]).startswith(prompt.split("x")[0])

    assert main([*argv, "--split", "test", "--out", str(tmp_path / "t")]) == 1  # no test split in this release
    assert "a model tuned on it cannot be evaluated on it" in capsys.readouterr().err
