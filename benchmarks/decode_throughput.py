"""New tokens per second of `llama3med ask`-style greedy answers: the static-cache decoder (eager, and with
its step compiled as `eval --compile` does) against plain HF `generate`, same model, same prompts, batch 1,
in one run. The tokens must be identical; the compile time is reported apart and not counted.

    python benchmarks/decode_throughput.py [--model DIR] [--new-tokens 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from llama3med.checkpoints import DEMO_MODEL_DIR, load
from llama3med.generation import GreedyDecoder
from llama3med.inference import best_device, question_messages

QUESTIONS = ["Is there a lesion in this image?", "What imaging modality is this?", "Describe the image."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEMO_MODEL_DIR))
    parser.add_argument("--image", default="examples/phantom_ct_lesion.dcm")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model, processor = load(args.model, device=best_device())
    prompts = [processor.chat_prompt(question_messages(q)) for q in QUESTIONS]
    inputs = [processor(p, images=args.image).to(model.device) for p in prompts]
    n = args.new_tokens

    @torch.inference_mode()
    def with_generate() -> list[torch.Tensor]:
        outputs = [model.generate(**x, max_new_tokens=n, min_new_tokens=n, do_sample=False) for x in inputs]
        return [output[:, x["input_ids"].shape[1] :] for output, x in zip(outputs, inputs, strict=True)]

    def with_decoder(decoder: GreedyDecoder) -> Callable[[], list[torch.Tensor]]:
        @torch.inference_mode()
        def answer_all() -> list[torch.Tensor]:
            embeds = [model.embed_inputs(x["input_ids"], model.encode_images(x["pixel_values"])) for x in inputs]
            return [decoder(e, x["attention_mask"], n, min_new_tokens=n) for e, x in zip(embeds, inputs, strict=True)]

        return answer_all

    def tokens_per_s(answer_all: Callable[[], list[torch.Tensor]]) -> float:
        start = time.perf_counter()
        for _ in range(args.repeats):
            answer_all()
        return args.repeats * len(inputs) * n / (time.perf_counter() - start)

    reference = with_generate()
    rows = {"HF generate": (tokens_per_s(with_generate), len(inputs), None)}
    eager = GreedyDecoder(model.language_model, model.generation_config)
    compiled = GreedyDecoder(model.language_model, model.generation_config)
    compiled.compile()
    for name, decoder in (("static-cache decoder", eager), ("static-cache decoder, step compiled", compiled)):
        start = time.perf_counter()
        tokens = with_decoder(decoder)()  # compiles, for the compiled one
        first = time.perf_counter() - start
        same = sum(torch.equal(a, b) for a, b in zip(reference, tokens, strict=True))
        rows[name] = (tokens_per_s(with_decoder(decoder)), same, first)
    print(f"{len(inputs)} prompts, {n} new tokens each, batch 1, device {model.device}")
    base = rows["HF generate"][0]
    for name, (rate, same, first) in rows.items():
        note = f", first pass {first:.1f} s" if first is not None else ""
        print(f"{name:<38} {rate:8.1f} new tokens/s {rate / base:5.2f}x  identical {same}/{len(inputs)}{note}")


if __name__ == "__main__":
    main()
