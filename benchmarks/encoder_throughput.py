"""Images per second of the S2 encoder against the reference way of computing it, in one run.

Reference (as S2's original wrapper does it): one HF tower call per scale with `output_hidden_states=True`,
the feature layer picked from the hidden states. Ours: the tower truncated at the feature layer, every
tile of every scale in one call, eager and as `--compile` runs it (`torch.compile`, dynamic shapes,
weights frozen into the graph; its compile time is not counted). All get the same random weights; the
features are compared (max abs diff) before anything is timed.

    python benchmarks/encoder_throughput.py                 # CPU: a small SigLIP (demo-like), 3 scales
    python benchmarks/encoder_throughput.py --size so400m   # SigLIP-so400m-patch14-384 shapes (GPU)
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel

from llama3med.inference import compile_for_inference
from llama3med.model.multiscale import encode_multiscale, image_pyramid, merge_tiles, split_tiles
from llama3med.model.vision_tower import VisionTower

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


def rate(fn, images: int, repeats: int, sync) -> float:
    fn()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return images * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
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

    with torch.inference_mode():
        reference = reference_encode(full, pixels, scales, base, grid, layer)
        ours = encode_multiscale(tower, pixels, scales, base, grid)
        compiled = copy.deepcopy(tower)
        compile_for_inference(compiled)  # as `--compile` does
        compiled_features = encode_multiscale(compiled, pixels, scales, base, grid)
        diff = max((reference.float() - f.float()).abs().max().item() for f in (ours, compiled_features))
        reference_rate = rate(
            lambda: reference_encode(full, pixels, scales, base, grid, layer), args.batch, args.repeats, sync
        )
        our_rate = rate(lambda: encode_multiscale(tower, pixels, scales, base, grid), args.batch, args.repeats, sync)
        compiled_rate = rate(
            lambda: encode_multiscale(compiled, pixels, scales, base, grid), args.batch, args.repeats, sync
        )

    figures = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "tower": args.size,
        "scales": scales,
        "batch": args.batch,
        "max_abs_diff": diff,
        "reference_images_per_s": reference_rate,
        "ours_images_per_s": our_rate,
        "ours_compiled_images_per_s": compiled_rate,
        "speedup": our_rate / reference_rate,
        "speedup_compiled": compiled_rate / reference_rate,
    }
    print(f"{'path':<55} {'images/s':>10}")
    print(f"{'reference: a call per scale, output_hidden_states':<55} {reference_rate:>10.2f}")
    print(f"{'ours: truncated tower, all tiles in one call':<55} {our_rate:>10.2f}")
    print(f"{'ours, torch.compile (--compile)':<55} {compiled_rate:>10.2f}")
    print(
        f"speed-up {our_rate / reference_rate:.2f}x, compiled {compiled_rate / reference_rate:.2f}x; "
        f"max abs diff of features {diff:.2e} ({figures['device']})"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=1)


if __name__ == "__main__":
    main()
