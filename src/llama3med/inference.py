"""Answering a question about one image: processor -> model -> greedy decoder (or sampling) -> text."""

from __future__ import annotations

import sys
import weakref

import torch

from .generation import Sampling, StaticCacheDecoder
from .model import Llama3MedForConditionalGeneration
from .processing import IMAGE_PLACEHOLDER, Llama3MedProcessor
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


def compile_model(model: Llama3MedForConditionalGeneration) -> None:
    """Compile the vision tower (`compile_for_inference`) and the greedy decoder's step. The first
    answers wait for the compile (seconds to tens of seconds for the demo model on 2 CPU cores); after
    that encoding and decoding are faster. Worth it for a long evaluation or many questions."""
    compile_for_inference(model.vision_tower)
    static_cache_decoder(model).compile()


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
    embeds = model.embed_inputs(inputs["input_ids"], model.encode_images(inputs["pixel_values"]))
    sampling = Sampling(temperature=temperature) if temperature > 0 else None
    new_tokens = static_cache_decoder(model)(embeds, inputs["attention_mask"], max_new_tokens, sampling=sampling)
    return processor.decode(new_tokens[0]).strip()
