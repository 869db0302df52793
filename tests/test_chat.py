"""A conversation about one image: `ImageChat` and `llama3med chat`. The image is encoded once; each answer
is the one the model gives with the whole conversation before it, streamed as it is generated."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import torch

from llama3med.checkpoints import DEMO_MODEL_DIR, load
from llama3med.cli import main
from llama3med.inference import ImageChat, question_messages
from llama3med.processing import IMAGE_PLACEHOLDER

ROOT = Path(__file__).resolve().parents[1]
CT = pydicom.data.get_testdata_file("CT_small.dcm")


@pytest.fixture(scope="module")
def tiny(built_model_dir):
    model, processor = load(built_model_dir)
    return model.eval(), processor


def greedy_generate(model, processor, messages, image, max_new_tokens) -> str:
    """HF `generate` on the whole conversation rendered as one prompt: what each turn must answer."""
    inputs = processor(processor.chat_prompt(messages), images=image)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :]).strip()


def test_each_answer_is_generates_answer_to_the_whole_conversation_so_far(tiny):
    model, processor = tiny
    chat = ImageChat(model, processor, CT, system="You are a radiology assistant.")
    first = chat.ask("Is there a lesion in the liver?", max_new_tokens=6)
    second = chat.ask("Which side is the lesion on?", max_new_tokens=6)
    opening = question_messages("Is there a lesion in the liver?", system="You are a radiology assistant.")
    assert first == greedy_generate(model, processor, opening, CT, 6)
    history = [
        *opening,
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Which side is the lesion on?"},
    ]
    assert second == greedy_generate(model, processor, history, CT, 6)
    assert chat.messages == [*history, {"role": "assistant", "content": second}]
    assert sum(IMAGE_PLACEHOLDER in m["content"] for m in chat.messages) == 1  # the image comes once, first


def test_a_turn_that_no_longer_fits_the_context_is_refused_and_not_kept(tiny):
    model, processor = tiny
    chat = ImageChat(model, processor, CT)
    chat.ask("Is it normal?", max_new_tokens=2)
    kept = list(chat.messages)
    with pytest.raises(ValueError, match="the conversation no longer fits the model's context"):
        chat.ask("Is it normal? " * 200, max_new_tokens=2)
    with pytest.raises(ValueError, match="must not contain <image>"):
        chat.ask(f"and this {IMAGE_PLACEHOLDER}?")
    assert chat.messages == kept


def test_the_answer_streams_piece_by_piece_and_the_pieces_make_the_answer():
    model, processor = load(DEMO_MODEL_DIR)
    chat = ImageChat(model, processor, ROOT / "examples" / "phantom_mr_normal.dcm")
    pieces = []
    description = chat.ask("Describe the image.", on_text=pieces.append)
    assert description.startswith("Axial T2-weighted MRI of the abdomen")
    assert len(pieces) > 5 and "".join(pieces) == description


def test_llama3med_chat_answers_each_line_of_stdin_in_one_conversation():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    questions = "Is there a lesion in this image?\n\nHow many lesions are visible?\nWhich side is the lesion on?\n"
    result = subprocess.run(
        [sys.executable, "-m", "llama3med.cli", "chat", "--image", ROOT / "examples" / "phantom_ct_lesion.dcm"],
        input=questions,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["yes", "1", "left"]  # the blank line is skipped


def test_chat_with_p_yes_follows_each_answer_with_its_p_yes_the_first_as_ask_gives_it(monkeypatch, capsys):
    image = str(ROOT / "examples" / "phantom_ct_lesion.dcm")
    assert main(["ask", "--p-yes", "--image", image, "Is there a lesion in this image?"]) == 0
    asked = capsys.readouterr().out.splitlines()
    monkeypatch.setattr("sys.stdin", io.StringIO("Is there a lesion in this image?\nIs this a CT scan?\n"))
    assert main(["chat", "--p-yes", "--image", image]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == asked == ["yes", asked[1]]
    assert lines[2] == "yes" and float(lines[3].removeprefix("P(yes) ")) > 0.5


def test_ask_puts_a_system_message_before_the_question_as_the_chat_does(capsys):
    image, system = str(ROOT / "examples" / "phantom_ct_lesion.dcm"), "You are a radiologist."
    model, processor = load(DEMO_MODEL_DIR)
    chat = ImageChat(model, processor, image, system=system)
    expected = chat.ask("How many lesions are visible?", max_new_tokens=16)
    assert chat.messages[0] == {"role": "system", "content": system}
    assert (
        main(["ask", "--system", system, "--max-new-tokens", "16", "--image", image, "How many lesions are visible?"])
        == 0
    )
    assert capsys.readouterr().out.splitlines() == [expected]
    ranked = ["ask", "--system", system, "--image", image, "Which side?", "--option", "left", "--option", "right"]
    assert main([*ranked, "--rank-options"]) == 0
    assert capsys.readouterr().out.splitlines()[0] in ("A. left", "B. right")
