"""What `--dtype bfloat16` gains over the CPU's default float32, at widths near the paper's, in one run.

Random weights, the same in both precisions: an S2 encoder over a SigLIP of so400m's width and geometry
(1,152 wide, 384 px tiles of 14 px patches, scales 384/768/1152: 14 tiles an image) with `--tower-layers`
of its 26 kept layers, and a Llama of `--lm-width` and `--lm-layers` (Llama-3-8B: 4,096 and 32) reading
the 729 image tokens and a short question. Timed: one image encoded, that prompt's prefill, and greedy
decoding with the static-cache decoder at batch 1 and 8 (steps a second, after a short prompt). Agreement: the largest
difference of bfloat16's features and first logits from float32's, against their largest magnitude, and
whether both pick the same first token. On CPUs with AMX (`llama3med env` names them) bfloat16 matrices
are multiplied in hardware; elsewhere it mostly saves memory.

    python benchmarks/cpu_bfloat16.py [--tower-layers 2] [--lm-width 2048] [--lm-layers 8]
"""

from __future__ import annotations

import argparse
import copy
import time
from functools import partial

import torch
from encoder_throughput import SIZES
from transformers import AutoConfig, GenerationConfig, LlamaConfig, LlamaForCausalLM

from llama3med.environment import cpu_bfloat16_hardware
from llama3med.generation import StaticCacheDecoder
from llama3med.model.multiscale import encode_multiscale
from llama3med.model.vision_tower import VisionTower

BASE, PATCH = SIZES["so400m"]["image_size"], SIZES["so400m"]["patch_size"]
GRID = BASE // PATCH
SCALES = [BASE, 2 * BASE, 3 * BASE]
PROMPT_TOKENS = GRID * GRID + 32  # the image's tokens and a question
DECODE_PROMPT = 32  # decoding is timed after a short prompt, whose pass is subtracted anyway


def seconds(fn, repeats: int = 2) -> float:
    """The fastest of `repeats` calls, after one to warm up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def decode_steps_per_s(decoder: StaticCacheDecoder, embeds: torch.Tensor, steps: int) -> float:
    """Greedy decoding steps a second after the prompt, the prompt's own pass subtracted."""
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    prompt_only = seconds(lambda: decoder(embeds, mask, 1))
    return (steps - 1) / (seconds(lambda: decoder(embeds, mask, steps)) - prompt_only)


def measure(tower: VisionTower, lm: LlamaForCausalLM, pixels: torch.Tensor, embeds: torch.Tensor, steps: int):
    """The rates of one precision, and its features and first logits (in float32) to compare."""
    encode = partial(encode_multiscale, tower, pixels, SCALES, BASE, GRID)
    prefill = partial(lm, inputs_embeds=embeds)
    decoder = StaticCacheDecoder(lm, GenerationConfig(eos_token_id=None, pad_token_id=0))
    rates = {
        "S2 encode, images/s": 1 / seconds(encode),
        f"prefill of {PROMPT_TOKENS} positions, /s": 1 / seconds(prefill),
        "decode, batch 1, steps/s": decode_steps_per_s(decoder, embeds[:, :DECODE_PROMPT], steps),
        "decode, batch 8, steps/s": decode_steps_per_s(decoder, embeds[:, :DECODE_PROMPT].expand(8, -1, -1), steps),
    }
    return rates, (encode().float(), prefill().logits[0, -1].float())


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tower-layers", type=int, default=2)
    parser.add_argument("--lm-width", type=int, default=2048)
    parser.add_argument("--lm-layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    vision = AutoConfig.for_model(
        "siglip_vision_model", **{**SIZES["so400m"], "num_hidden_layers": args.tower_layers + 1}
    )
    tower32 = VisionTower(vision, feature_layer=-2).eval()
    text = LlamaConfig(
        hidden_size=args.lm_width,
        intermediate_size=args.lm_width * 7 // 2,
        num_hidden_layers=args.lm_layers,
        num_attention_heads=args.lm_width // 128,
        num_key_value_heads=max(1, args.lm_width // 512),
        vocab_size=32000,
    )
    lm32 = LlamaForCausalLM(text).eval()
    pixels = torch.rand(1, 3, SCALES[-1], SCALES[-1])
    prompt = torch.randn(1, PROMPT_TOKENS, args.lm_width) * 0.02

    rows, outputs = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        tower, lm = copy.deepcopy(tower32).to(dtype), copy.deepcopy(lm32).to(dtype)
        rows[dtype], outputs[dtype] = measure(tower, lm, pixels.to(dtype), prompt.to(dtype), args.steps)
    print(
        f"CPU bfloat16 instructions: {cpu_bfloat16_hardware()}; {torch.get_num_threads()} threads; tower "
        f"{args.tower_layers} layers x {vision.hidden_size} wide, LM {args.lm_layers} layers x {args.lm_width} wide"
    )
    print(f"{'':<38} {'float32':>10} {'bfloat16':>10} {'ratio':>7}")
    for name, reference in rows[torch.float32].items():
        ours = rows[torch.bfloat16][name]
        print(f"{name:<38} {reference:>10.2f} {ours:>10.2f} {ours / reference:>6.2f}x")
    for what, reference, ours in zip(("features", "first logits"), *outputs.values(), strict=True):
        diff = (reference - ours).abs().max().item()
        print(f"{what}: max abs diff {diff:.2e} against values up to {reference.abs().max().item():.2f}")
    first = [logits.argmax().item() for _, logits in outputs.values()]
    print(f"first greedy token: {'the same' if first[0] == first[1] else 'different'} ({first[0]}, {first[1]})")


if __name__ == "__main__":
    main()
