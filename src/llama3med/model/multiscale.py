"""Hierarchical multi-resolution encoding (S2, "scaling on scales", Shi et al. 2024).

One image at the largest scale becomes a pyramid (e.g. 384, 768 and 1152 px). Each scale is cut into
non-overlapping base-size tiles, every tile of every scale of every image goes through the tower in one
call, the tiles of each scale are stitched back into one feature map, each map is area-pooled to the base
grid and the maps are concatenated along channels. The LM sees one base image's worth of tokens, each
carrying the detail of all scales.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def image_pyramid(
    pixel_values: torch.Tensor, scales: Sequence[int], resize: str = "bilinear_antialiased"
) -> list[torch.Tensor]:
    """`(B, 3, S_max, S_max)` resized to every scale (the largest is the input itself): antialiased
    bilinear (`bilinear_antialiased`), or bicubic without antialiasing as S2's reference code resizes
    (`bicubic`; see `Llama3MedConfig.pyramid_resize`). They are computed in float32 (CPUs have no
    bfloat16 or float16 antialiased resize) and returned in the input's dtype."""
    largest, as_float = pixel_values.shape[-1], pixel_values.float()  # one float32 copy for every scale
    options = {"mode": "bicubic"} if resize == "bicubic" else {"mode": "bilinear", "antialias": True}
    return [
        pixel_values
        if scale == largest
        else F.interpolate(as_float, size=(scale, scale), align_corners=False, **options).to(pixel_values.dtype)
        for scale in scales
    ]


def split_tiles(images: torch.Tensor, tile: int) -> torch.Tensor:
    """`(B, C, n*t, n*t) -> (B*n*n, C, t, t)`, tiles in row-major order within each image."""
    b, c, side, _ = images.shape
    n = side // tile
    tiles = images.reshape(b, c, n, tile, n, tile).permute(0, 2, 4, 1, 3, 5)
    return tiles.reshape(b * n * n, c, tile, tile)


def merge_tiles(features: torch.Tensor, batch: int, grid: int) -> torch.Tensor:
    """`(B*n*n, g*g, C) -> (B, C, n*g, n*g)`: the inverse of `split_tiles` on feature maps."""
    n = int(round((features.shape[0] // batch) ** 0.5))
    channels = features.shape[-1]
    maps = features.reshape(batch, n, n, grid, grid, channels).permute(0, 5, 1, 3, 2, 4)
    return maps.reshape(batch, channels, n * grid, n * grid)


def encode_multiscale(
    tower: Callable[[torch.Tensor], torch.Tensor],
    pixel_values: torch.Tensor,
    scales: Sequence[int],
    base_size: int,
    grid: int,
    resize: str = "bilinear_antialiased",
) -> torch.Tensor:
    """S2 features of `(B, 3, S_max, S_max)` images: `(B, grid*grid, C * len(scales))`.

    `tower` maps `(tiles, 3, base_size, base_size)` to `(tiles, grid*grid, C)`; it is called once.
    `resize` makes the smaller scales (`image_pyramid`).
    """
    batch = pixel_values.shape[0]
    if pixel_values.shape[-1] != scales[-1] or pixel_values.shape[-2] != scales[-1]:
        raise ValueError(f"pixel_values must be {scales[-1]}x{scales[-1]}, got {tuple(pixel_values.shape[-2:])}")
    tiles = [split_tiles(level, base_size) for level in image_pyramid(pixel_values, scales, resize)]
    features = tower(torch.cat(tiles))  # (sum_s B*n_s^2, g*g, C): one call for everything
    pooled = []
    for level in torch.split(features, [t.shape[0] for t in tiles]):
        feature_map = merge_tiles(level, batch, grid)  # (B, C, n*g, n*g)
        pooled.append(F.adaptive_avg_pool2d(feature_map, grid))  # area pooling to (B, C, g, g)
    return torch.cat(pooled, dim=1).flatten(2).transpose(1, 2)  # (B, g*g, C * n_scales)
