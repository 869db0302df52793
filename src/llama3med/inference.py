"""Answering questions about one image, one at a time or as a conversation: processor -> model -> greedy
decoder (or sampling) -> text."""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable

import torch

from .environment import cpp_compiler
from .generation import Sampling, StaticCacheDecoder
from .model import Llama3MedForConditionalGeneration
from .processing import IMAGE_PLACEHOLDER, Llama3MedProcessor, SampleTooLongError
from .processing.images import ImageSource, Window


def best_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def peak_memory_gib(device: torch.device) -> float | None:
    """The most memory this process has held so far: on a GPU the peak of allocated tensors, elsewhere
    the peak resident size of the process (None where the OS does not say)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def inference_dtype(device: torch.device, name: str | None = None) -> torch.dtype:
    """Weights' precision for answering: `name` when given; else bfloat16 on a GPU that has it (the
    paper's precision), float16 on older GPUs, float32 on a CPU. Training stages save float32 master
    weights, which answering has no use for: loaded as saved, an 8B model would take twice the memory
    and run at float32 speed."""
    if name is not None:
        return getattr(torch, name)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def compile_for_inference(module: torch.nn.Module) -> None:
    """Compile `module` in place with `torch.compile`, shapes dynamic so that new tile counts, prompt
    lengths and growing caches do not recompile each call.

    Weights are frozen into the compiled graphs (inductor's `freezing`: constants folded and, on a CPU,
    matmul weights prepacked; what that gains depends on the CPU, see `benchmarks/README.md`), so the
    module must not be trained or changed afterwards. Freezing applies only
    where gradients are off, as in `answer`, `eval` and `serve`; the flag is process-wide."""
    import torch._inductor.config  # only compiling needs inductor loaded

    torch._inductor.config.freezing = True
    module.compile(dynamic=True)


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def static_cache_decoder(model: Llama3MedForConditionalGeneration) -> StaticCacheDecoder:
    """The model's static-cache decoder, made on first use and kept (with its cache and compiled step)
    for as long as the model lives."""
    if model not in _DECODERS:
        _DECODERS[model] = StaticCacheDecoder(model.language_model, model.generation_config)
    return _DECODERS[model]


def release_decoder(model: Llama3MedForConditionalGeneration) -> None:
    """Drop the model's decoder and its KV cache (a training run evaluating between steps needs the
    memory back)."""
    _DECODERS.pop(model, None)


def compile_model(model: Llama3MedForConditionalGeneration) -> None:
    """Compile the vision tower (`compile_for_inference`) and the greedy decoder's step. The first
    answers wait for the compile (seconds to tens of seconds for the demo model on 2 CPU cores); after
    that encoding and decoding are faster. Worth it for a long evaluation or many questions. On a CPU the
    compiled kernels are C++, so a compiler is checked for first: without one the first answer would fail
    only after its wait."""
    if model.device.type == "cpu" and cpp_compiler() is None:
        raise RuntimeError(
            "--compile on a CPU needs a C++ compiler and none runs here (torch looks for $CXX, else g++): "
            "install g++ or run without --compile"
        )
    compile_for_inference(model.vision_tower)
    static_cache_decoder(model).compile()


def _checked_question(question: str) -> str:
    if not question.strip():
        raise ValueError("the question is empty")
    if IMAGE_PLACEHOLDER in question:
        raise ValueError(f"the question must not contain {IMAGE_PLACEHOLDER}; the image is added for you")
    return question


def question_messages(question: str, system: str | None = None) -> list[dict[str, str]]:
    """A single-turn chat about one image, the placeholder before the question (LLaVA-Med's layout)."""
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{_checked_question(question)}"}]


def begun_word(token_text: str) -> str | None:
    """ "yes" or "no" where a token's text, stripped and in lower case, begins that word ("Yes", " no",
    "Y", "n"); None for any other token. A P(yes) counts a token towards the word the answer starts
    with, locally over the whole vocabulary and through an API over the tokens it lists."""
    start = token_text.strip().lower()
    return next((word for word in ("yes", "no") if start and word.startswith(start)), None)


def yes_no_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The tokens that begin "yes" and those that begin "no" (`begun_word`), special tokens left out."""
    texts = tokenizer.batch_decode([[token] for token in range(len(tokenizer))], skip_special_tokens=True)
    words = [begun_word(text) for text in texts]
    return [t for t, w in enumerate(words) if w == "yes"], [t for t, w in enumerate(words) if w == "no"]


def yes_probability(logits: torch.Tensor, yes: list[int], no: list[int]) -> list[float | None]:
    """Per row of `(B, vocab)` first-token logits: P(yes) / (P(yes) + P(no)), a score to rank closed
    answers by (AUROC) that greedy text alone cannot give; None for every row without tokens for both."""
    if not yes or not no:
        return [None] * len(logits)
    log_p = torch.log_softmax(logits.float(), dim=-1)
    log_yes, log_no = torch.logsumexp(log_p[:, yes], dim=-1), torch.logsumexp(log_p[:, no], dim=-1)
    return torch.sigmoid(log_yes - log_no).tolist()


class _TextStream:
    """`StaticCacheDecoder`'s `on_step` for one answer: hands each piece of new text to `on_text` as it
    comes, leading whitespace dropped as the finished answer drops it; stops nothing."""

    def __init__(self, processor: Llama3MedProcessor, eos: list[int], on_text: Callable[[str], None]):
        self.processor, self.eos, self.on_text = processor, eos, on_text
        self.tokens: list[int] = []
        self.shown = ""

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        if int(token[0]) not in self.eos:
            self.tokens.append(int(token[0]))
            text = self.processor.decode_so_far(self.tokens)
            if text is not None and len(text.lstrip()) > len(self.shown):
                delta, self.shown = text.lstrip()[len(self.shown) :], text.lstrip()
                self.on_text(delta)
        return torch.zeros(1, dtype=torch.bool)


class ImageChat:
    """A conversation about one image, turn by turn, as LLaVA's terminal chat holds it: the image is
    encoded once, and each question is answered with the whole conversation before it in the prompt.
    With `p_yes`, `self.p_yes` is the last answer's P(yes) (`yes_probability`, before any sampling),
    as `eval` gives it for closed questions."""

    def __init__(
        self,
        model: Llama3MedForConditionalGeneration,
        processor: Llama3MedProcessor,
        image: ImageSource,
        *,
        window: Window = None,
        frame: int | None = None,
        system: str | None = None,
        p_yes: bool = False,
    ):
        self.model, self.processor = model, processor
        self.pixel_values = processor.preprocess_image(image, window=window, frame=frame)  # (3, S_max, S_max)
        with torch.inference_mode():
            self.image_features = model.encode_images(self.pixel_values[None].to(model.device))  # (1, N, D)
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.yes_no = yes_no_tokens(processor.tokenizer) if p_yes else None
        self.p_yes: float | None = None

    @torch.inference_mode()
    def ask(
        self,
        question: str,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        on_text: Callable[[str], None] | None = None,
        top_p: float = 1.0,
    ) -> str:
        """The answer to `question`, greedy unless `temperature > 0` (then drawn from the `top_p` nucleus
        with torch's global generator); `on_text` sees its text piece by piece as it is generated. The
        turn joins the conversation only once its answer is complete."""
        first_turn = all(message["role"] != "user" for message in self.messages)
        if first_turn:
            messages = [*self.messages, *question_messages(question)]
        else:
            messages = [*self.messages, {"role": "user", "content": _checked_question(question)}]
        context = self.model.config.text_config.max_position_embeddings
        try:
            prompt = self.processor.encode_text(self.processor.chat_prompt(messages), 1, max_length=context - 1)
        except SampleTooLongError as err:
            raise ValueError(f"the conversation no longer fits the model's context: {err}") from None
        input_ids = torch.tensor([prompt], device=self.model.device)
        embeds = self.model.embed_inputs(input_ids, self.image_features)
        decoder = static_cache_decoder(self.model)
        first: list[torch.Tensor] = []
        new_tokens = decoder(
            embeds,
            torch.ones_like(input_ids),
            min(max_new_tokens, context - len(prompt)),
            on_step=None if on_text is None else _TextStream(self.processor, decoder.eos, on_text),
            sampling=Sampling(temperature, top_p) if temperature > 0 else None,
            on_first_logits=None if self.yes_no is None else first.append,
        )
        text = self.processor.decode(new_tokens[0]).strip()
        self.messages = [*messages, {"role": "assistant", "content": text}]
        self.p_yes = yes_probability(first[0], *self.yes_no)[0] if first else None
        return text


def answer(
    model: Llama3MedForConditionalGeneration,
    processor: Llama3MedProcessor,
    image: ImageSource,
    question: str,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    window: Window = None,
    top_p: float = 1.0,
    system: str | None = None,
) -> str:
    """The model's answer to `question` about `image` (after `system`, a system message); greedy unless
    `temperature > 0`."""
    _checked_question(question)  # before the image is encoded
    chat = ImageChat(model, processor, image, window=window, system=system)
    return chat.ask(question, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
