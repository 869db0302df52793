"""Answering a question about one image: processor -> model.generate -> text."""

from __future__ import annotations

import torch

from .model import Llama3MedForConditionalGeneration
from .processing import IMAGE_PLACEHOLDER, Llama3MedProcessor
from .processing.images import ImageSource, Window


def best_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compile_model(model: Llama3MedForConditionalGeneration) -> None:
    """Compile the vision tower and the LM's forward with `torch.compile`, shapes dynamic so that new tile
    counts, prompt lengths and growing caches do not recompile each call. The first answers wait for the
    compile (tens of seconds for the demo model on 2 CPU cores); after that encoding and decoding are
    faster. Worth it for a server or a long evaluation."""
    model.vision_tower.forward = torch.compile(model.vision_tower.forward, dynamic=True)
    model.language_model.forward = torch.compile(model.language_model.forward, dynamic=True)


def question_messages(question: str, system: str | None = None) -> list[dict[str, str]]:
    """A single-turn chat about one image, the placeholder before the question (LLaVA-Med's layout)."""
    if not question.strip():
        raise ValueError("the question is empty")
    if IMAGE_PLACEHOLDER in question:
        raise ValueError(f"the question must not contain {IMAGE_PLACEHOLDER}; the image is added for you")
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}"}]


@torch.inference_mode()
def answer(
    model: Llama3MedForConditionalGeneration,
    processor: Llama3MedProcessor,
    image: ImageSource,
    question: str,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    window: Window = None,
) -> str:
    """The model's answer to `question` about `image`; greedy unless `temperature > 0`."""
    prompt = processor.chat_prompt(question_messages(question))
    inputs = processor(prompt, images=image, window=window).to(model.device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, **sampling)
    return processor.decode(output[0, inputs["input_ids"].shape[1] :]).strip()
