"""Peak memory and time of one finetune step: Llama3-Med's loss against HF's causal-LM loss, in one run.

Reference: HF's loss (`ForCausalLMLoss`) over the logits of every position, image and prompt included.
Ours: the model's own loss with labels, the LM head run on the labelled positions alone, a chunk at a
time and recomputed in the backward pass. Both steps are `recipes/llama3med-8b/finetune_lora.yaml`'s:
LoRA adapters on the LM and the projector train in float32 master weights, the frozen weights are in
the recipe's dtype (float32 on a CPU), gradient checkpointing, the recipe's length, an AdamW step; bf16
autocast on a GPU. Each row of the batch is a prompt, 729 image tokens, then turns of 16 question and 48
answer tokens up to the length, the answers labelled: most of the text, so the saving shown is at the
low end of what conversations give. The reference runs first, in a process of its own, then ours in this
one, so that neither's peak hides the other's; their losses and gradients are compared before the table
is printed.

    python benchmarks/train_memory.py                    # CPU: small widths at Llama-3's vocabulary, batch 1
    python benchmarks/train_memory.py --size 8b          # GPU: SigLIP-so400m + Llama-3-8B, the recipe's batch
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from eval_throughput import PAPER_LAYOUT_VISION
from transformers.loss.loss_utils import ForCausalLMLoss

from llama3med import Llama3MedConfig, Llama3MedForConditionalGeneration
from llama3med.config import LLAMA3_8B
from llama3med.inference import best_device, peak_memory_gib
from llama3med.processing import IGNORE_INDEX
from llama3med.train.recipe import Recipe, load_recipe
from llama3med.train.trainer import float32_master_weights, trained_parts

RECIPE = Path(__file__).parents[1] / "recipes" / "llama3med-8b" / "finetune_lora.yaml"
PROMPT, QUESTION, ANSWER = 24, 16, 48  # tokens: system prompt and question opening, then each turn's parts
SIZES = {
    # the paper's image layout (729 tokens from 14 tiles of 384 px) and Llama-3's vocabulary at small widths
    "small": Llama3MedConfig(
        vision_config=dict(model_type="siglip_vision_model", **PAPER_LAYOUT_VISION),
        text_config=dict(
            LLAMA3_8B,
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        vision_feature_layer=-1,
    ),
    "8b": Llama3MedConfig(),  # SigLIP-so400m-patch14-384 at 384/768/1152 px, Llama-3-8B-Instruct
}


def finetune_batch(config: Llama3MedConfig, batch: int, length: int, device: torch.device) -> dict:
    """Random tokens laid out as a finetune sample (prompt, image, question and answer turns) and random
    pixels; only the answers are labelled, as `encode_conversation` labels them."""
    generator = torch.Generator().manual_seed(0)
    image_token = config.image_token_id
    ids = torch.randint(0, image_token, (batch, length), generator=generator)
    ids[:, PROMPT : PROMPT + config.num_image_tokens] = image_token
    labels = torch.full_like(ids, IGNORE_INDEX)
    text = torch.arange(PROMPT + config.num_image_tokens, length)
    answers = text[(text - text[0]) % (QUESTION + ANSWER) >= QUESTION]
    labels[:, answers] = ids[:, answers]
    side = config.max_image_size
    pixels = torch.randn(batch, 3, side, side, generator=generator)
    inputs = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
    return {name: tensor.to(device) for name, tensor in inputs.items()}


@contextmanager
def built_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules made inside get their weights directly on `device` in `dtype`: an 8B model is never
    materialised on the host, nor held twice."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(default)


def random_model(config: Llama3MedConfig, dtype: torch.dtype, device: torch.device):
    """Random weights (seed 0) built in place on the device in `dtype`."""
    torch.manual_seed(0)
    with built_on(device, dtype):
        return Llama3MedForConditionalGeneration(config)


def recipe_dtype(recipe: Recipe, device: torch.device) -> torch.dtype:
    """The recipe's weights' dtype; float32 on a CPU, which has no fast bfloat16 matmul."""
    return getattr(torch, recipe.dtype) if device.type == "cuda" and recipe.dtype != "auto" else torch.float32


def recipe_autocast(recipe: Recipe, device: torch.device) -> bool:
    """Whether the step runs under bf16 autocast: where the recipe asks for bf16 and on a GPU."""
    return device.type == "cuda" and bool(recipe.training.get("bf16"))


def prepare_finetune(model: Llama3MedForConditionalGeneration, recipe: Recipe):
    """The model as `llama3med train` prepares the recipe's stage for its first step."""
    model = trained_parts(recipe, model)
    float32_master_weights(model)
    if recipe.training.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def current_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**30


def finetune_step(model, inputs: dict, reference: bool, autocast: bool) -> dict:
    """One forward, backward and AdamW step; its loss, seconds, peak memory and gradients' norms."""
    device = inputs["input_ids"].device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before, start = current_gib(device), time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        if reference:
            unlabelled = {k: v for k, v in inputs.items() if k != "labels"}
            logits = model(**unlabelled).logits  # (B, T, vocab): every position
            loss = ForCausalLMLoss(logits, inputs["labels"], logits.shape[-1])
        else:
            loss = model(**inputs).loss
    loss.backward()
    grad_norms = [p.grad.float().norm().item() for p in model.parameters() if p.grad is not None]
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = peak_memory_gib(device)
    return {"loss": loss.item(), "seconds": seconds, "peak_gib": peak, "step_gib": peak - before, "grads": grad_norms}


def agreement(ours: dict, reference: dict) -> dict:
    """How far our step's loss and gradients are from the reference's (relative)."""
    grads = torch.tensor(ours["grads"]), torch.tensor(reference["grads"])
    return {
        "loss_relative_diff": abs(ours["loss"] - reference["loss"]) / abs(reference["loss"]),
        "grad_norms_relative_diff": ((grads[0] - grads[1]).abs() / grads[1].clamp_min(1e-12)).max().item(),
    }


def run_arm(args: argparse.Namespace) -> dict:
    recipe = load_recipe(RECIPE)
    device = best_device()
    config = SIZES[args.size]
    model = prepare_finetune(random_model(config, recipe_dtype(recipe, device), device), recipe)
    inputs = finetune_batch(config, args.batch or recipe.training["per_device_train_batch_size"], args.length, device)
    return finetune_step(model, inputs, args.arm == "reference", recipe_autocast(recipe, device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--batch", type=int, default=None, help="default: 1 on a CPU, the recipe's on a GPU")
    parser.add_argument("--length", type=int, default=None, help="tokens per row; default: the recipe's max_length")
    parser.add_argument("--arm", choices=("reference", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    recipe = load_recipe(RECIPE)
    args.length = args.length or recipe.max_length
    if args.batch is None and not torch.cuda.is_available():
        args.batch = 1  # the reference's float32 logits at batch 4 and 4,096 tokens take 25 GB of host memory
    if args.arm:
        Path(args.out).write_text(json.dumps(run_arm(args)))
        return

    figures = {"size": args.size}
    with tempfile.TemporaryDirectory() as folder:  # the GPU is the reference's alone while it runs
        out = Path(folder) / "reference.json"
        command = [sys.executable, __file__, "--size", args.size, "--length", str(args.length)]
        command += ["--arm", "reference", "--out", str(out)] + (["--batch", str(args.batch)] if args.batch else [])
        subprocess.run(command, check=True)
        figures["reference"] = json.loads(out.read_text())
    args.arm = "ours"
    figures["ours"] = run_arm(args)
    figures["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    figures.update(agreement(figures["ours"], figures["reference"]))
    batch = args.batch or recipe.training["per_device_train_batch_size"]
    print(f"one finetune step ({RECIPE.name}), batch {batch} x {args.length} tokens, {args.size}, {figures['device']}")
    print(f"{'loss':<44} {'peak GiB':>9} {'step GiB':>9} {'seconds':>8}")
    for arm, name in (("reference", "HF causal-LM loss, logits at every position"), ("ours", "Llama3-Med's loss")):
        row = figures[arm]
        print(f"{name:<44} {row['peak_gib']:9.2f} {row['step_gib']:9.2f} {row['seconds']:8.2f}")
    ratio = figures["reference"]["step_gib"] / figures["ours"]["step_gib"]
    print(
        f"the step's memory {ratio:.2f}x smaller, {figures['reference']['seconds'] / figures['ours']['seconds']:.2f}x "
        f"faster; loss relative diff {figures['loss_relative_diff']:.1e}, "
        f"gradient norms {figures['grad_norms_relative_diff']:.1e}"
    )


if __name__ == "__main__":
    main()
