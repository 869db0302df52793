"""Multiple-choice benchmarks (PMC-VQA, or any LLaVA-Med-format record with `options`): read from the
release's own CSV, asked with lettered options as LLaVA-1.5 asks them, scored by the option each answer
picks, and, for models never taught to answer with a letter, answered by ranking the options' texts."""

import csv
import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llama3med.checkpoints import DEMO_MODEL_DIR, load
from llama3med.cli import main
from llama3med.data.benchmarks import VQARecord, load_benchmark, load_llava_med, load_questions, prompt_text
from llama3med.data.phantoms import write_phantom_set
from llama3med.eval import choice_chance, chosen_option, confidence_intervals, paired_difference, score
from llama3med.eval.report import comparison_rows, load_published
from llama3med.eval.scoring import option_probabilities
from llama3med.explain import answer_relevance
from llama3med.inference import question_messages
from llama3med.train.recipe import check_vqa_eval
from llama3med.train.vqa_eval import VQAEvalCallback

PMC_VQA_COLUMNS = ["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"]


def write_pmc_vqa_csv(path, rows, columns=PMC_VQA_COLUMNS):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)


def pmc_row(image, question, options, right, **extra):
    """A row as PMC-VQA writes it: each choice " A:text ", the answer's text and its letter."""
    row = {"Figure_path": image, "Question": question, "Answer": options[right], "Answer_label": "ABCD"[right]}
    for i, letter in enumerate("ABCD"):
        row[f"Choice {letter}"] = f" {letter}:{options[i]} " if i < len(options) else ""
    return {**row, **extra}


def test_pmc_vqa_csv_is_read_with_its_lettered_options_and_the_right_letter(tmp_path):
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "PMC1_F1.jpg").write_bytes(b"")
    rows = [
        pmc_row("PMC1_F1.jpg", "Which organ is shown?", ["liver", "kidney", "spleen", "lung"], 1),
        pmc_row("PMC1_F1.jpg", "What modality is this?", ["CT", "MRI", "ultrasound"], 0),  # Choice D left empty
        {**pmc_row("PMC1_F1.jpg", "Which side?", ["left", "right"], 1), "Choice C": " C: ", "Choice D": " D:"},
    ]
    write_pmc_vqa_csv(tmp_path / "test_2.csv", rows)
    records = load_benchmark("pmc-vqa", tmp_path, split="test_2")
    assert [r.id for r in records] == ["test_2-000000", "test_2-000001", "test_2-000002"]
    assert records[0].options == ("liver", "kidney", "spleen", "lung") and records[0].answer == "B"
    assert records[1].options == ("CT", "MRI", "ultrasound") and records[1].answer == "A"
    assert records[2].options == ("left", "right")  # letters with no text after them are no options
    assert {r.answer_type for r in records} == {"CHOICE"} and {r.dataset for r in records} == {"pmc-vqa"}
    assert records[0].image == tmp_path / "figures" / "PMC1_F1.jpg"  # the folder PMC-VQA's images unpack to

    # the first release's layout: no Answer_label, the letter or the option's text in Answer
    first = [
        {**pmc_row("PMC1_F1.jpg", "Which side?", ["left", "right"], 1), "Answer": "B"},
        {**pmc_row("PMC1_F1.jpg", "Which side?", ["left", "right"], 0), "Answer": "left"},
    ]
    columns = [c for c in PMC_VQA_COLUMNS if c != "Answer_label"]
    write_pmc_vqa_csv(tmp_path / "first" / "test.csv", [{k: r[k] for k in columns} for r in first], columns)
    records = load_benchmark("pmc-vqa", tmp_path / "first" / "test.csv", check_images=False)
    assert [r.answer for r in records] == ["B", "A"]


def test_malformed_pmc_vqa_rows_are_refused_by_file_and_row(tmp_path):
    good = pmc_row("a.jpg", "Which organ?", ["liver", "kidney"], 0)
    cases = [
        ({**good, "Answer_label": "", "Answer": "heart"}, "row 2: answer 'heart' is neither an option's letter"),
        ({**good, "Choice B": "", "Choice C": " C:spleen "}, "row 2: empty option B"),
        ({**good, "Question": " "}, "row 2: empty question"),
    ]
    for row, message in cases:
        write_pmc_vqa_csv(tmp_path / "test.csv", [good, row][1:])
        with pytest.raises(ValueError, match=message):
            load_benchmark("pmc-vqa", tmp_path, check_images=False)
    write_pmc_vqa_csv(tmp_path / "test.csv", [good])
    with pytest.raises(ValueError, match="image .*a.jpg not found"):
        load_benchmark("pmc-vqa", tmp_path)
    (tmp_path / "images_2.zip").write_bytes(b"")  # the release's images, still zipped
    with pytest.raises(ValueError, match="no image folder .* but images_2.zip: unzip the release's images there"):
        load_benchmark("pmc-vqa", tmp_path)
    assert load_benchmark("pmc-vqa", tmp_path, check_images=False)  # scoring needs no images
    write_pmc_vqa_csv(tmp_path / "bare.csv", [{"Figure_path": "a.jpg"}], ["Figure_path"])
    with pytest.raises(ValueError, match="not a PMC-VQA CSV"):
        load_benchmark("pmc-vqa", tmp_path / "bare.csv")
    with pytest.raises(ValueError, match=r"test_clean.csv: PMC-VQA CSV not found \(the folder has bare.csv, test"):
        load_benchmark("pmc-vqa", tmp_path, split="test_clean")


def test_a_multiple_choice_question_is_asked_with_lettered_options_as_llava_1_5_asks_them():
    record = VQARecord("q", b"", "Which organ?", "B", "CHOICE", "pmc-vqa", options=("liver", "kidney"))
    expected = "Which organ?\nA. liver\nB. kidney\nAnswer with the option's letter from the given choices directly."
    assert prompt_text(record, "plain") == prompt_text(record, "short") == expected
    assert prompt_text(record, "short", options=False) == (
        "Which organ?\nAnswer the question using a single word or phrase."
    )


def test_the_option_an_answer_picks_is_read_from_its_letter_or_else_its_text():
    options = ["liver", "liver cyst", "kidney", "spleen"]
    picks = {
        "B": "B",
        "(C)": "C",
        "d.": "D",
        "B: liver cyst": "B",
        "A) liver": "A",
        "The answer is C.": "C",
        "Answer: (D)": "D",
        "liver cyst": "B",  # the wider of two options it holds
        "The liver.": "A",
        "It is the spleen": "D",
        "A mass in the liver": "A",  # "A" begins a sentence here; the text names the liver
        "kidney or spleen": None,  # two options
        "the answer is a cyst": None,  # "a" is an article, not option A
        "E": None,  # no such option
        "": None,
    }
    assert {answer: chosen_option(answer, options) for answer in picks} == picks


def choice_records(images: int, per_image: int = 2) -> list[VQARecord]:
    return [
        VQARecord(f"{i}-{j}", b"", "Which?", "B", "CHOICE", "pmc-vqa", options=("x", "y", "z", "w"), image_key=f"{i}")
        for i in range(images)
        for j in range(per_image)
    ]


def test_multiple_choice_accuracy_counts_answers_that_pick_no_option_as_wrong():
    records = choice_records(images=4)
    predictions = dict(zip([r.id for r in records], ["B", "y", "A", "no idea", "B", "B", "C", "(B)"], strict=True))
    scores = score(records, predictions)["all"]
    assert scores == {"n_closed": 0, "n_open": 0, "n_choice": 8, "choice_accuracy": 5 / 8, "choice_unread": 1 / 8}
    assert choice_chance(records) == 0.25
    low, high = confidence_intervals(records, predictions)["choice_accuracy"]
    assert low < 5 / 8 < high
    better = {**predictions, records[2].id: "B", records[3].id: "B"}
    difference = paired_difference(records, better, predictions)["choice_accuracy"]
    assert difference["difference"] == pytest.approx(2 / 8) and difference["interval"][0] >= 0


def test_llava_med_records_with_options_are_multiple_choice(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    turns = [{"from": "human", "value": "<image>\nWhich organ?"}, {"from": "gpt", "value": "kidney"}]
    record = {"id": "m1", "image": "a.png", "conversations": turns, "options": ["liver", "kidney"]}
    (tmp_path / "mc.json").write_text(json.dumps([record]))
    [loaded] = load_llava_med(tmp_path / "mc.json")
    assert (loaded.answer, loaded.answer_type, loaded.options) == ("B", "CHOICE", ("liver", "kidney"))
    refused = [
        ({**record, "answer_type": "OPEN"}, "m1: a record with options has answer_type CHOICE"),
        ({**record, "options": None, "answer_type": "CHOICE"}, "m1: answer_type CHOICE needs the question's 'options'"),
        ({**record, "options": ["liver"]}, "m1: a multiple-choice question needs 2 to 8 options"),
    ]
    for bad, message in refused:
        (tmp_path / "bad.json").write_text(json.dumps([bad]))
        with pytest.raises(ValueError, match=message):
            load_llava_med(tmp_path / "bad.json")


@pytest.fixture(scope="module")
def phantom_pmc_vqa(tmp_path_factory):
    """PMC-VQA's layout over phantom slices: each open phantom question (count, modality, size, organ,
    side) as a multiple-choice one, its answer among up to three wrong options of its kind."""
    root = tmp_path_factory.mktemp("pmc-vqa")
    write_phantom_set(root, n=12, seed=9, image_format="png")
    kinds = {"count": "0 1 2 3", "modality": "CT MRI X-ray ultrasound", "size": "small medium large"}
    kinds |= {"organ": "liver kidney spleen", "side": "left right"}
    rng, rows = random.Random(0), []
    for record in json.loads((root / "test.json").read_text()):
        if record["answer_type"] != "OPEN":
            continue
        answer = record["conversations"][1]["value"]
        wrong = [option for option in kinds[record["question_type"]].split() if option != answer]
        options = [answer, *rng.sample(wrong, k=min(3, len(wrong)))]
        rng.shuffle(options)
        question = record["conversations"][0]["value"].removeprefix("<image>\n")
        rows.append(pmc_row(record["image"], question, options, options.index(answer)))
    write_pmc_vqa_csv(root / "test.csv", rows)
    return root


def answer_rows(out) -> dict[str, dict]:
    return {row["question_id"]: row for row in map(json.loads, (out / "answers.jsonl").open())}


def test_eval_scores_the_option_each_answer_picks_and_table_prints_the_choice_column(phantom_pmc_vqa, tmp_path, capsys):
    out, published = tmp_path / "generated", tmp_path / "published.yaml"
    published.write_text("source: a test's own table\nrows:\n  - {model: theirs, benchmark: pmc-vqa, choice: 99.5}\n")
    args = ["--model", str(DEMO_MODEL_DIR), "--benchmark", "pmc-vqa", "--data", str(phantom_pmc_vqa)]
    assert main(["eval", *args, "--out", str(out), "--max-new-tokens", "4", "--compare", str(published)]) == 0
    records, rows = load_benchmark("pmc-vqa", phantom_pmc_vqa), answer_rows(out)
    assert all(prompt_text(r, "plain") in rows[r.id]["prompt"] for r in records)  # asked with its options
    report = json.loads((out / "report.json").read_text())
    assert report["scores"] == score(records, {qid: row["text"] for qid, row in rows.items()})
    assert report["scores"]["all"]["n_choice"] == len(records) and report["choice_chance"] == choice_chance(records)
    markdown = (out / "report.md").read_text()
    assert "| group | choice | choice unread | n choice |" in markdown
    assert "| model | choice |\n|---|---|\n" in markdown and "| theirs | 99.50 * |" in markdown
    capsys.readouterr()
    scoring = ["--benchmark", "pmc-vqa", "--gt", str(phantom_pmc_vqa), "--pred", str(out / "answers.jsonl")]
    assert main(["score", *scoring, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == report["scores"]
    assert main(["table", str(out), "--published", str(published)]) == 0
    accuracy = 100 * report["scores"]["all"]["choice_accuracy"]
    assert capsys.readouterr().out.splitlines() == [
        "| model | PMC-VQA choice |",
        "|---|---:|",
        f"| {DEMO_MODEL_DIR} | {accuracy:.2f} |",
        "| theirs (published) | 99.50 |",
    ]


def test_published_multiple_choice_figures_are_compared_with_this_runs_interval(tmp_path):
    report = {"model": "ours", "benchmark": "pmc-vqa", "scores": {"all": {"n_choice": 9, "choice_accuracy": 0.5}}}
    report["intervals"] = {"choice_accuracy": [0.4, 0.6]}
    published = {
        "rows": [
            {"model": "a", "benchmark": "pmc-vqa", "choice": 55.0},
            {"model": "b", "benchmark": "pmc-vqa", "choice": 70.0},
        ]
    }
    assert comparison_rows(report, published) == [["this run (ours)", "50.00"], ["a", "55.00"], ["b", "70.00 *"]]
    (tmp_path / "bad.yaml").write_text("source: paper\nrows:\n  - {model: m, benchmark: pmc-vqa, choice: high}\n")
    with pytest.raises(ValueError, match="row 0: 'choice' is missing or not a number"):
        load_published(tmp_path / "bad.yaml")


def whole_answer_log_prob(model, processor, record: VQARecord, option: str) -> float:
    """log P(the answer is `option`, then the end of the turn), from one forward over the whole prompt."""
    question = question_messages(prompt_text(record, "plain", options=False))
    encoded = processor.encode_conversation([*question, {"role": "assistant", "content": option}])
    targets = torch.tensor(encoded["labels"][1:])
    kept = targets != -100
    assert processor.tokenizer.decode(targets[kept]) == option + "<|eot_id|>"
    with torch.no_grad():
        features = model.encode_images(processor.preprocess_image(record.image)[None])
        embeds = model.embed_inputs(torch.tensor([encoded["input_ids"]]), features)
        logits = model.language_model(inputs_embeds=embeds).logits[0, :-1]
    return float(torch.log_softmax(logits[kept].float(), dim=-1).gather(1, targets[kept, None]).sum())


def test_ranked_options_are_their_likelihoods_as_the_whole_answer_and_beat_chance_on_phantoms(
    phantom_pmc_vqa, tmp_path, capsys
):
    out = tmp_path / "ranked"
    args = ["--model", str(DEMO_MODEL_DIR), "--benchmark", "pmc-vqa", "--data", str(phantom_pmc_vqa)]
    assert main(["eval", *args, "--out", str(out), "--rank-options", "--batch-size", "5"]) == 0
    records, rows = load_benchmark("pmc-vqa", phantom_pmc_vqa), answer_rows(out)
    model, processor = load(DEMO_MODEL_DIR)
    for record in records[:6]:  # options of one question fall into two forwards of 5 rows: padding checked too
        expected = [whole_answer_log_prob(model, processor, record, option) for option in record.options]
        assert rows[record.id]["metadata"]["option_log_probs"] == pytest.approx(expected, abs=1e-4)
        best = max(range(len(expected)), key=expected.__getitem__)
        assert rows[record.id]["text"] == f"{'ABCD'[best]}. {record.options[best]}"
        assert "\nA. " not in rows[record.id]["prompt"]  # asked as an open question
    report = json.loads((out / "report.json").read_text())
    assert report["rank_options"] is True and report["scores"]["all"]["choice_unread"] == 0
    assert report["scores"]["all"]["choice_accuracy"] > report["choice_chance"] + 0.3  # 0.78 against 0.30
    assert "options ranked by the model's likelihood" in (out / "report.md").read_text()
    sure = report["choice_calibration"]  # how sure the picks were, against how often right
    confidences = [max(option_probabilities(row["metadata"]["option_log_probs"])) for row in rows.values()]
    assert sure["mean_confidence"] == pytest.approx(sum(confidences) / len(confidences))
    assert sure["accuracy"] == pytest.approx(report["scores"]["all"]["choice_accuracy"]) and 0 <= sure["ece"] <= 1
    assert "ranked options (41 questions): picked with a mean probability" in (out / "report.md").read_text()

    capsys.readouterr()
    assert main(["eval", *args, "--out", str(out)]) == 1  # resumed without ranking: answers would mix
    assert "rank_options True -> False" in capsys.readouterr().err
    endpoint = ["--api-url", "http://127.0.0.1:9/v1", *args[2:], "--out", str(tmp_path / "api"), "--rank-options"]
    assert main(["eval", *endpoint]) == 1  # an endpoint gives no answer's likelihood
    assert "--rank-options: for a local --model" in capsys.readouterr().err


def test_answer_classifies_a_folder_by_ranking_options_and_gives_each_options_probability(phantom_pmc_vqa, tmp_path):
    out, question = tmp_path / "classified", "What imaging modality is this?"
    asked = ["answer", str(phantom_pmc_vqa / "images"), "--question", question, "--option", "CT", "--option", "MRI"]
    assert main([*asked, "--rank-options", "--model", str(DEMO_MODEL_DIR), "--out", str(out), "--heatmaps"]) == 0
    with (out / "answers.csv").open(newline="") as table:
        rows = list(csv.DictReader(table))
    truth = {
        record["image"]: record["conversations"][1]["value"]
        for record in json.loads((phantom_pmc_vqa / "test.json").read_text())
        if record["question_type"] == "modality" and record["answer_type"] == "OPEN"
    }
    assert sorted(row["image"].rsplit("/", 1)[1] for row in rows) == sorted(truth)
    for row in rows:
        probabilities = json.loads(row["option_probabilities"])
        assert set(probabilities) == {"CT", "MRI"} and sum(probabilities.values()) == pytest.approx(1)
        assert row["option"] == max(probabilities, key=probabilities.get) == truth[row["image"].rsplit("/", 1)[1]]
        assert row["answer"] == f"{'AB'[['CT', 'MRI'].index(row['option'])]}. {row['option']}"

    model, processor = load(DEMO_MODEL_DIR)  # a ranked answer's heat map explains the option it picked
    first = rows[0]
    numbers = json.loads((out / "heatmaps" / f"{first['question_id']}.json").read_text())
    expected = answer_relevance(model, processor, first["image"], question, first["option"])
    assert numbers["answer"] == first["option"]
    assert torch.tensor(numbers["relevance"]) == pytest.approx(expected.relevance, abs=1e-6)


def test_a_questions_file_may_give_each_question_options(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    question = {"question_id": "q1", "image": "a.png", "text": "Which view?", "options": ["PA", "lateral"]}
    without = {**question, "question_id": "q2", "options": None}
    (tmp_path / "questions.jsonl").write_text(json.dumps(question) + "\n" + json.dumps(without) + "\n")
    first, second = load_questions(tmp_path / "questions.jsonl")
    assert (first.options, second.options) == (("PA", "lateral"), ())
    (tmp_path / "questions.jsonl").write_text(json.dumps({**question, "options": ["PA", "PA"]}) + "\n")
    with pytest.raises(ValueError, match="q1: option 'PA' is given twice"):
        load_questions(tmp_path / "questions.jsonl")


def test_ask_ranks_the_options_given_and_prints_each_ones_probability(tmp_path, capsys):
    image, question = "examples/phantom_ct_lesion.dcm", "What imaging modality is this?"
    asked = ["ask", "--image", image, question, "--option", "MRI", "--option", "CT", "--rank-options"]
    assert main([*asked, "--heatmap", str(tmp_path / "where.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    model, processor = load(DEMO_MODEL_DIR)
    record = VQARecord("ask", Path(image), question, "", "", "ask", options=("MRI", "CT"))
    log_probs = [whole_answer_log_prob(model, processor, record, option) for option in record.options]
    p_mri, p_ct = option_probabilities(log_probs)
    assert lines[0] == "B. CT" and p_ct > 0.99  # the example is a CT slice
    assert lines[1:] == [f"P(MRI) {p_mri:.3f}", f"P(CT) {p_ct:.3f}"]
    expected = answer_relevance(model, processor, image, question, "CT").heat_map()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "where.png")), np.asarray(expected))

    assert main(["ask", "--image", image, question, "--rank-options"]) == 1
    assert "--rank-options: give the answers to rank, each with --option" in capsys.readouterr().err


def test_vqa_eval_while_training_ranks_options_as_eval_does(phantom_pmc_vqa, tmp_path):
    spec = {"benchmark": "pmc-vqa", "data": str(phantom_pmc_vqa), "rank_options": True, "batch_size": 5}
    model, processor = load(DEMO_MODEL_DIR)
    scores, _ = VQAEvalCallback(spec, tmp_path).evaluate(model, processor)
    assert (
        main(
            [
                "eval",
                "--model",
                str(DEMO_MODEL_DIR),
                "--benchmark",
                "pmc-vqa",
                "--data",
                str(phantom_pmc_vqa),
                "--out",
                str(tmp_path / "eval"),
                "--rank-options",
            ]
        )
        == 0
    )
    assert scores == json.loads((tmp_path / "eval" / "report.json").read_text())["scores"]["all"]
    with pytest.raises(ValueError, match="vqa_eval.rank_options must be true or false"):
        check_vqa_eval({**spec, "rank_options": "yes"})


def test_without_options_asks_multiple_choice_questions_as_open_ones_scored_against_the_right_text(
    phantom_pmc_vqa, tmp_path, capsys
):
    out = tmp_path / "blank"
    args = ["--model", str(DEMO_MODEL_DIR), "--benchmark", "pmc-vqa", "--data", str(phantom_pmc_vqa)]
    assert main(["eval", *args, "--out", str(out), "--without-options"]) == 0
    records = load_benchmark("pmc-vqa", phantom_pmc_vqa)
    rows = answer_rows(out)
    assert all(rows[r.id]["prompt"].count(r.question) == 1 and "\nA. " not in rows[r.id]["prompt"] for r in records)
    report = json.loads((out / "report.json").read_text())
    open_records = [
        replace(r, answer=r.options["ABCD".index(r.answer)], answer_type="OPEN", options=()) for r in records
    ]
    texts = {qid: row["text"] for qid, row in rows.items()}
    assert report["scores"] == score(open_records, texts) and report["without_options"] is True
    assert report["scores"]["all"]["n_open"] == len(records) and report["scores"]["all"]["open_recall"] > 0.5
    capsys.readouterr()
    assert main(["eval", *args, "--out", str(out)]) == 1  # resumed with the options: answers would mix
    assert "without_options True -> False" in capsys.readouterr().err
    assert main(["table", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "| model | PMC-VQA open | PMC-VQA closed |"
    scoring = ["score", "--benchmark", "pmc-vqa", "--gt", str(phantom_pmc_vqa), "--pred", str(out / "answers.jsonl")]
    assert main([*scoring, "--without-options", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == report["scores"]
