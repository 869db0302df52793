"""Questions per second of `llama3med eval` against the reference way of running a VQA benchmark: one
question at a time with HF `generate`, re-encoding the image for every question (LLaVA-Med's loop).

Data: phantom test questions, 4-8 per image; `--slake-like` also asks each in LLaVA-1.5's short-answer
wording, about 11 per image as in SLAKE's English test set (1,061 questions, 96 images). Model: the
shipped demo model unless --model is given; `--paper-layout` builds a random-weight model with the
paper's token layout instead (384 px tiles of 14 px patches at 384/768/1152 px: 729 image tokens per
prompt) at small widths, so the image prefix weighs in the prompt as it does for Llama3-Med-8B. Both
ways must give the same answers; the ratio is printed. `--compile` adds `llama3med eval --compile`'s
path, timed on a second pass over the questions: the first pass compiles every shape the run meets
(prefix prefill, question prefill and decoding, batches of one and more) and is printed apart.
`--rank-options` instead makes each question a four-option one (its answer and three other answers of
the set) and times `eval --rank-options` (batched, the image's prompt prefix run once for all its
options) against scoring each option alone with one forward pass over its whole prompt, the image
encoded for it: the same log-probabilities (max abs diff) and the same picks.

    python benchmarks/eval_throughput.py [--model DIR | --paper-layout] [--images 40] [--batch-size 32]
        [--slake-like] [--compile | --rank-options] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import torch

from llama3med.checkpoints import DEMO_MODEL_DIR, build_scratch, load
from llama3med.data.benchmarks import OPTION_LETTERS, PROMPT_STYLES, VQARecord, load_llava_med, prompt_text
from llama3med.data.phantoms import write_phantom_set
from llama3med.eval import generate_answers
from llama3med.eval.runner import rank_options
from llama3med.eval.scoring import picked_option
from llama3med.inference import best_device, compile_model, inference_dtype, question_messages
from llama3med.processing import IGNORE_INDEX, train_bpe_tokenizer

# SigLIP-so400m-patch14-384's image geometry (729 tokens per 384 px tile) at small widths, with a small Llama.
PAPER_LAYOUT_VISION = dict(
    image_size=384, patch_size=14, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4
)
PAPER_LAYOUT_TEXT = dict(
    hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
)


def phantom_questions(folder: str, images: int, size: int, slake_like: bool) -> list[VQARecord]:
    """Phantom test questions about `images` DICOM slices; `slake_like` adds each in short-answer wording."""
    write_phantom_set(folder, n=images, seed=31337, size=size, image_format="dcm")
    records = load_llava_med(f"{folder}/test.json")
    if slake_like:
        short = PROMPT_STYLES["short"]
        records += [
            dataclasses.replace(r, id=f"{r.id}-short", question=short.format(question=r.question)) for r in records
        ]
    return records


def random_model(vision: dict, text: dict, records: list[VQARecord]):
    """A random-weight model with S2 scales 1x/2x/3x the tower's input and a small BPE trained on the
    questions (so the LM head is small; everything else is as `vision` and `text` say)."""
    tokenizer = train_bpe_tokenizer([f"{r.question} {r.answer}" for r in records] * 4, vocab_size=400)
    base = vision["image_size"]
    torch.manual_seed(0)
    model, processor = build_scratch(
        {"model_type": "siglip_vision_model", **vision},
        {"model_type": "llama", "max_position_embeddings": 8192, **text},
        tokenizer,
        scales=[base, 2 * base, 3 * base],
    )
    return model.eval(), processor


@torch.inference_mode()
def reference_answer(model, processor, record: VQARecord, max_new_tokens: int) -> str:
    """One question through HF greedy `generate`, its image encoded for it alone."""
    inputs = processor(processor.chat_prompt(question_messages(record.question)), images=record.image)
    inputs = inputs.to(model.device)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1] :]).strip()


def eval_rate(model, processor, records: list[VQARecord], batch_size: int, max_new_tokens: int):
    """`llama3med eval`'s answers by record id, and its questions/s."""
    start = time.perf_counter()
    answers = {
        r.id: text
        for r, _, text, _ in generate_answers(
            model, processor, records, batch_size=batch_size, max_new_tokens=max_new_tokens
        )
    }
    return answers, len(records) / (time.perf_counter() - start)


def compare(
    model, processor, records: list[VQARecord], batch_size: int, max_new_tokens: int, compiled: bool = False
) -> dict:
    """Questions/s of the one-question loop and of `llama3med eval`'s path (and, if `compiled`, of its
    compiled path), and how many answers agree with the loop's."""
    start = time.perf_counter()
    reference = {r.id: reference_answer(model, processor, r, max_new_tokens) for r in records}
    reference_rate = len(records) / (time.perf_counter() - start)
    batched, batched_rate = eval_rate(model, processor, records, batch_size, max_new_tokens)
    result = {
        "questions": len(records),
        "reference_questions_per_s": reference_rate,
        "ours_questions_per_s": batched_rate,
        "speedup": batched_rate / reference_rate,
        "identical_answers": sum(reference[k] == batched[k] for k in reference),
    }
    if compiled:
        compile_model(model)
        start = time.perf_counter()
        eval_rate(model, processor, records, batch_size, max_new_tokens)
        result["compiling_pass_s"] = time.perf_counter() - start
        fast, fast_rate = eval_rate(model, processor, records, batch_size, max_new_tokens)
        result["compiled_questions_per_s"] = fast_rate
        result["compiled_speedup"] = fast_rate / reference_rate
        result["compiled_identical_answers"] = sum(reference[k] == fast[k] for k in reference)
    return result


def four_option_questions(records: list[VQARecord]) -> list[VQARecord]:
    """Each question with four options, in a fixed order: its answer and the three answers of the set
    that follow it, the right one's letter its reference."""
    answers = sorted({r.answer for r in records})
    made = []
    for r in records:
        start = answers.index(r.answer)
        options = tuple(sorted(answers[(start + k) % len(answers)] for k in range(min(4, len(answers)))))
        letter = OPTION_LETTERS[options.index(r.answer)]
        made.append(dataclasses.replace(r, options=options, answer=letter, answer_type="CHOICE"))
    return made


@torch.inference_mode()
def option_log_prob_alone(model, processor, record: VQARecord, option: str) -> float:
    """log P(the answer is `option`) from one forward pass over the whole prompt, the image encoded for it."""
    question = question_messages(prompt_text(record, "plain", options=False))
    encoded = processor.encode_conversation([*question, {"role": "assistant", "content": option}])
    targets = torch.tensor(encoded["labels"][1:], device=model.device)
    kept = targets != IGNORE_INDEX
    features = model.encode_images(processor.preprocess_image(record.image)[None].to(model.device))
    embeds = model.embed_inputs(torch.tensor([encoded["input_ids"]], device=model.device), features)
    logits = model.language_model(inputs_embeds=embeds).logits[0, :-1][kept]
    return float(torch.log_softmax(logits.float(), dim=-1).gather(1, targets[kept, None]).sum())


def compare_ranking(model, processor, records: list[VQARecord], batch_size: int) -> dict:
    """Questions/s of scoring each option alone and of `rank_options`, the largest difference of their
    log-probabilities and how many picks agree."""
    start = time.perf_counter()
    alone = {r.id: [option_log_prob_alone(model, processor, r, o) for o in r.options] for r in records}
    reference_rate = len(records) / (time.perf_counter() - start)
    start = time.perf_counter()
    ranked = {r.id: log_probs for r, _, _, log_probs in rank_options(model, processor, records, batch_size=batch_size)}
    rate_ = len(records) / (time.perf_counter() - start)
    return {
        "questions": len(records),
        "reference_questions_per_s": reference_rate,
        "ours_questions_per_s": rate_,
        "speedup": rate_ / reference_rate,
        "max_abs_diff": max(abs(a - b) for k in alone for a, b in zip(alone[k], ranked[k], strict=True)),
        "identical_picks": sum(picked_option(r, alone[r.id]) == picked_option(r, ranked[r.id]) for r in records),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEMO_MODEL_DIR))
    parser.add_argument("--paper-layout", action="store_true", help="random weights, 729 image tokens per prompt")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--slake-like", action="store_true", help="each question also in short-answer wording")
    parser.add_argument("--compile", action="store_true", help="also time eval --compile's path")
    parser.add_argument("--rank-options", action="store_true", help="time eval --rank-options on four options each")
    parser.add_argument(
        "--dtype", choices=["bfloat16", "float16", "float32"], help="weights' precision, both ways (as eval's default)"
    )
    args = parser.parse_args()
    device = best_device()
    dtype = inference_dtype(device, args.dtype)

    with tempfile.TemporaryDirectory() as tmp:
        if args.paper_layout:
            records = phantom_questions(tmp, args.images, 3 * PAPER_LAYOUT_VISION["image_size"], args.slake_like)
            model, processor = random_model(PAPER_LAYOUT_VISION, PAPER_LAYOUT_TEXT, records)
            model.to(device, dtype)
        else:
            model, processor = load(args.model, device=device, dtype=dtype)
            records = phantom_questions(tmp, args.images, processor.image_size, args.slake_like)
        print(
            f"{len(records)} questions about {args.images} images, {model.config.num_image_tokens} image tokens "
            f"per prompt, device {model.device}, {dtype}, torch {torch.__version__}"
        )
        if args.rank_options:
            ranked = compare_ranking(model, processor, four_option_questions(records), args.batch_size)
            print(f"each option alone, image re-encoded: {ranked['reference_questions_per_s']:8.2f} questions/s")
            print(f"eval --rank-options (batch {args.batch_size}):   {ranked['ours_questions_per_s']:8.2f} questions/s")
            print(
                f"speed-up: {ranked['speedup']:.2f}x; max abs diff of log-probabilities {ranked['max_abs_diff']:.1e}; "
                f"identical picks: {ranked['identical_picks']}/{len(records)}"
            )
            return
        result = compare(model, processor, records, args.batch_size, args.max_new_tokens, args.compile)
    print(f"one at a time, image re-encoded: {result['reference_questions_per_s']:8.2f} questions/s")
    print(f"llama3med eval (batch {args.batch_size}):        {result['ours_questions_per_s']:8.2f} questions/s")
    print(f"speed-up: {result['speedup']:.2f}x; identical answers: {result['identical_answers']}/{len(records)}")
    if args.compile:
        print(
            f"llama3med eval --compile:        {result['compiled_questions_per_s']:8.2f} questions/s "
            f"(after a first pass of {result['compiling_pass_s']:.0f} s that compiles)"
        )
        print(
            f"speed-up: {result['compiled_speedup']:.2f}x; "
            f"identical answers: {result['compiled_identical_answers']}/{len(records)}"
        )


if __name__ == "__main__":
    main()
