"""New tokens per second of `llama3med ask`-style answers: the static-cache decoder (eager, and with its
step compiled as `eval --compile` does) against plain HF `generate`, same model, same prompts, batch 1, in
one run, greedy and sampled (temperature 0.7, top-p 0.9, each answer seeded). The tokens must be identical;
the compile time is reported apart and not counted.

    python benchmarks/decode_throughput.py [--model DIR] [--new-tokens 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from llama3med.checkpoints import DEMO_MODEL_DIR, load
from llama3med.generation import Sampling, StaticCacheDecoder
from llama3med.inference import best_device, question_messages

QUESTIONS = ["Is there a lesion in this image?", "What imaging modality is this?", "Describe the image."]
SAMPLED = Sampling(temperature=0.7, top_p=0.9)


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

    def with_generate(sampling: Sampling | None) -> Callable[[], list[torch.Tensor]]:
        settings = {"do_sample": False}
        if sampling is not None:
            settings = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}

        @torch.inference_mode()
        def answer_all() -> list[torch.Tensor]:
            answers = []
            for seed, x in enumerate(inputs):
                torch.manual_seed(seed)
                output = model.generate(**x, max_new_tokens=n, min_new_tokens=n, **settings)
                answers.append(output[:, x["input_ids"].shape[1] :])
            return answers

        return answer_all

    def with_decoder(decoder: StaticCacheDecoder, sampling: Sampling | None) -> Callable[[], list[torch.Tensor]]:
        @torch.inference_mode()
        def answer_all() -> list[torch.Tensor]:
            answers = []
            for seed, x in enumerate(inputs):
                embeds = model.embed_inputs(x["input_ids"], model.encode_images(x["pixel_values"]))
                torch.manual_seed(seed)
                answers.append(decoder(embeds, x["attention_mask"], n, min_new_tokens=n, sampling=sampling))
            return answers

        return answer_all

    def tokens_per_s(answer_all: Callable[[], list[torch.Tensor]]) -> float:
        start = time.perf_counter()
        for _ in range(args.repeats):
            answer_all()
        return args.repeats * len(inputs) * n / (time.perf_counter() - start)

    eager = StaticCacheDecoder(model.language_model, model.generation_config)
    compiled = StaticCacheDecoder(model.language_model, model.generation_config)
    compiled.compile()
    print(f"{len(inputs)} prompts, {n} new tokens each, batch 1, device {model.device}")
    for mode, sampling in (("greedy", None), ("sampled", SAMPLED)):
        reference = with_generate(sampling)()
        rows = {"HF generate": (tokens_per_s(with_generate(sampling)), len(inputs), None)}
        for name, decoder in (("static-cache decoder", eager), ("static-cache decoder, step compiled", compiled)):
            start = time.perf_counter()
            tokens = with_decoder(decoder, sampling)()  # compiles, for the compiled one's first use
            first = time.perf_counter() - start
            same = sum(torch.equal(a, b) for a, b in zip(reference, tokens, strict=True))
            rows[name] = (tokens_per_s(with_decoder(decoder, sampling)), same, first)
        base = rows["HF generate"][0]
        for name, (rate, same, first) in rows.items():
            note = f", first pass {first:.1f} s" if first is not None else ""
            print(
                f"{mode:<8} {name:<36} {rate:8.1f} new tokens/s {rate / base:5.2f}x  identical {same}/{len(inputs)}"
                f"{note}"
            )


if __name__ == "__main__":
    main()
