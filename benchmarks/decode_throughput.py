"""New tokens per second of `llama3med ask`-style greedy answers with the model compiled (`--compile` of
`serve` and `eval`: tower and LM) against plain HF `generate`, same model, same prompts, in one run. The tokens must be
identical; the compile time is reported apart and not counted.

    python benchmarks/decode_throughput.py [--model DIR] [--new-tokens 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from llama3med.checkpoints import DEMO_MODEL_DIR, load
from llama3med.inference import best_device, compile_model, question_messages

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
    settings = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False}

    def answer_all() -> list[torch.Tensor]:
        with torch.inference_mode():
            return [model.generate(**batch, **settings) for batch in inputs]

    def tokens_per_s() -> float:
        start = time.perf_counter()
        for _ in range(args.repeats):
            answer_all()
        return args.repeats * len(inputs) * args.new_tokens / (time.perf_counter() - start)

    reference = answer_all()
    reference_rate = tokens_per_s()
    compile_model(model)
    start = time.perf_counter()
    compiled = answer_all()
    compile_seconds = time.perf_counter() - start
    compiled_rate = tokens_per_s()
    same = sum(torch.equal(a, b) for a, b in zip(reference, compiled, strict=True))
    print(f"{len(inputs)} prompts, {args.new_tokens} new tokens each, batch 1, device {model.device}")
    print(f"HF generate:               {reference_rate:8.1f} new tokens/s")
    print(f"model compiled:           {compiled_rate:8.1f} new tokens/s (compile {compile_seconds:.0f} s, once)")
    print(f"speed-up: {compiled_rate / reference_rate:.2f}x; identical tokens: {same}/{len(inputs)}")


if __name__ == "__main__":
    main()
