"""Images per second of the S2 encoder against the reference way of computing it, in one run.

Reference (as S2's original wrapper does it): one HF tower call per scale with `output_hidden_states=True`,
the feature layer picked from the hidden states. Ours: the tower truncated at the feature layer, every
tile of every scale in one call, eager and as `--compile` runs it (`torch.compile`, dynamic shapes,
weights frozen into the graph; its compile time is not counted) and, on a CPU, compiled with the other
of `TanhGelu`'s two forms of SigLIP's activation (what the CPU's choice gains), and on a CPU with bfloat16
matmul instructions (`llama3med env` names them) in bfloat16, eager and compiled. All get the same random
weights; the features are compared (max abs diff) before anything is timed. The paths are timed in turns, one batch
each per round, and each keeps its fastest round: on a shared machine a busy neighbour slows whole
stretches, and turns put every path under the same stretch.

    python benchmarks/encoder_throughput.py                 # CPU: a small SigLIP (demo-like), 3 scales
    python benchmarks/encoder_throughput.py --size so400m   # SigLIP-so400m-patch14-384 shapes (GPU)
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel

from llama3med.environment import cpu_bfloat16_hardware
from llama3med.inference import compile_for_inference
from llama3med.model.multiscale import encode_multiscale, image_pyramid, merge_tiles, split_tiles
from llama3med.model.vision_tower import TanhGelu, VisionTower

SIZES = {
    "small": dict(
        image_size=128,
        patch_size=16,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=4,
    ),
    "so400m": dict(
        image_size=384,
        patch_size=14,
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
    ),
}


def reference_encode(full, pixel_values, scales, base, grid, layer):
    """One tower call per scale, features taken from `output_hidden_states`."""
    pooled = []
    for level in image_pyramid(pixel_values, scales):
        tiles = split_tiles(level, base)
        hidden = full(pixel_values=tiles, output_hidden_states=True).hidden_states[layer]
        pooled.append(F.adaptive_avg_pool2d(merge_tiles(hidden, pixel_values.shape[0], grid), grid))
    return torch.cat(pooled, dim=1).flatten(2).transpose(1, 2)


def encode_in_bfloat16(tower: VisionTower, pixels: torch.Tensor, *args) -> torch.Tensor:
    """`encode_multiscale` of a bfloat16 tower, its features back in float32 for comparing."""
    return encode_multiscale(tower, pixels.bfloat16(), *args).float()


def rate(fn, images: int, repeats: int, sync) -> float:
    fn()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return images * repeats / (time.perf_counter() - start)


def fastest_rates(paths: dict[str, Callable[[], object]], images: int, rounds: int, sync) -> dict[str, float]:
    """Images per second of each path in its fastest of `rounds` rounds, the paths taking turns."""
    for fn in paths.values():
        fn()  # warm-up
    fastest = dict.fromkeys(paths, float("inf"))
    for _ in range(rounds):
        for name, fn in paths.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            fastest[name] = min(fastest[name], time.perf_counter() - start)
    return {name: images / seconds for name, seconds in fastest.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = AutoConfig.for_model("siglip_vision_model", **SIZES[args.size])
    base, grid, layer = config.image_size, config.image_size // config.patch_size, -2
    scales = [base, 2 * base, 3 * base]

    torch.manual_seed(0)
    full = AutoModel.from_config(config).to(device, dtype).eval()
    tower = VisionTower(config, feature_layer=layer)
    tower.load_from_hf_tower(full)
    tower = tower.to(device, dtype).eval()
    pixels = torch.randn(args.batch, 3, scales[-1], scales[-1], device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    paths = {"reference: a call per scale, output_hidden_states": partial(reference_encode, full, layer=layer)}
    paths["ours: truncated tower, all tiles in one call"] = partial(encode_multiscale, tower)
    compiled = copy.deepcopy(tower)
    compile_for_inference(compiled)  # as `--compile` does
    paths["ours, torch.compile (--compile)"] = partial(encode_multiscale, compiled)
    if device.type == "cpu":  # the ablation of `TanhGelu`'s form, which only a compiled CPU tower chooses
        other_form = copy.deepcopy(tower)
        for mlp in (block.mlp for block in other_form.vision_model.encoder.layers):
            mlp.activation_fn = TanhGelu(sigmoid_form=not mlp.activation_fn.sigmoid_form)
        compile_for_inference(other_form)
        other = "PyTorch's tanh GELU kernel" if TanhGelu().sigmoid_form else "tanh GELU in its sigmoid form"
        paths[f"ours, torch.compile, {other}"] = partial(encode_multiscale, other_form)
    half = {}  # on a CPU with bfloat16 matmul instructions: the tower as `--dtype bfloat16` runs it
    bfloat16_hardware = cpu_bfloat16_hardware() if device.type == "cpu" else None
    if bfloat16_hardware:
        in_bfloat16 = copy.deepcopy(tower).to(torch.bfloat16)
        half["ours, bfloat16 (--dtype bfloat16)"] = partial(encode_in_bfloat16, in_bfloat16)
        compiled_bfloat16 = copy.deepcopy(in_bfloat16)
        compile_for_inference(compiled_bfloat16)
        half["ours, bfloat16, torch.compile"] = partial(encode_in_bfloat16, compiled_bfloat16)

    with torch.inference_mode():
        features = [encode(pixels, scales, base, grid) for encode in paths.values()]  # compiles happen here
        diff = max((features[0].float() - f.float()).abs().max().item() for f in features[1:])
        half_diffs = [(features[0] - encode(pixels, scales, base, grid)).abs().max().item() for encode in half.values()]
        paths |= half
        timed = {name: partial(encode, pixels, scales, base, grid) for name, encode in paths.items()}
        rates = fastest_rates(timed, args.batch, args.rounds, sync)
    reference_rate, our_rate, compiled_rate = list(rates.values())[:3]

    figures = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "tower": args.size,
        "scales": scales,
        "batch": args.batch,
        "max_abs_diff": diff,
        "max_abs_diff_bfloat16": max(half_diffs, default=None),
        "largest_feature": features[0].abs().max().item(),
        "images_per_s": rates,
        "speedup": our_rate / reference_rate,
        "speedup_compiled": compiled_rate / reference_rate,
    }
    print(f"{'path':<55} {'images/s':>10} {'ratio':>7}")
    for name, images_per_s in rates.items():
        print(f"{name:<55} {images_per_s:>10.2f} {images_per_s / reference_rate:>6.2f}x")
    print(
        f"speed-up {our_rate / reference_rate:.2f}x, compiled {compiled_rate / reference_rate:.2f}x; "
        f"max abs diff of features {diff:.2e} ({figures['device']})"
    )
    if half:
        print(
            f"bfloat16 (this CPU has {bfloat16_hardware}): max abs diff {max(half_diffs):.2e}, "
            f"against features up to {figures['largest_feature']:.2f}"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=1)


if __name__ == "__main__":
    main()
