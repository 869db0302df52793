"""The S2 encoder: tiling, stitching, pooling and concatenation, checked against independent computations."""

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code
from transformers import AutoConfig, AutoModel

from conftest import TINY_CLIP, TINY_SIGLIP
from llama3med.model.multiscale import encode_multiscale, image_pyramid
from llama3med.model.vision_tower import TanhGelu, VisionTower

PATCH = 8
BASE = 32
GRID = BASE // PATCH


def patch_mean_tower(tiles: torch.Tensor) -> torch.Tensor:
    """A 'tower' whose feature of each patch is its mean colour: (N, 3, 32, 32) -> (N, 16, 3)."""
    return F.avg_pool2d(tiles, PATCH).flatten(2).transpose(1, 2)


def test_known_answer_tiling_merge_and_pooling_are_exact():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 96, 96)
    scales = [32, 64, 96]
    out = encode_multiscale(patch_mean_tower, images, scales, BASE, GRID)
    # Without any tiling: a scale's stitched map pooled to the base grid is its mean over (patch * n)^2 blocks.
    expected = [
        F.avg_pool2d(level, PATCH * (scale // BASE)).flatten(2).transpose(1, 2)
        for level, scale in zip(image_pyramid(images, scales), scales, strict=True)
    ]
    assert out.shape == (2, GRID * GRID, 3 * len(scales))
    torch.testing.assert_close(out, torch.cat(expected, dim=-1), rtol=0, atol=1e-6)


def test_largest_scale_is_the_input_and_others_are_antialiased_resizes():
    images = torch.zeros(1, 3, 96, 96)
    images[..., ::2, :] = 1.0  # one-pixel stripes: point sampling would turn them into solid 0 or 1
    small, largest = image_pyramid(images, [32, 96])
    assert largest is images
    assert small.shape == (1, 3, 32, 32)
    assert (small - 0.5).abs().max() < 0.1


def test_s2s_bicubic_resize_is_not_antialiased_shrinking_by_three_it_keeps_each_blocks_centre_pixel():
    """S2's reference code (and the paper's) resizes with plain bicubic interpolation: a third of the size
    samples the centre of every 3x3 block and averages nothing."""
    images = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    small, largest = image_pyramid(images, [32, 96], resize="bicubic")
    assert largest is images
    torch.testing.assert_close(small, images[..., 1::3, 1::3], rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_images_are_resized_in_float32_and_kept_in_their_dtype(dtype):
    images = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0)).to(dtype)
    exact = image_pyramid(images.float(), [32, 64, 96])
    half = image_pyramid(images, [32, 64, 96])
    assert all(level.dtype == dtype for level in half)
    assert all(torch.equal(h, e.to(dtype)) for h, e in zip(half[:2], exact[:2], strict=True))


def test_all_tiles_of_all_scales_and_images_go_through_the_tower_in_one_call():
    calls = []

    def counting_tower(tiles):
        calls.append(tiles.shape[0])
        return patch_mean_tower(tiles)

    encode_multiscale(counting_tower, torch.randn(3, 3, 96, 96), [32, 64, 96], BASE, GRID)
    assert calls == [3 * (1 + 4 + 9)]


def hf_and_truncated_tower(config: dict):
    """A randomly initialised HF vision model and our tower cut at layer -2, sharing its weights."""
    torch.manual_seed(0)
    full = AutoModel.from_config(AutoConfig.for_model(**config)).eval()
    tower = VisionTower(full.config, feature_layer=-2).eval()
    tower.load_from_hf_tower(full)
    return full, tower


def test_siglip_tower_stops_at_the_feature_layer_and_matches_hidden_states():
    full, tower = hf_and_truncated_tower(TINY_SIGLIP)
    assert tower.num_layers == TINY_SIGLIP["num_hidden_layers"] - 1  # the last layer is not built
    assert not any(".layers.2." in name for name in tower.state_dict())
    tiles = torch.randn(5, 3, BASE, BASE)
    with torch.no_grad():
        reference = full(pixel_values=tiles, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(tower(tiles), reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sigmoid_form", [True, False])
def test_the_towers_tanh_gelu_is_pytorchs_and_compiles_without_tanh_where_tanh_is_slow(sigmoid_form):
    _, tower = hf_and_truncated_tower(TINY_SIGLIP)
    assert all(isinstance(layer.mlp.activation_fn, TanhGelu) for layer in tower.vision_model.encoder.layers)
    assert TanhGelu().sigmoid_form == (torch.backends.cpu.get_cpu_capability() != "AVX512")
    x = torch.cat([torch.linspace(-12, 12, 100_001), torch.tensor([-1e30, -1e6, 0.0, 1e6, 1e30])])
    expected = F.gelu(x, approximate="tanh")
    assert torch.equal(TanhGelu(sigmoid_form)(x), expected)  # eager: PyTorch's own kernel
    compiled, (code,) = run_and_get_code(torch.compile(TanhGelu(sigmoid_form)), x)
    torch.testing.assert_close(compiled, expected, rtol=1e-6, atol=1e-6)
    assert ("tanh" not in code and "exp" in code) == sigmoid_form


def test_clip_tower_drops_the_cls_token():
    full, tower = hf_and_truncated_tower(TINY_CLIP)
    tiles = torch.randn(2, 3, BASE, BASE)
    with torch.no_grad():
        reference = full(pixel_values=tiles, output_hidden_states=True).hidden_states[-2][:, 1:]
        features = tower(tiles)
    assert features.shape == (2, GRID * GRID, TINY_CLIP["hidden_size"])
    torch.testing.assert_close(features, reference, rtol=0, atol=1e-6)


def test_one_call_equals_a_scale_by_scale_reference_on_a_real_tower():
    full, tower = hf_and_truncated_tower(TINY_SIGLIP)
    images = torch.randn(2, 3, 96, 96)
    scales = [32, 64, 96]
    with torch.no_grad():
        fast = encode_multiscale(tower, images, scales, BASE, GRID)
        reference = []
        for scale in scales:  # the S2 reference: one tower call per tile, full hidden states
            level = (
                F.interpolate(images, size=(scale, scale), mode="bilinear", antialias=True) if scale < 96 else images
            )
            n = scale // BASE
            rows = []
            for i in range(n):
                row = []
                for j in range(n):
                    tile = level[:, :, i * BASE : (i + 1) * BASE, j * BASE : (j + 1) * BASE]
                    feats = full(pixel_values=tile, output_hidden_states=True).hidden_states[-2]
                    row.append(feats.transpose(1, 2).reshape(2, -1, GRID, GRID))
                rows.append(torch.cat(row, dim=3))
            stitched = torch.cat(rows, dim=2)
            reference.append(F.avg_pool2d(stitched, n).flatten(2).transpose(1, 2))
    torch.testing.assert_close(fast, torch.cat(reference, dim=-1), rtol=1e-5, atol=1e-5)


def test_a_single_scale_is_plain_llava_encoding():
    full, tower = hf_and_truncated_tower(TINY_SIGLIP)
    images = torch.randn(3, 3, BASE, BASE)
    with torch.no_grad():
        single = encode_multiscale(tower, images, [BASE], BASE, GRID)
        plain = full(pixel_values=images, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(single, plain, rtol=0, atol=1e-6)
