"""Where an answer came from (`llama3med.explain`, `ask --heatmap`, `chat`'s `/heatmap`, the page): each
image token's gradient x input for the answer's log-probability, checked against finite differences; on
phantoms the demo model never saw, heaviest on the lesions it is asked about, and the cells it ranks
highest are the ones the answer cannot do without."""

import base64
import io
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import Server, needs_node
from llama3med.checkpoints import DEMO_MODEL_DIR, load
from llama3med.cli import main
from llama3med.data.benchmarks import load_benchmark
from llama3med.data.phantoms import write_phantom_set
from llama3med.eval.runner import read_answers
from llama3med.explain import AnswerRelevance, answer_relevance, conversation_relevance, view
from llama3med.inference import question_messages
from llama3med.model import Llama3MedForConditionalGeneration
from llama3med.processing import IGNORE_INDEX

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
QUESTION = "Is there a lesion in this image?"


@pytest.fixture(scope="module")
def demo():
    return load(DEMO_MODEL_DIR)


def answer_log_probability(model, processor, features, answer) -> float:
    """log P(answer) given the image features: every supervised token of the chat, from the full logits."""
    encoded = processor.encode_conversation([*question_messages(QUESTION), {"role": "assistant", "content": answer}])
    input_ids, labels = torch.tensor([encoded["input_ids"]]), torch.tensor(encoded["labels"])
    with torch.no_grad():
        logits = model.language_model(inputs_embeds=model.embed_inputs(input_ids, features)).logits[0].double()
    log_p = torch.log_softmax(logits[:-1], dim=-1)
    kept = labels[1:] != IGNORE_INDEX
    return float(log_p[kept].gather(1, labels[1:][kept, None]).sum())


def test_relevance_is_how_much_scaling_each_tokens_features_moves_the_answers_log_probability():
    model, processor = load(DEMO_MODEL_DIR)
    model.double()  # the finite differences below are some ten-thousandths of a nat
    image = EXAMPLES / "phantom_ct_lesion.dcm"
    relevance = answer_relevance(model, processor, image, QUESTION, "yes").relevance
    assert relevance.shape == (model.config.image_grid,) * 2
    assert float(relevance.sum()) == pytest.approx(1.0) and bool((relevance >= 0).all())
    with torch.no_grad():
        features = model.encode_images(processor.preprocess_image(image)[None])
    slopes = {}
    for token in relevance.flatten().argsort(descending=True)[:3].tolist():
        moved = []
        for scale in (0.99, 1.01):
            scaled = features.clone()
            scaled[0, token] *= scale
            moved.append(answer_log_probability(model, processor, scaled, "yes"))
        slopes[token] = abs(moved[1] - moved[0]) / 0.02  # d log P / d scale = gradient . features
    first = max(slopes, key=slopes.get)
    assert first == int(relevance.argmax())
    for token, slope in slopes.items():  # in the map's proportions
        assert slope / slopes[first] == pytest.approx(float(relevance.flatten()[token] / relevance.max()), rel=5e-3)


@pytest.fixture(scope="module")
def unseen_lesions(tmp_path_factory) -> list[tuple[Path, list]]:
    """The 40 slices with lesions among 80 phantoms the demo never saw (training used seed 0), each with
    its lesions' boxes."""
    folder = tmp_path_factory.mktemp("unseen")
    write_phantom_set(folder, n=80, seed=4242, size=384, image_format="png")
    records = json.loads((folder / "captions.json").read_text())
    return [(folder / "images" / Path(r["image"]).name, r["finding_boxes"]) for r in records if r["finding_boxes"]]


def test_on_unseen_phantoms_the_answers_relevance_falls_on_their_lesions(demo, unseen_lesions):
    model, processor = demo
    grid = model.config.image_grid
    enrichment = []
    for image, boxes in unseen_lesions:
        explained = answer_relevance(model, processor, image, QUESTION, "yes")
        in_a_box = torch.zeros(grid, grid, dtype=torch.bool)
        for x0, y0, x1, y1 in boxes:  # fractions of the image; the map runs row by row
            in_a_box[int(y0 * grid) : int(y1 * grid) + 1, int(x0 * grid) : int(x1 * grid) + 1] = True
        enrichment.append(float(explained.relevance[in_a_box].sum() / in_a_box.float().mean()))
    assert len(enrichment) >= 30
    assert statistics.median(enrichment) > 4  # 1 would be a map blind to the lesions; about 7 when written


def answer_without(model, processor, features, cells: torch.Tensor) -> float:
    """log P("yes") when the image tokens `cells` say what the image's average token says."""
    taken = features.clone()
    taken[0, cells] = features[0].mean(0)
    return answer_log_probability(model, processor, taken, "yes")


def test_taking_away_the_cells_the_map_ranks_highest_moves_the_answer_and_as_many_random_cells_do_not(
    demo, unseen_lesions
):
    model, processor = demo
    generator = torch.Generator().manual_seed(0)
    top_drops, random_drops = [], []
    for image, _ in unseen_lesions[:20]:
        relevance = answer_relevance(model, processor, image, QUESTION, "yes").relevance.flatten()
        with torch.no_grad():
            features = model.encode_images(processor.preprocess_image(image)[None])
        whole = answer_log_probability(model, processor, features, "yes")
        top_drops.append(whole - answer_without(model, processor, features, relevance.argsort(descending=True)[:6]))
        draws = [torch.randperm(len(relevance), generator=generator)[:6] for _ in range(3)]
        random_drops.append(whole - statistics.mean(answer_without(model, processor, features, c) for c in draws))
    top, random = statistics.median(top_drops), statistics.median(random_drops)
    assert top > 0.2 and top > 20 * abs(random)  # 0.50 and -0.0002 nats on these 20 slices when written


def test_ask_heatmap_writes_the_models_view_with_the_relevance_over_it(demo, tmp_path, capsys):
    model, processor = demo
    image = EXAMPLES / "phantom_ct_lesion.dcm"
    assert main(["ask", "--image", str(image), QUESTION]) == 0
    plain = capsys.readouterr().out
    assert main(["ask", "--image", str(image), QUESTION, "--heatmap", str(tmp_path / "where.png")]) == 0
    assert capsys.readouterr().out == plain  # the same answer, explained
    heat = np.asarray(Image.open(tmp_path / "where.png"), dtype=float)
    explained = answer_relevance(model, processor, image, QUESTION, plain.strip())
    view = np.asarray(explained.view, dtype=float)
    assert heat.shape == view.shape == (processor.image_size, processor.image_size, 3)
    assert np.array_equal(np.asarray(explained.heat_map(opacity=0)), view.astype(np.uint8))
    reddened = heat[..., 0] - heat[..., 1] - (view[..., 0] - view[..., 1])
    peak = divmod(int(explained.relevance.argmax()), model.config.image_grid)
    cell = processor.image_size // model.config.image_grid
    assert reddened[peak[0] * cell + cell // 2, peak[1] * cell + cell // 2] > 50  # red where the map peaks
    assert main(["ask", "--image", str(image), QUESTION, "--heatmap", str(tmp_path / "where")]) == 1
    assert "name an image file" in capsys.readouterr().err
    assert main(["ask", "--fp8", "--image", str(image), QUESTION, "--heatmap", str(tmp_path / "where.png")]) == 1
    assert "fp8 and 4-bit layers cannot" in capsys.readouterr().err


def test_answer_heatmaps_draws_each_answer_as_ask_heatmap_does_and_a_rerun_draws_only_what_is_missing(
    demo, tmp_path, capsys
):
    run = ["answer", str(EXAMPLES), "--model", str(DEMO_MODEL_DIR), "--question", QUESTION, "--out", str(tmp_path)]
    assert main([*run, "--heatmaps"]) == 0
    drawn = {p.name: p.read_bytes() for p in (tmp_path / "heatmaps").glob("*.png")}
    assert sorted(drawn) == ["phantom_ct_lesion.dcm.png", "phantom_ct_lesion.nii.gz.png", "phantom_mr_normal.dcm.png"]
    assert sorted(p.name for p in (tmp_path / "heatmaps").glob("*.json")) == [
        name.removesuffix(".png") + ".json" for name in sorted(drawn)
    ]
    numbers = json.loads((tmp_path / "heatmaps" / "phantom_mr_normal.dcm.json").read_text())
    assert numbers["question_id"] == "phantom_mr_normal.dcm"
    assert numbers["answer"] == read_answers(tmp_path / "answers.jsonl")["phantom_mr_normal.dcm"]["text"]
    model, processor = demo
    explained = answer_relevance(model, processor, EXAMPLES / "phantom_mr_normal.dcm", QUESTION, numbers["answer"])
    assert torch.allclose(torch.tensor(numbers["relevance"]), explained.relevance, atol=1e-6)
    assert (
        main(
            ["ask", "--image", str(EXAMPLES / "phantom_mr_normal.dcm"), QUESTION, "--heatmap", str(tmp_path / "a.png")]
        )
        == 0
    )
    assert (tmp_path / "a.png").read_bytes() == drawn["phantom_mr_normal.dcm.png"]

    kept = tmp_path / "heatmaps" / "phantom_ct_lesion.dcm.png"
    kept.write_bytes(b"kept")  # stands for a map drawn before an interruption
    (tmp_path / "heatmaps" / "phantom_mr_normal.dcm.png").unlink()
    assert main([*run, "--heatmaps"]) == 0
    assert kept.read_bytes() == b"kept"
    assert (tmp_path / "heatmaps" / "phantom_mr_normal.dcm.png").read_bytes() == drawn["phantom_mr_normal.dcm.png"]
    capsys.readouterr()
    assert main([*run, "--heatmaps", "--load-4bit"]) == 1
    assert "--heatmaps differentiates through the LM" in capsys.readouterr().err


@needs_node
def test_the_web_page_draws_where_an_answer_came_from_under_it_when_asked(tmp_path):
    server = Server(DEMO_MODEL_DIR, model_id="llama3med-demo")
    try:
        shown = server.run_web_page(tmp_path, EXAMPLES / "phantom_ct_lesion.dcm", QUESTION, explain=True)
        server.settings.no_heat_maps = (
            "a heat map differentiates through the LM, which its fp8 and 4-bit layers cannot do"
        )
        refused = server.run_web_page(tmp_path, EXAMPLES / "phantom_ct_lesion.dcm", QUESTION, explain=True)
    finally:
        server.stop()
    assert [m["cls"] for m in refused["log"]] == ["msg user", "msg assistant", "msg p-yes", "msg error"]
    assert refused["log"][3]["text"].startswith("heat maps are off on this server")  # in the button's place
    assert [m["cls"] for m in shown["log"]] == ["msg user", "msg assistant", "msg p-yes", "heat-map"]
    assert shown["log"][1]["text"] == "yes"
    sent = base64.b64decode(shown["image"].removeprefix("data:image/png;base64,"))  # the view the page asked about
    expected = answer_relevance(server.engine.model, server.engine.processor, sent, QUESTION, "yes").heat_map()
    drawn = Image.open(io.BytesIO(base64.b64decode(shown["log"][3]["src"].removeprefix("data:image/png;base64,"))))
    assert np.array_equal(np.asarray(drawn), np.asarray(expected))


def test_chat_heatmap_draws_the_last_answer_with_the_turns_before_it_and_a_mistake_leaves_the_chat_going(
    demo, tmp_path, monkeypatch, capsys
):
    model, processor = demo
    image = EXAMPLES / "phantom_ct_lesion.dcm"
    assert main(["ask", "--image", str(image), QUESTION, "--heatmap", str(tmp_path / "asked.png")]) == 0
    lines = [
        f"/heatmap {tmp_path / 'early.png'}",
        QUESTION,
        f"/heatmap {tmp_path / 'first.png'}",
        "Which side is the lesion on?",
        "/heatmap",
        f"/heatmap {tmp_path / 'second.txt'}",
        f"/heatmap {tmp_path / 'second.png'}",
    ]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    capsys.readouterr()
    assert main(["chat", "--image", str(image)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ["yes", "left"]
    assert "nothing to explain" in err and "/heatmap needs a file name" in err and "name an image file" in err
    assert not (tmp_path / "early.png").exists() and not (tmp_path / "second.txt").exists()
    assert (tmp_path / "first.png").read_bytes() == (tmp_path / "asked.png").read_bytes()  # the first turn, as ask
    with torch.no_grad():
        features = model.encode_images(processor.preprocess_image(image)[None])
    conversation = [
        *question_messages(QUESTION),
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "Which side is the lesion on?"},
        {"role": "assistant", "content": "left"},
    ]
    relevance = conversation_relevance(model, processor, features, conversation)
    drawn = AnswerRelevance(relevance, view(processor, processor.preprocess_image(image))).heat_map()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "second.png")), np.asarray(drawn))
    assert not np.array_equal(np.asarray(drawn), np.asarray(Image.open(tmp_path / "first.png")))


def test_eval_heatmaps_draws_each_benchmark_answer_with_its_numbers_encoding_each_image_once(
    demo, test_set, tmp_path, capsys, monkeypatch
):
    model, processor = demo
    out = tmp_path / "eval"
    run = ["eval", "--model", str(DEMO_MODEL_DIR), "--data", str(test_set), "--out", str(out)]
    assert main(run) == 0  # answered; the rerun below only draws
    encoded = []
    encode_images = Llama3MedForConditionalGeneration.encode_images

    def counted(self, pixel_values):
        encoded.append(len(pixel_values))
        return encode_images(self, pixel_values)

    monkeypatch.setattr(Llama3MedForConditionalGeneration, "encode_images", counted)
    assert main([*run, "--heatmaps"]) == 0
    answers = read_answers(out / "answers.jsonl")
    assert sorted(p.stem for p in (out / "heatmaps").glob("*.png")) == sorted(answers)
    images = {r.image_key for r in load_benchmark("llava-med", test_set)}
    assert sum(encoded) == len(images) < len(answers)  # once per image, not once per question
    record = next(r for r in load_benchmark("llava-med", test_set) if r.answer_type == "CLOSED")
    numbers = json.loads((out / "heatmaps" / f"{record.id}.json").read_text())
    assert numbers["answer"] == answers[record.id]["text"]  # eval's plain prompt is the question itself
    expected = answer_relevance(model, processor, record.image, record.question, numbers["answer"]).relevance
    assert torch.allclose(torch.tensor(numbers["relevance"]), expected, atol=1e-6)
    capsys.readouterr()
    assert (
        main(["eval", "--api-url", "http://127.0.0.1:9/v1", "--data", str(test_set), "--out", str(out), "--heatmaps"])
        == 1
    )
    assert "--heatmaps needs the model itself" in capsys.readouterr().err


def test_answer_heatmaps_explain_each_answer_after_the_runs_system_message(demo, tmp_path):
    system, image = "You are a radiologist.", EXAMPLES / "phantom_mr_normal.dcm"
    run = ["answer", str(EXAMPLES), "--model", str(DEMO_MODEL_DIR), "--question", QUESTION, "--out", str(tmp_path)]
    assert main([*run, "--system", system, "--heatmaps"]) == 0
    numbers = json.loads((tmp_path / "heatmaps" / "phantom_mr_normal.dcm.json").read_text())
    model, processor = demo
    with_system = answer_relevance(model, processor, image, QUESTION, numbers["answer"], system=system)
    without = answer_relevance(model, processor, image, QUESTION, numbers["answer"])
    assert torch.allclose(torch.tensor(numbers["relevance"]), with_system.relevance, atol=1e-6)
    assert not torch.allclose(with_system.relevance, without.relevance, atol=1e-4)
