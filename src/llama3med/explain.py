"""Where in the image an answer comes from: each image token's relevance to the answer (gradient times
input at the projected image features, the tokens the LM reads), as a map over the base grid and as a
heat map over the view the model was shown. An aid for reading an answer, not a localisation: a model
can be right for the wrong reasons, and the map shows where it looked, not what is there."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .inference import ImageChat, question_messages
from .model import Llama3MedForConditionalGeneration
from .processing import IGNORE_INDEX, Llama3MedProcessor
from .processing.images import ImageSource, Window


@dataclass
class AnswerRelevance:
    """`relevance`: `(grid, grid)` over the base grid, row by row from the top left, non-negative and
    summing to 1 (all zero where the image does not move the answer at all); `view`: the image as the
    model saw it (fitted to its square, windowed)."""

    relevance: torch.Tensor
    view: Image.Image

    def heat_map(self, opacity: float = 0.6) -> Image.Image:
        """The view with the relevance over it in red, strongest where the map peaks, smoothed from the
        grid to the view's pixels."""
        size = self.view.size[::-1]
        peak = self.relevance.max()
        heat = self.relevance / peak if peak > 0 else self.relevance
        heat = F.interpolate(heat[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
        alpha = (opacity * heat.clamp(0, 1)).numpy()[..., None]
        red = np.array([255.0, 0.0, 0.0])
        blended = (1 - alpha) * np.asarray(self.view, dtype=np.float64) + alpha * red
        return Image.fromarray(blended.round().astype(np.uint8))


def answer_relevance(
    model: Llama3MedForConditionalGeneration,
    processor: Llama3MedProcessor,
    image: ImageSource,
    question: str,
    answer: str,
    window: Window = None,
    frame: int | None = None,
    system: str | None = None,
) -> AnswerRelevance:
    """How strongly each image token moves the log-probability of `answer` to `question` (its tokens and
    end of turn, as training supervises them; `system` a system message before the question): the
    gradient of that log-probability times the token's features, summed over the features, in absolute
    value. Any answer can be explained, the model's own or another ("why not no?")."""
    return ImageExplainer(model, processor, image, window, frame)(question, answer, system)


class ImageExplainer:
    """`answer_relevance` for many questions about one image, which is encoded once."""

    def __init__(
        self,
        model: Llama3MedForConditionalGeneration,
        processor: Llama3MedProcessor,
        image: ImageSource,
        window: Window = None,
        frame: int | None = None,
    ):
        self.model, self.processor = model, processor
        pixel_values = processor.preprocess_image(image, window=window, frame=frame)
        with torch.no_grad():  # the frozen tower is not differentiated
            self.features = model.encode_images(pixel_values[None].to(model.device))  # (1, N, D)
        self.view = view(processor, pixel_values)

    def __call__(self, question: str, answer: str, system: str | None = None) -> AnswerRelevance:
        messages = [*question_messages(question, system), {"role": "assistant", "content": answer}]
        return AnswerRelevance(conversation_relevance(self.model, self.processor, self.features, messages), self.view)


def chat_relevance(chat: ImageChat) -> AnswerRelevance:
    """`answer_relevance` of a conversation's last answer, the turns before it in the prompt as the model
    had them, from the features the chat already holds (the image is not encoded again)."""
    features = chat.image_features.clone()  # a normal tensor: the chat's was made in inference mode
    relevance = conversation_relevance(chat.model, chat.processor, features, chat.messages)
    return AnswerRelevance(relevance, view(chat.processor, chat.pixel_values))


def conversation_relevance(
    model: Llama3MedForConditionalGeneration,
    processor: Llama3MedProcessor,
    features: torch.Tensor,
    messages: list[dict[str, str]],
) -> torch.Tensor:
    """`(grid, grid)` relevance of the image tokens to the last message, the assistant's, given the
    messages before it; `features`: `(1, num_image_tokens, text_hidden)` projected features of the one
    image the messages' placeholder stands for."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("nothing to explain: the conversation does not end with an answer (an assistant message)")
    if not messages[-1]["content"].strip():
        raise ValueError("nothing to explain: the answer is empty")
    features = features.detach().requires_grad_(True)
    encoded = processor.encode_conversation(messages, max_length=model.config.text_config.max_position_embeddings)
    labels = torch.tensor(encoded["labels"], device=model.device)
    answer_length = len(labels) - int(torch.nonzero(labels == IGNORE_INDEX).max()) - 1  # the answer ends the chat
    if answer_length == 0 or (labels[-answer_length:] == IGNORE_INDEX).any():
        answer = messages[-1]["content"]
        raise ValueError(f"answer {answer!r}: the chat template gives it no tokens of its own to explain")
    input_ids = torch.tensor([encoded["input_ids"]], device=model.device)
    with torch.enable_grad():
        embeds = model.embed_inputs(input_ids, features)
        logits = model.language_model(inputs_embeds=embeds, logits_to_keep=answer_length + 1).logits[0, :-1]
        targets = labels[-answer_length:, None]  # each predicted from the position before it
        log_p = torch.log_softmax(logits.float(), dim=-1).gather(1, targets).sum()
        (gradient,) = torch.autograd.grad(log_p, features)  # no weight gradients: only the features' are asked for
    relevance = (gradient * features).float().sum(-1)[0].abs().detach().cpu()  # (N,)
    total = relevance.sum()
    if total > 0:
        relevance = relevance / total
    grid = model.config.image_grid
    return relevance.view(grid, grid)


def view(processor: Llama3MedProcessor, pixel_values: torch.Tensor) -> Image.Image:
    """`(3, S, S)` normalised pixels back to the RGB image they came from: the image as the model saw it."""
    pixel_values = pixel_values.cpu()
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    rgb = (pixel_values.float() * std + mean).clamp(0, 1).permute(1, 2, 0)
    return Image.fromarray((rgb * 255).round().to(torch.uint8).numpy())
