"""OmniMedVQA: read from the release's own question files (`QA_information/Open-access/*.json`, the
right option given as its text), asked and scored as every multiple-choice set is, and reported by
question type, modality and source dataset, as the benchmark's paper reports it."""

import json
import random
import shutil

import pytest

from llama3med.checkpoints import DEMO_MODEL_DIR
from llama3med.cli import main
from llama3med.data.benchmarks import load_benchmark
from llama3med.data.phantoms import write_phantom_set
from llama3med.eval import choice_chance, score


def omnimedvqa_question(qid, image, question, options, right, question_type, modality, source):
    """A record as OmniMedVQA writes it: `option_A`.. for as many options as it has, `gt_answer` the
    right one's text."""
    record = {"dataset": source, "question_id": qid, "question_type": question_type, "question": question}
    record |= {"gt_answer": options[right], "image_path": image, "modality_type": modality}
    return record | {f"option_{letter}": option for letter, option in zip("ABCD", options, strict=False)}


def write_release(root, files: dict[str, list[dict]], access="Open-access"):
    folder = root / "QA_information" / access
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in files.items():
        (folder / f"{name}.json").write_text(json.dumps(records, indent=1))


def test_omnimedvqa_release_is_read_with_its_options_the_right_letter_and_its_groupings(tmp_path):
    (tmp_path / "Images" / "Chest CT Scan").mkdir(parents=True)
    (tmp_path / "Images" / "Chest CT Scan" / "a.png").write_bytes(b"")
    image = "Images/Chest CT Scan/a.png"
    ct = [
        omnimedvqa_question(
            "ct_0", image, "What modality is this?", ["CT", "MR"], 0, "Modality Recognition", "CT", "CT"
        ),
        omnimedvqa_question(
            "ct_1",
            image,
            "Which disease?",
            ["Adenocarcinoma", "Normal.", "Squamous cell carcinoma", "Large cell"],
            1,
            "Disease Diagnosis",
            "CT",
            "Chest CT Scan",
        )
        | {"gt_answer": "normal"},  # the right option's text, as the release writes it, full stop or none
    ]
    quirk = omnimedvqa_question(
        "mr_0", image, "Which organ?", ["brain", "knee", "liver"], 0, "Anatomy Identification", "", "MRI"
    )
    quirk = {**{k: v for k, v in quirk.items() if k != "modality_type"}, "modality": "MR"}  # one file's key
    write_release(tmp_path, {"Chest CT Scan": ct, "MRI": [quirk]})

    records = load_benchmark("omnimedvqa", tmp_path)
    assert [r.id for r in records] == ["ct_0", "ct_1", "mr_0"]  # files in name order, then the release's order
    assert [r.answer for r in records] == ["A", "B", "A"] and {r.answer_type for r in records} == {"CHOICE"}
    assert records[1].options == ("Adenocarcinoma", "Normal.", "Squamous cell carcinoma", "Large cell")
    assert records[2].options == ("brain", "knee", "liver")  # option_D absent: three options
    assert records[0].image == tmp_path / image  # image_path is relative to the release folder
    assert records[1].question_type == "Disease Diagnosis"
    assert records[1].strata == (("modality", "CT"), ("source", "Chest CT Scan"))
    assert records[2].strata == (("modality", "MR"), ("source", "MRI"))
    one_file = tmp_path / "QA_information" / "Open-access" / "MRI.json"  # one source dataset alone
    assert [r.id for r in load_benchmark("omnimedvqa", one_file)] == ["mr_0"]
    assert [r.id for r in load_benchmark("omnimedvqa", tmp_path / "QA_information")] == ["ct_0", "ct_1", "mr_0"]

    write_release(
        tmp_path,
        {"Private": [{**ct[0], "question_id": "p_0", "image_path": "Images/Private/b.png"}]},
        "Restricted-access",
    )
    with pytest.raises(ValueError, match="record p_0: image .*b.png not found .restricted-access images are not"):
        load_benchmark("omnimedvqa", tmp_path, split="restricted-access")
    assert [r.split for r in load_benchmark("omnimedvqa", tmp_path, "restricted-access", check_images=False)] == [
        "restricted-access"
    ]
    with pytest.raises(ValueError, match="OmniMedVQA has no split 'train'; choose from test, open-access"):
        load_benchmark("omnimedvqa", tmp_path, split="train")


def test_malformed_omnimedvqa_records_are_refused_by_file_and_question_id(tmp_path):
    good = omnimedvqa_question(
        "q_0", "Images/a.png", "Which organ?", ["liver", "kidney"], 0, "Anatomy Identification", "CT", "S"
    )
    cases = [
        ({**good, "gt_answer": "heart"}, "S.json: record q_0: answer 'heart' is neither an option's letter"),
        ({**good, "option_B": "", "option_C": "spleen"}, "record q_0: empty option B"),
        ({**good, "option_B": "liver"}, "record q_0: option 'liver' is given twice"),
        ({**good, "question": ""}, "record q_0: empty question"),
    ]
    for record, message in cases:
        write_release(tmp_path, {"S": [record]})
        with pytest.raises(ValueError, match=message):
            load_benchmark("omnimedvqa", tmp_path, check_images=False)
    write_release(tmp_path, {"S": [good, good]})
    with pytest.raises(ValueError, match="record q_0: duplicate id"):
        load_benchmark("omnimedvqa", tmp_path, check_images=False)
    write_release(tmp_path, {"S": [good]})
    with pytest.raises(ValueError, match="record q_0: image .*a.png not found$"):
        load_benchmark("omnimedvqa", tmp_path)
    (tmp_path / "QA_information" / "Open-access" / "S.json").write_text("[{")
    with pytest.raises(ValueError, match="S.json: not JSON"):
        load_benchmark("omnimedvqa", tmp_path, check_images=False)
    with pytest.raises(ValueError, match="no OmniMedVQA question files"):
        load_benchmark("omnimedvqa", tmp_path / "Images")


@pytest.fixture(scope="module")
def phantom_omnimedvqa(tmp_path_factory):
    """OmniMedVQA's layout over phantom slices: each slice's modality and organ questions as the
    benchmark's Modality Recognition and Anatomy Identification ones, filed by modality as two source
    datasets, the images under `Images/`: 12 modality questions and 7 organ ones (slices with a lesion)."""
    phantoms, root = tmp_path_factory.mktemp("phantoms"), tmp_path_factory.mktemp("OmniMedVQA")
    write_phantom_set(phantoms, n=12, seed=9, image_format="png")
    shutil.copytree(phantoms / "images", root / "Images" / "Phantoms")
    kinds = {
        "modality": ("Modality Recognition", "CT MRI X-ray ultrasound"),
        "organ": ("Anatomy Identification", "liver kidney spleen"),
    }
    rng, files = random.Random(0), {}
    records = json.loads((phantoms / "test.json").read_text())
    modality_of = {
        r["image"]: r["conversations"][1]["value"]
        for r in records
        if r["question_type"] == "modality" and r["answer_type"] == "OPEN"
    }
    for record in records:
        if record["answer_type"] != "OPEN" or record["question_type"] not in kinds:
            continue
        question_type, choices = kinds[record["question_type"]]
        answer, modality = record["conversations"][1]["value"], modality_of[record["image"]]
        options = [answer, *rng.sample([c for c in choices.split() if c != answer], k=2)]
        rng.shuffle(options)
        question = record["conversations"][0]["value"].removeprefix("<image>\n")
        source = f"Phantom {modality}"
        files.setdefault(source, []).append(
            omnimedvqa_question(
                record["id"],
                f"Images/Phantoms/{record['image']}",
                question,
                options,
                options.index(answer),
                question_type,
                modality,
                source,
            )
        )
    write_release(root, files)
    return root


def test_eval_ranks_omnimedvqa_options_and_reports_by_question_type_modality_and_source(
    phantom_omnimedvqa, tmp_path, capsys
):
    out = tmp_path / "ranked"
    args = ["--model", str(DEMO_MODEL_DIR), "--benchmark", "omnimedvqa", "--data", str(phantom_omnimedvqa)]
    assert main(["eval", *args, "--out", str(out), "--rank-options"]) == 0
    records = load_benchmark("omnimedvqa", phantom_omnimedvqa)
    rows = {row["question_id"]: row for row in map(json.loads, (out / "answers.jsonl").open())}
    report = json.loads((out / "report.json").read_text())
    assert report["scores"] == score(records, {qid: row["text"] for qid, row in rows.items()})
    groups = report["scores"]
    assert groups["all"]["n_choice"] == len(records) == 19 and report["choice_chance"] == choice_chance(records)
    assert {"question_type=Modality Recognition", "question_type=Anatomy Identification"} <= groups.keys()
    assert {"modality=CT", "modality=MRI", "source=Phantom CT", "source=Phantom MRI"} <= groups.keys()
    assert groups["all"]["choice_accuracy"] > report["choice_chance"] + 0.25
    assert groups["question_type=Modality Recognition"]["choice_accuracy"] == 1.0  # the demo tells CT from MRI
    assert "| modality=CT |" in (out / "report.md").read_text()

    capsys.readouterr()
    assert main(["table", str(out)]) == 0
    accuracy = 100 * groups["all"]["choice_accuracy"]
    assert capsys.readouterr().out.splitlines()[::2] == [
        "| model | OmniMedVQA choice |",
        f"| {DEMO_MODEL_DIR} (options ranked) | {accuracy:.2f} |",
    ]
