"""Evaluation: the LLaVA-Med scoring rules (quirks included), batched answers equal to one-by-one answers,
each image encoded and its prompt prefix run once, and an interrupted run that resumes without repeating
or losing answers."""

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
import torch

from conftest import write_dicom
from llama3med.checkpoints import load
from llama3med.cli import main
from llama3med.data.benchmarks import VQARecord, load_llava_med, load_questions, prompt_text
from llama3med.eval import (
    closed_auroc,
    closed_hit,
    confidence_intervals,
    majority_baseline,
    normalize_answer,
    paired_difference,
    run,
    runner,
    score,
    token_scores,
)
from llama3med.eval.report import comparison_rows, load_published
from llama3med.eval.runner import (
    generate_answers,
    prefix_caches,
    read_answers,
    unanswered_share,
    yes_probabilities,
)
from llama3med.eval.scoring import auroc, bleu, calibration, closest_candidate, exact_match
from llama3med.inference import answer, question_messages, yes_no_tokens
from llama3med.processing import dicom_series, find_images, load_image
from llama3med.train.vqa_eval import VQAEvalCallback

ROOT = Path(__file__).parents[1]
PARITY = ROOT / "tests" / "fixtures" / "llava_med_parity"


@pytest.fixture(scope="module")
def model_and_processor(built_model_dir):
    return load(built_model_dir)


def test_answers_are_normalised_like_the_vqa_evaluator():
    assert normalize_answer("The Liver.") == "liver"
    assert normalize_answer("Two lesions, left side") == "2 lesions left side"
    assert normalize_answer("none") == "0"
    assert normalize_answer("T2-weighted") == "t2 weighted"
    assert normalize_answer("3.5 cm") == "3.5 cm"


def test_closed_questions_follow_the_llava_med_rule_and_its_quirk():
    assert closed_hit("No, there is none.", "no")
    assert not closed_hit("Yes.", "no")
    assert not closed_hit("Maybe", "no")  # neither yes nor no
    assert closed_hit("There is a nodule", "no")  # "no" inside "nodule": the published evaluator counts it
    assert not closed_hit("There is a nodule", "no", strict=True)
    assert closed_hit("no, not yes", "no", strict=True) and not closed_hit("yes or no", "no", strict=True)


def test_open_questions_score_tokens_with_the_predictions_counts():
    assert token_scores("left kidney", "left kidney") == (1.0, 1.0, 1.0)
    f1, precision, recall = token_scores("the liver lesion", "liver")
    assert (precision, recall) == (0.5, 1.0) and f1 == pytest.approx(2 / 3)
    assert token_scores("left left kidney", "left kidney")[2] == 1.0  # tp counts "left" twice, as published
    assert token_scores("", "liver") == (0.0, 0.0, 0.0)


def test_exact_match_bleu_and_candidates_are_the_evaluators_definitions():
    assert exact_match("liver", "liver") == 1.0
    assert exact_match("The liver is enlarged", "liver") == pytest.approx(1 / 3)  # a share, not equality
    assert bleu("liver lesion", "liver lesion", (0.5, 0.5)) == 1.0
    assert bleu("liver", "liver lesion", (1, 0, 0, 0)) == pytest.approx(math.exp(-1))  # brevity penalty
    assert 0 < bleu("lesion liver", "liver lesion", (0, 1, 0, 0)) < 1e-300  # NLTK without smoothing
    assert bleu("kidney", "liver", (1, 0, 0, 0)) == 0.0
    candidates = ["liver", "kidney", "left kidney", "spleen"]
    assert closest_candidate("The lesion is in the liver.", candidates) == "liver"
    assert closest_candidate("left kidney", candidates) == "kidney"  # both cover fully: the first wins
    assert closest_candidate("unsure", candidates) == "liver"  # nothing matches: the first candidate


def test_a_prepared_answers_file_scores_as_llava_meds_evaluator_scores_it(capsys):
    """`expected.json` was computed by the paper's own evaluator on the answers in the same folder."""
    expected = json.loads((PARITY / "expected.json").read_text())
    files = ["--gt", str(PARITY / "test.json"), "--pred", str(PARITY / "answers.jsonl")]
    assert main(["score", *files, "--candidates", str(PARITY / "train_open_answers.json"), "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)["all"]
    for metric, value in expected["scores"].items():
        assert ours[metric] == pytest.approx(value, rel=1e-12, abs=sys.float_info.min), metric
    # LLaVA-Med's run_eval.py leaves wrong yes/no answers out of the denominator; the paper's and ours count them.
    records = load_llava_med(PARITY / "test.json", check_images=False)
    predictions = {row["question_id"]: row["text"] for row in map(json.loads, open(PARITY / "answers.jsonl"))}
    closed = [r for r in records if r.answer_type == "CLOSED"]
    hits = sum(closed_hit(predictions[r.id], r.answer) for r in closed)
    answers = [normalize_answer(predictions[r.id]) for r in closed]
    without_yes_no = sum("yes" not in answer and "no" not in answer for answer in answers)
    assert hits / (hits + without_yes_no) == pytest.approx(expected["closed_accuracy_as_published"])


def closed_set(right: int, wrong: int, questions_per_image: int = 1, shared_images: bool = True):
    """Closed questions, `questions_per_image` about each image (each image's all right or all wrong),
    and their predictions."""
    records, predictions = [], {}
    for image in range(right + wrong):
        for q in range(questions_per_image):
            qid = f"{image}-{q}"
            picture = Path(f"img{image}.png" if shared_images else f"img{image}-{q}.png")
            records.append(VQARecord(qid, picture, "Is it normal?", "yes", "CLOSED", "test"))
            predictions[qid] = "yes" if image < right else "no"
    return records, predictions


def test_intervals_have_the_binomial_width_and_the_same_answers_give_the_same_interval():
    records, predictions = closed_set(right=320, wrong=80)
    intervals = confidence_intervals(records, predictions)
    low, high = intervals["closed_accuracy"]
    half_width = 1.96 * math.sqrt(0.8 * 0.2 / 400)  # the normal approximation: 0.039
    assert low == pytest.approx(0.8 - half_width, abs=0.01) and high == pytest.approx(0.8 + half_width, abs=0.01)
    assert confidence_intervals(records, predictions) == intervals
    assert intervals["unit"] == "image" and "open_recall" not in intervals  # no open questions


def test_intervals_resample_images_so_many_questions_about_one_image_do_not_narrow_them():
    one_each = confidence_intervals(*closed_set(right=40, wrong=10))["closed_accuracy"]
    ten_each = confidence_intervals(*closed_set(right=40, wrong=10, questions_per_image=10))["closed_accuracy"]
    assert ten_each == one_each  # ten questions that stand or fall together tell no more than one
    ten_images = closed_set(right=40, wrong=10, questions_per_image=10, shared_images=False)
    separate = confidence_intervals(*ten_images)["closed_accuracy"]
    assert separate[1] - separate[0] < 0.5 * (one_each[1] - one_each[0])


def test_a_paired_difference_finds_what_two_separate_intervals_cannot():
    """B misses 12 of the 300 images A gets right, and nothing else differs: 3 points, which two separate
    intervals (each about +-4 points) cannot tell apart, but the paired bootstrap does."""
    records, ours = closed_set(right=300, wrong=100)
    theirs = {qid: ("no" if int(qid.split("-")[0]) < 12 else text) for qid, text in ours.items()}
    difference = paired_difference(records, ours, theirs)["closed_accuracy"]
    assert difference["difference"] == pytest.approx(0.03)
    low, high = difference["interval"]
    assert 0 < low < 0.03 < high
    ours_low, _ = confidence_intervals(records, ours)["closed_accuracy"]
    assert ours_low < 0.72  # B's score lies inside A's own interval
    same = paired_difference(records, ours, ours)["closed_accuracy"]
    assert same == {"difference": 0.0, "interval": [0.0, 0.0]}


def test_published_figures_outside_this_runs_interval_are_marked():
    report = {
        "model": "ours",
        "benchmark": "slake",
        "scores": {"all": {"open_recall": 0.60, "closed_accuracy": 0.80}},
        "intervals": {"open_recall": [0.55, 0.65], "closed_accuracy": [0.76, 0.84]},
    }
    published = {"rows": [{"model": "theirs", "benchmark": "slake", "open": 70.0, "closed": 82.0}]}
    assert comparison_rows(report, published) == [["this run (ours)", "60.00", "80.00"], ["theirs", "70.00 *", "82.00"]]


def test_scores_are_broken_down_by_question_type_and_by_the_releases_other_groupings():
    def record(qid, question_type, modality, location):
        strata = (("modality", modality), ("location", location))
        return VQARecord(qid, b"", "Is there a mass?", "yes", "CLOSED", "slake", "test", question_type, strata=strata)

    records = [
        record("1", "Abnormality", "CT", "Lung"),
        record("2", "Organ", "MRI", "Brain"),
        record("3", "Abnormality", "CT", "Abdomen"),
    ]
    scores = score(records, {"1": "yes", "2": "no", "3": "yes"})
    assert list(scores) == [
        "all",
        "question_type=Abnormality",
        "question_type=Organ",
        "modality=CT",
        "modality=MRI",
        "location=Lung",
        "location=Brain",
        "location=Abdomen",
    ]
    assert (scores["modality=CT"]["closed_accuracy"], scores["modality=MRI"]["closed_accuracy"]) == (1.0, 0.0)
    assert scores["location=Abdomen"]["n_closed"] == 1


def test_scores_need_one_prediction_per_question(tmp_path):
    records = [VQARecord("q1", tmp_path, "Is there a lesion?", "yes", "CLOSED", "x", question_type="presence")]
    with pytest.raises(ValueError, match=r"missing \['q1'\], extra \['q9'\]"):
        score(records, {"q9": "yes"})
    scores = score(records, {"q1": "yes, one"})
    assert scores["all"]["closed_accuracy"] == 1.0 and scores["question_type=presence"]["n_closed"] == 1


def test_batched_answers_equal_one_by_one_answers_and_each_image_is_encoded_and_prefilled_once(
    model_and_processor, test_set, monkeypatch
):
    model, processor = model_and_processor
    records = load_llava_med(test_set)
    prefilled = []

    def counted(model, prefix_ids, pixel_values):
        prefilled.append(pixel_values.shape[0])
        return prefix_caches(model, prefix_ids, pixel_values)

    monkeypatch.setattr(runner, "prefix_caches", counted)
    batched = {r.id: text for r, _, text, _ in generate_answers(model, processor, records, batch_size=5)}
    # 3 images with 4-8 questions each, in batches of 5: every image's questions span two batches
    assert sum(prefilled) == len({r.image for r in records}) == 3
    prefetched = generate_answers(model, processor, records, batch_size=5, prefetch_images=True)
    assert {r.id: text for r, _, text, _ in prefetched} == batched  # images read on a thread, as on a GPU
    single = {r.id: text for r, _, text, _ in generate_answers(model, processor, records[:4], batch_size=1)}
    assert all(batched[qid] == text for qid, text in single.items())
    # The shared image prefix and the padding between it and each question change no answer: the same
    # prompt run whole answers the same.
    for record in records[:6]:
        assert batched[record.id] == answer(model, processor, record.image, record.question, max_new_tokens=64)


def test_auroc_is_the_chance_a_yes_scores_above_a_no_with_ties_counting_half():
    labels = np.array([True, False, True, False])
    assert auroc(labels, np.array([0.9, 0.8, 0.3, 0.1])) == 0.75  # 3 of the 4 yes-no pairs in order
    assert auroc(labels, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert auroc(labels, np.array([0.9, 0.1, 0.8, 0.2])) == 1.0


def test_calibration_is_the_brier_score_and_the_gap_between_p_yes_and_the_yes_share_per_bin():
    labels = np.array([True, False, True, False])
    got = calibration(labels, np.array([0.9, 0.8, 0.3, 0.1]))  # a bin each
    assert got["brier"] == pytest.approx((0.1**2 + 0.8**2 + 0.7**2 + 0.1**2) / 4)
    assert got["ece"] == pytest.approx((0.1 + 0.8 + 0.7 + 0.1) / 4)
    unsure = calibration(labels, np.full(4, 0.5))  # half yes at P(yes) 0.5: calibrated, uninformative
    assert (unsure["brier"], unsure["ece"]) == (0.25, 0.0)
    assert calibration(np.array([True, False]), np.array([1.0, 0.0]))["ece"] == 0.0  # 1.0 falls in the top bin


def test_each_answer_carries_its_p_yes_and_closed_questions_are_ranked_by_it(model_and_processor, test_set):
    model, processor = model_and_processor
    records = load_llava_med(test_set)
    yes, no = yes_no_tokens(processor.tokenizer)
    assert yes and no and not set(yes) & set(no)
    got = {r.id: p for r, _, _, p in generate_answers(model, processor, records, batch_size=5)}
    for record in records[:3]:  # the first token's distribution of the whole prompt, run alone
        prompt = processor.chat_prompt(question_messages(record.question))
        inputs = processor([prompt], images=[record.image])
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
        p = torch.softmax(logits.float(), dim=-1)
        assert math.isclose(got[record.id], float(p[yes].sum() / (p[yes].sum() + p[no].sum())), rel_tol=1e-4)

    ranked = closed_auroc(records, got)
    closed = [r for r in records if r.answer_type == "CLOSED" and normalize_answer(r.answer) in ("yes", "no")]
    assert ranked["n_yes"] + ranked["n_no"] == len(closed)
    assert ranked["interval"][0] <= ranked["auroc"] <= ranked["interval"][1]
    assert closed_auroc(records, {}) is None  # an API's answers carry no P(yes)


def test_questions_about_slices_of_one_volume_are_answered_about_their_own_slice(model_and_processor, tmp_path):
    model, processor = model_and_processor
    voxels = np.random.default_rng(0).integers(-1000, 1000, size=(40, 30, 3), dtype=np.int16)
    nibabel.save(nibabel.Nifti1Image(voxels, np.eye(4)), tmp_path / "ct.nii.gz")
    turns = [{"from": "human", "value": "<image>\nIs it normal?"}, {"from": "gpt", "value": "yes"}]
    rows = [
        {"id": f"q{k}{i}", "image": "ct.nii.gz", "frame": k, "conversations": turns} for k in (0, 2) for i in (0, 1)
    ]
    (tmp_path / "test.json").write_text(
        json.dumps([*rows, {"id": "middle", "image": "ct.nii.gz", "conversations": turns}])
    )
    records = load_llava_med(tmp_path / "test.json")
    assert len({r.image_key for r in records}) == 3  # slices 0, 2 and the middle one (1) are three images
    batched = {r.id: text for r, _, text, _ in generate_answers(model, processor, records, batch_size=4)}
    for record in records:
        shown = load_image(tmp_path / "ct.nii.gz", frame=record.frame)
        assert batched[record.id] == answer(model, processor, shown, record.question, max_new_tokens=64)


def test_an_interrupted_run_resumes_without_repeating_or_losing_answers(model_and_processor, test_set, tmp_path):
    model, processor = model_and_processor
    records = load_llava_med(test_set)
    path = tmp_path / "answers.jsonl"
    first = run(model, processor, records[:3], path, model_id="m", batch_size=2)
    kept = path.read_text().splitlines()
    path.write_text("\n".join(kept) + '\n{"question_id": "cut-off li')  # killed mid-line
    answers = run(model, processor, records, path, model_id="m", batch_size=2)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [row["question_id"] for row in rows[:3]] == list(first) and rows[:3] == [json.loads(k) for k in kept]
    assert sorted(row["question_id"] for row in rows) == sorted(r.id for r in records) == sorted(answers)
    assert answers == run(model, processor, records, tmp_path / "uninterrupted.jsonl", model_id="m", batch_size=2)


def test_eval_and_score_commands_use_the_llava_med_answer_format(built_model_dir, test_set, tmp_path, capsys):
    out = tmp_path / "eval"
    published = tmp_path / "published.yaml"
    published.write_text(
        "source: a test's own table\nrows:\n"
        "  - {model: model A, benchmark: llava-med, open: 12.5, closed: 50}\n"
        "  - {model: model B, benchmark: slake, open: 40, closed: 60}\n"
    )
    args = ["--model", str(built_model_dir), "--data", str(test_set), "--out", str(out), "--max-new-tokens", "3"]
    assert main(["eval", *args, "--compare", str(published)]) == 0
    report = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    assert "| all |" in markdown and "Source: a test's own table" in markdown
    assert re.search(r"\| model A \| 12\.50( \*)? \| 50\.00( \*)? \|", markdown) and "model B" not in markdown
    low, high = report["intervals"]["closed_accuracy"]
    assert low <= report["scores"]["all"]["closed_accuracy"] <= high and "% intervals, all questions" in markdown
    records = load_llava_med(test_set)
    assert report["scores"]["all"]["n_closed"] + report["scores"]["all"]["n_open"] == len(records)
    assert report["majority_closed_baseline"] == majority_baseline(records)
    assert report["dtype"] == "float32"  # a CPU's default precision
    assert 0 < report["peak_memory_gib"] < 64
    row = json.loads((out / "answers.jsonl").read_text().splitlines()[0])
    assert set(row) >= {"question_id", "prompt", "text", "answer_id", "model_id"}
    with (out / "answers.csv").open(newline="") as table:  # each answer beside its reference, scored
        lines = list(csv.DictReader(table))
    assert [line["question_id"] for line in lines] == [r.id for r in records]
    assert [line["reference"] for line in lines] == [r.answer for r in records]
    for kind, figure in (("CLOSED", "closed_accuracy"), ("OPEN", "open_recall")):
        kept = [float(line["score"]) for line in lines if line["answer_type"] == kind]
        assert sum(kept) / len(kept) == pytest.approx(report["scores"]["all"][figure])
    assert not (out / "answers_by_image.csv").exists()  # no image was asked about at several slices
    assert 0 <= row["metadata"]["p_yes"] <= 1 and "AUROC" in markdown
    assert report["closed_auroc"] == closed_auroc(records, yes_probabilities(read_answers(out / "answers.jsonl")))
    capsys.readouterr()
    assert main(["score", "--gt", str(test_set), "--pred", str(out / "answers.jsonl"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == report["scores"]
    score_args = ["score", "--gt", str(test_set), "--pred", str(out / "answers.jsonl")]
    assert main([*score_args, "--against", str(out / "answers.jsonl")]) == 0
    assert "closed: +0.00 points (95 % interval +0.00 to +0.00)" in capsys.readouterr().out
    assert main([*score_args, "--against", str(out / "answers.jsonl"), "--json"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert both["scores"] == report["scores"] and both["against"]["closed_accuracy"]["difference"] == 0.0


def test_table_sets_runs_side_by_side_as_papers_print_them(built_model_dir, test_set, tmp_path, capsys):
    runs = [tmp_path / "plain", tmp_path / "short"]
    for folder in runs:
        args = ["--data", str(test_set), "--out", str(folder), "--prompt", folder.name, "--max-new-tokens", "3"]
        assert main(["eval", "--model", str(built_model_dir), *args]) == 0
    system = ["--system", "You are a radiologist reading abdominal CT and MR slices."]
    assert main(["eval", "--model", str(built_model_dir), *args[:3], str(tmp_path / "system"), *system]) == 0
    published = tmp_path / "published.yaml"
    published.write_text(
        "source: a test's own table\nrows:\n  - {model: A, benchmark: slake, open: 12.5, closed: 50}\n"
    )
    capsys.readouterr()
    assert main(["table", *map(str, runs), "--published", str(published)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| model | SLAKE open | SLAKE closed | LLaVA-Med format open | LLaVA-Med format closed |"
    plain = json.loads((runs[0] / "report.json").read_text())["scores"]["all"]
    figures = f"{100 * plain['open_recall']:.2f} | {100 * plain['closed_accuracy']:.2f}"
    assert lines[2] == f"| {built_model_dir} | - | - | {figures} |"
    assert lines[3].startswith(f"| {built_model_dir} (short prompt) | - | - |")
    assert lines[4:] == ["| A (published) | 12.50 | 50.00 | - | - |"]
    assert main(["table", str(runs[0]), str(tmp_path / "system")]) == 0
    named = f"| {built_model_dir} (system 'You are a radiologist reading abdominal…') | "
    assert capsys.readouterr().out.splitlines()[3].startswith(named)
    assert "after the system message 'You are a radiologist" in (tmp_path / "system" / "report.md").read_text()

    assert main(["table", str(runs[0]), "--format", "latex", "--intervals"]) == 0
    latex = capsys.readouterr().out.splitlines()
    assert latex[0] == r"\begin{tabular}{lrr}" and latex[-1] == r"\end{tabular}"
    assert re.fullmatch(r".* & \d+\.\d\d \(\d+\.\d-\d+\.\d\) & \d+\.\d\d \(\d+\.\d-\d+\.\d\) \\\\", latex[4])
    assert main(["table", str(runs[0]), "--auroc"]) == 0
    ranked = json.loads((runs[0] / "report.json").read_text())["closed_auroc"]
    assert capsys.readouterr().out.splitlines()[2] == f"| {built_model_dir} | {figures} | {ranked['auroc']:.3f} |"
    assert main(["table", str(runs[0]), str(runs[0])]) == 1
    assert f"two runs of {built_model_dir} on llava-med" in capsys.readouterr().err
    assert main(["table", str(tmp_path)]) == 1
    assert "no report.json" in capsys.readouterr().err


def test_eval_samples_at_a_temperature_with_a_seed_that_repeats_its_answers(
    built_model_dir, test_set, tmp_path, capsys
):
    def answers(name: str, *flags: str) -> list[dict]:
        args = ["eval", "--model", str(built_model_dir), "--data", str(test_set), "--out", str(tmp_path / name)]
        assert main([*args, "--max-new-tokens", "6", *flags]) == 0
        return [json.loads(line) for line in (tmp_path / name / "answers.jsonl").read_text().splitlines()]

    def texts(rows: list[dict]) -> list[str]:
        return [row["text"] for row in rows]

    greedy = answers("greedy")
    sampled = answers("sampled", "--temperature", "1.0", "--seed", "1")
    assert texts(sampled) == texts(answers("again", "--temperature", "1", "--seed", "1"))
    assert texts(sampled) != texts(answers("other seed", "--temperature", "1.0", "--seed", "2"))
    assert texts(sampled) != texts(greedy)
    assert [r["metadata"]["p_yes"] for r in sampled] == [r["metadata"]["p_yes"] for r in greedy]  # before any draw
    report = json.loads((tmp_path / "sampled" / "report.json").read_text())
    assert report["sampling"] == {"temperature": 1.0, "top_p": 1.0, "seed": 1} and "sampling" not in json.loads(
        (tmp_path / "greedy" / "report.json").read_text()
    )
    assert "sampled at temperature 1, top-p 1, seed 1" in (tmp_path / "sampled" / "report.md").read_text()

    args = ["eval", "--model", str(built_model_dir), "--data", str(test_set), "--out", str(tmp_path / "sampled")]
    assert main([*args, "--max-new-tokens", "6", "--temperature", "1.0", "--seed", "3"]) == 1  # another seed
    assert main([*args, "--seed", "3"]) == 1
    errors = capsys.readouterr().err
    assert "other settings (sampling" in errors and "--seed: only with a --temperature above 0" in errors


def test_answer_answers_a_question_file_without_references_in_its_order_and_resumes(
    model_and_processor, built_model_dir, test_set, tmp_path, capsys
):
    images = test_set.parent / "images"
    ct = sorted(images.iterdir())[0]
    questions = [
        {"question_id": 7, "image": ct.name, "text": "Is there a lesion?"},
        {"id": "b", "image": ct.name, "question": "Which organ is shown?"},  # llama3med's own field names too
        {"question_id": "c", "image": sorted(images.iterdir())[1].name, "text": "<image>\nIs it normal?"},
    ]
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    args = ["answer", str(path), "--model", str(built_model_dir), "--image-root", str(images)]
    args += ["--out", str(tmp_path / "run"), "--max-new-tokens", "4"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "answers.jsonl").read_text().splitlines()]
    assert [row["question_id"] for row in rows] == ["7", "b", "c"]
    model, processor = model_and_processor
    asked = ["Is there a lesion?", "Which organ is shown?", "Is it normal?"]
    for row, question, text in zip(rows, questions, asked, strict=True):
        assert row["text"] == answer(model, processor, images / question["image"], text, max_new_tokens=4)
    (tmp_path / "run" / "answers.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[:2]))
    assert main(args) == 0  # resumed: only the missing answer is made again
    again = [json.loads(line) for line in (tmp_path / "run" / "answers.jsonl").read_text().splitlines()]
    assert [row["answer_id"] for row in again[:2]] == [row["answer_id"] for row in rows[:2]] and len(again) == 3
    path.write_text(json.dumps({"question_id": 1, "image": ct.name, "text": " "}) + "\n")
    assert main(args) == 1
    assert f"{path}: record 1: empty question" in capsys.readouterr().err


def torchrun_cli(*args) -> None:
    """`llama3med ARGS` in two CPU processes under torchrun (gloo), as a user starts it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "llama3med.cli", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def test_answer_asks_each_question_about_every_image_in_a_folder_tree(built_model_dir, tmp_path, capsys):
    cohort = tmp_path / "cohort"
    series, patient2 = cohort / "patient1" / "ct", cohort / "patient2"
    series.mkdir(parents=True)
    patient2.mkdir()
    slices = np.random.default_rng(0).integers(0, 2000, size=(3, 32, 32)).astype(np.uint16)
    study, uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for k in range(3):  # named as PACS exports name them
        write_dicom(series / f"IM{k:04d}", slices[k], intercept=-1000, study_uid=study, series_uid=uid)
    write_dicom(patient2 / "chest.dcm", slices[0], modality="DX")
    nibabel.save(nibabel.Nifti1Image(slices.transpose(1, 2, 0).astype(np.int16), np.eye(4)), patient2 / "mr.nii.gz")
    load_image(series).save(patient2 / "screenshot.png")
    (patient2 / "notes.txt").write_text("not an image")
    (cohort / ".cache").mkdir()
    write_dicom(cohort / ".cache" / "copy.dcm", slices[0])
    images = [series, patient2 / "chest.dcm", patient2 / "mr.nii.gz", patient2 / "screenshot.png"]
    assert find_images(cohort) == images
    singles = tmp_path / "singles"  # files each of its own series (as `data phantoms` writes them) or of none
    singles.mkdir()
    for name in ("a.dcm", "b.dcm", "c.dcm", "d.dcm"):
        write_dicom(singles / name, slices[0])
    for name in ("c.dcm", "d.dcm"):
        without = pydicom.dcmread(singles / name)
        del without.SeriesInstanceUID
        without.save_as(singles / name)
    assert find_images(singles) == sorted(singles.iterdir())

    out = tmp_path / "answers"
    args = ["answer", str(cohort), "--model", str(built_model_dir), "--out", str(out), "--max-new-tokens", "3"]
    assert main([*args, "--question", "Is it normal?", "--question", "Which organ is shown?"]) == 0
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    names = ["patient1/ct", "patient2/chest.dcm", "patient2/mr.nii.gz", "patient2/screenshot.png"]
    assert [row["question_id"] for row in rows] == [f"{name}#{n}" for name in names for n in (1, 2)]
    model, processor = load(built_model_dir)
    assert rows[0]["text"] == answer(model, processor, load_image(series), "Is it normal?", max_new_tokens=3)

    with (out / "answers.csv").open(newline="") as table:  # the answers beside what a PACS finds them by
        lines = list(csv.DictReader(table))
    assert [(line["question_id"], line["answer"]) for line in lines] == [(r["question_id"], r["text"]) for r in rows]
    shown = pydicom.dcmread(dicom_series(series)[1])  # the middle of three slices
    assert {k: lines[0][k] for k in ("image", "modality", "series_instance_uid", "sop_instance_uid")} == {
        "image": str(series),
        "modality": "CT",
        "series_instance_uid": shown.SeriesInstanceUID,
        "sop_instance_uid": shown.SOPInstanceUID,
    }
    assert lines[0]["study_instance_uid"] == study
    assert lines[2]["modality"] == "DX" and lines[2]["sop_instance_uid"] == pydicom.dcmread(images[1]).SOPInstanceUID
    assert lines[4]["sop_instance_uid"] == lines[6]["sop_instance_uid"] == ""  # NIfTI and PNG have none
    assert float(lines[0]["p_yes"]) == rows[0]["metadata"]["p_yes"]

    sliced = tmp_path / "sliced"  # a series and a volume at every second slice, from the feet
    slice_args = [*args, "--question", "Is it normal?", "--slice-step", "2", "--out", str(sliced)]
    assert main(slice_args) == 0
    rows = [json.loads(line) for line in (sliced / "answers.jsonl").read_text().splitlines()]
    names = ["patient1/ct@0", "patient1/ct@2", "patient2/chest.dcm", "patient2/mr.nii.gz@0", "patient2/mr.nii.gz@2"]
    assert [row["question_id"] for row in rows] == [*names, "patient2/screenshot.png"]
    assert rows[1]["text"] == answer(model, processor, load_image(series, frame=2), "Is it normal?", max_new_tokens=3)
    with (sliced / "answers.csv").open(newline="") as table:
        lines = list(csv.DictReader(table))
    top = pydicom.dcmread(dicom_series(series)[2])
    assert (lines[1]["frame"], lines[1]["sop_instance_uid"]) == ("2", top.SOPInstanceUID)
    with (sliced / "answers_by_image.csv").open(newline="") as table:  # the slice to open first, per series
        summary = list(csv.DictReader(table))
    assert [(line["image"], line["slices"]) for line in summary] == [
        (str(series), "2"),
        (str(patient2 / "chest.dcm"), "1"),
        (str(patient2 / "mr.nii.gz"), "2"),
        (str(patient2 / "screenshot.png"), "1"),
    ]
    likeliest = max(lines[:2], key=lambda line: float(line["p_yes"]))
    assert (summary[0]["frame_of_max_p_yes"], summary[0]["sop_instance_uid"]) == (
        likeliest["frame"],
        likeliest["sop_instance_uid"],
    )
    said = [next((w for w in normalize_answer(line["answer"]).split() if w in ("yes", "no")), "") for line in lines[:2]]
    assert (summary[0]["answered_yes"], summary[0]["answered_no"]) == (str(said.count("yes")), str(said.count("no")))
    assert not (out / "answers_by_image.csv").exists()  # one slice of each: nothing to sum up
    questions = ["answer", str(tmp_path / "questions.jsonl"), "--model", str(built_model_dir), "--out", str(sliced)]
    assert main([*questions, "--slice-step", "2"]) == 1
    assert "--slice-step: for a folder of images" in capsys.readouterr().err
    assert main([*args, "--question", "Is it abnormal?"]) == 1  # the same --out, another question
    assert "other settings (question" in capsys.readouterr().err

    for path in sorted(series.iterdir())[:2]:
        record = pydicom.dcmread(path)
        record.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"  # two of the three slices: another series
        record.save_as(path)
    write_dicom(series / "IM0003", slices[0], intercept=-1000, series_uid=uid)
    assert main([*args, "--question", "Is it normal?", "--out", str(tmp_path / "other")]) == 1
    assert f"{series}: holds 2 DICOM series; give each series a folder of its own" in capsys.readouterr().err


def test_answer_shows_dicom_through_each_records_window_or_the_one_asked_for(built_model_dir, tmp_path, capsys):
    ct = write_dicom(tmp_path / "ct.dcm", np.arange(1024, dtype=np.uint16).reshape(32, 32) * 2, intercept=-1000)
    questions = tmp_path / "questions.jsonl"
    rows = [
        {"question_id": "own", "image": "ct.dcm", "text": "Is it normal?", "window": [-600, 1500]},
        {"question_id": "default", "image": "ct.dcm", "text": "Is it normal?"},
    ]
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    records = load_questions(questions, tmp_path, window="bone")
    assert [r.window for r in records] == [(-600.0, 1500.0), "bone"]
    assert records[0].image_key != records[1].image_key  # one file shown two ways: two images to encode

    args = ["answer", str(questions), "--model", str(built_model_dir), "--image-root", str(tmp_path)]
    args += ["--max-new-tokens", "3", "--window", "bone", "--out", str(tmp_path / "out")]
    assert main(args) == 0 and main(args) == 0  # the rerun resumes: the same window, nothing left to answer
    got = {row["question_id"]: row["text"] for row in map(json.loads, (tmp_path / "out" / "answers.jsonl").open())}
    model, processor = load(built_model_dir)
    shown = {"own": load_image(ct, window=(-600, 1500)), "default": load_image(ct, window="bone")}
    assert shown["own"].tobytes() != shown["default"].tobytes()
    assert got == {
        key: answer(model, processor, image, "Is it normal?", max_new_tokens=3) for key, image in shown.items()
    }

    rows[0]["window"] = "sharp"
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main([*args[:-2], "--out", str(tmp_path / "bad")]) == 1
    assert "record own: window must be CENTRE,WIDTH or one of" in capsys.readouterr().err


def test_each_process_keeps_its_share_of_the_images_however_far_the_others_have_got(tmp_path):
    records = [
        VQARecord(f"{image}-{q}", Path(f"{image}.png"), "Is it?", "yes", "CLOSED", "t")
        for image in "abc"
        for q in (0, 1)
    ]
    answers = tmp_path / "answers.jsonl"
    alone = {rank: unanswered_share(records, answers, rank, 2) for rank in (0, 1)}
    assert [r.id for r in alone[0]] == ["a-0", "a-1", "c-0", "c-1"] and [r.id for r in alone[1]] == ["b-0", "b-1"]
    (tmp_path / "answers.part1.jsonl").write_text(
        "".join(json.dumps({"question_id": r.id, "text": "yes"}) + "\n" for r in alone[1])
    )
    assert unanswered_share(records, answers, 0, 2) == alone[0]  # process 1 has already answered its image
    (tmp_path / "answers.part0.jsonl").write_text(json.dumps({"question_id": "a-0", "text": "no"}) + "\n")
    assert [r.id for r in unanswered_share(records, answers, 0, 2)] == ["a-1", "c-0", "c-1"]  # resumed


def test_two_processes_under_torchrun_share_the_images_and_write_one_file_in_benchmark_order(
    built_model_dir, test_set, tmp_path
):
    args = ["eval", "--model", str(built_model_dir), "--data", str(test_set), "--max-new-tokens", "4"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    torchrun_cli(*args, "--out", tmp_path / "two")

    def answers(name):
        return [(row["question_id"], row["text"]) for row in map(json.loads, open(tmp_path / name / "answers.jsonl"))]

    assert answers("two") == answers("one")
    assert [qid for qid, _ in answers("one")] == [r.id for r in load_llava_med(test_set)]  # LLaVA-Med's order
    assert not list((tmp_path / "two").glob("answers.part*"))

    def report(name):  # the results; the memory each run took is its own
        fields = json.loads((tmp_path / name / "report.json").read_text())
        return {key: value for key, value in fields.items() if key != "peak_memory_gib"}

    assert report("two") == report("one")


def test_answer_under_torchrun_writes_the_answers_of_one_process(built_model_dir, test_set, tmp_path):
    questions = [{"question_id": r.id, "image": r.image.name, "text": r.question} for r in load_llava_med(test_set)]
    path = test_set.parent / "questions.json"
    path.write_text(json.dumps(questions))
    args = ["answer", str(path), "--model", str(built_model_dir), "--max-new-tokens", "4"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    torchrun_cli(*args, "--out", tmp_path / "two")
    one, two = ((tmp_path / name / "answers.jsonl").read_text().splitlines() for name in ("one", "two"))
    assert [json.loads(row)["text"] for row in two] == [json.loads(row)["text"] for row in one]
    assert [json.loads(row)["question_id"] for row in two] == [q["question_id"] for q in questions]


def test_a_compiled_language_model_answers_the_same(built_model_dir, test_set, tmp_path):
    args = ["eval", "--model", str(built_model_dir), "--data", str(test_set), "--max-new-tokens", "6"]
    assert main([*args, "--out", str(tmp_path / "eager")]) == 0
    assert main([*args, "--out", str(tmp_path / "compiled"), "--compile"]) == 0

    def texts(name):
        return [json.loads(line)["text"] for line in open(tmp_path / name / "answers.jsonl")]

    assert texts("compiled") == texts("eager")


def test_a_run_resumes_from_the_parts_an_interrupted_sharded_run_left(built_model_dir, test_set, tmp_path):
    args = ["eval", "--model", str(built_model_dir), "--data", str(test_set), "--max-new-tokens", "4"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    whole = (tmp_path / "whole" / "answers.jsonl").read_text().splitlines()
    (tmp_path / "resumed").mkdir()
    (tmp_path / "resumed" / "answers.part1.jsonl").write_text("\n".join(whole[:3]) + '\n{"question_id": "cut')
    assert main([*args, "--out", str(tmp_path / "resumed")]) == 0
    resumed = (tmp_path / "resumed" / "answers.jsonl").read_text().splitlines()
    assert resumed[:3] == whole[:3]  # kept as written, not answered again
    assert [json.loads(line)["text"] for line in resumed] == [json.loads(line)["text"] for line in whole]
    assert not list((tmp_path / "resumed").glob("answers.part*"))


def test_a_run_resumed_with_other_settings_is_refused_before_it_answers(built_model_dir, test_set, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["eval", "--model", str(built_model_dir), "--data", str(test_set), "--out", str(out), "--limit", "2"]
    assert main([*args, "--max-new-tokens", "2"]) == 0
    answers = (out / "answers.jsonl").read_text()
    assert main([*args, "--max-new-tokens", "2", "--prompt", "short", "--fp8"]) == 1
    error = capsys.readouterr().err
    assert "its answers were made with other settings (prompt 'plain' -> 'short'; fp8 False -> True)" in error
    assert (out / "answers.jsonl").read_text() == answers
    assert main([*args[:-1], "3", "--max-new-tokens", "2"]) == 0  # the same settings resume, here to more questions
    assert (out / "answers.jsonl").read_text().startswith(answers)


def test_a_system_message_comes_before_every_question_and_a_resumed_run_keeps_to_it(
    built_model_dir, test_set, tmp_path, capsys
):
    system = "You are a radiologist. Answer in one word."
    out = tmp_path / "run"
    args = ["eval", "--model", str(built_model_dir), "--data", str(test_set), "--out", str(out), "--limit", "4"]
    assert main([*args, "--max-new-tokens", "3", "--system", system]) == 0
    model, processor = load(built_model_dir)
    rows = read_answers(out / "answers.jsonl")
    for record in load_llava_med(test_set)[:4]:
        question = prompt_text(record, "plain")
        assert rows[record.id]["prompt"] == processor.chat_prompt(question_messages(question, system))
        alone = answer(model, processor, record.image, question, max_new_tokens=3, window=record.window, system=system)
        assert rows[record.id]["text"] == alone
    report = json.loads((out / "report.json").read_text())
    assert report["system"] == system
    spec = {"data": str(test_set), "limit": 4, "max_new_tokens": 3, "system": system}
    while_training = VQAEvalCallback(spec, tmp_path / "training").evaluate(model, processor)[0]
    for figure in ("closed_accuracy", "open_recall"):  # as a recipe's vqa_eval asks, with the same message
        assert while_training[figure] == report["scores"]["all"][figure]
    assert main([*args, "--max-new-tokens", "3"]) == 1  # resumed without it
    assert f"other settings (system {system!r} -> None)" in capsys.readouterr().err
    assert main([*args, "--max-new-tokens", "3", "--temperature", "1"]) == 1
    assert "sampling None -> {'temperature': 1.0" in capsys.readouterr().err


def test_a_sampled_run_resumed_greedily_is_refused(built_model_dir, test_set, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["eval", "--model", str(built_model_dir), "--data", str(test_set), "--out", str(out), "--limit", "2"]
    assert main([*args, "--max-new-tokens", "2", "--temperature", "0.7"]) == 0
    assert main([*args, "--max-new-tokens", "2"]) == 1
    assert "other settings (sampling {'temperature': 0.7, 'top_p': 1.0, 'seed': 0} -> None)" in capsys.readouterr().err


def test_a_published_results_file_is_checked_row_by_row(tmp_path):
    published = tmp_path / "published.yaml"
    published.write_text("source: paper\nrows:\n  - {model: m, benchmark: slake, open: high, closed: 1}\n")
    with pytest.raises(ValueError, match="published.yaml: row 0: 'open' is missing or not a number"):
        load_published(published)


def test_malformed_benchmark_records_are_refused_by_name(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    bad = [{"id": "q7", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}]}]
    (tmp_path / "test.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="record q7: needs conversations with a question and an answer"):
        load_llava_med(tmp_path / "test.json")
