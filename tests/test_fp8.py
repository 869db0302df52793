"""fp8 answering (`--fp8`): the LM's linear layers hold e4m3 weights, one scale per output channel, and
quantize their input one scale per token; `torch._scaled_mm` multiplies the two."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from llama3med.fp8 import FP8_MAX, Fp8Linear, check_fp8_device, quantize_language_model_fp8, quantize_rows


def test_each_row_is_scaled_so_its_largest_value_is_e4m3s_largest_and_keeps_e4m3s_precision():
    torch.manual_seed(0)
    x = torch.randn(8, 64) * torch.logspace(-3, 3, 8)[:, None]  # rows six orders of magnitude apart
    fp8, scale = quantize_rows(x)
    assert fp8.dtype == torch.float8_e4m3fn and scale.shape == (8, 1)
    assert torch.equal(fp8.float().abs().amax(dim=1), torch.full((8,), FP8_MAX))
    # 3 mantissa bits: a relative error of at most 2^-4, or half the subnormal spacing (2^-10) near zero
    error = (fp8.float() * scale - x).abs()
    assert (error <= torch.maximum(x.abs() * 2**-4, scale * 2**-10) * (1 + 1e-5)).all()


def test_an_fp8_linear_multiplies_the_quantized_operands_and_stays_close_to_the_float_layer():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(2, 5, 64)
    fp8 = Fp8Linear(linear)
    y = fp8(x)
    assert y.shape == (2, 5, 48) and y.dtype == x.dtype
    rows, scale = quantize_rows(x.reshape(-1, 64))
    product = ((rows.float() * scale) @ (fp8.weight.float() * fp8.weight_scale.t()).T).reshape(2, 5, 48)
    with torch.no_grad():
        assert ((y - linear.bias - product).abs() <= product.abs() * 2**-8 + 1e-6).all()  # a bfloat16 rounding
        full = linear(x)
    assert (y - full).norm() / full.norm() < 0.05


def tiny_llama(intermediate_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def test_every_linear_layer_of_the_language_model_but_its_head_goes_to_fp8_and_the_logits_barely_move():
    model = tiny_llama(intermediate_size=128)
    probe = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = model(probe).logits
    assert quantize_language_model_fp8(model) == 2 * 7  # q, k, v, o, gate, up, down in each layer
    assert [m for m in model.modules() if type(m) is nn.Linear] == [model.lm_head]
    assert {m.weight.dtype for m in model.modules() if isinstance(m, Fp8Linear)} == {torch.float8_e4m3fn}
    with torch.inference_mode():
        logits = model(probe).logits
    assert (logits - reference).norm() / reference.norm() < 0.05


def test_a_layer_whose_sizes_scaled_mm_cannot_take_keeps_its_precision():
    model = tiny_llama(intermediate_size=72)  # not a multiple of 16: the MLP's three layers stay
    assert quantize_language_model_fp8(model) == 2 * 4
    assert all(
        type(layer.mlp.down_proj) is nn.Linear and type(layer.self_attn.q_proj) is Fp8Linear
        for layer in model.model.layers
    )


def test_a_gpu_without_fp8_tensor_cores_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r"compute capability 8\.9 or newer.*A100-SXM4-80GB has 8\.0"):
        check_fp8_device(torch.device("cuda"))
