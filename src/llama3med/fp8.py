"""fp8 matmuls for answering: the LM's linear layers with float8 (e4m3) weights and activations.

Each weight row (an output channel) is scaled into e4m3's range and stored in one byte; each activation
row (a token) is scaled the same way as it arrives; `torch._scaled_mm` multiplies the two in fp8 and
applies both scales to its output. On a GPU with fp8 tensor cores (compute capability 8.9 and up: Ada,
Hopper) the LM's weights take half the memory, a decoding step reads half the bytes, and the matmul
ceiling doubles; the tower, the projector, the embeddings and the LM head stay as they are. A CPU runs it
too, slowly (that is how the tests check it). Answers move a little: compare a benchmark's scores with
and without `--fp8` before relying on it. Inference only: the quantized layers hold no gradients.
"""

from __future__ import annotations

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
FP8_ALIGNMENT = 16  # `_scaled_mm` needs both dimensions of the weight to be multiples of this on a GPU


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(rows, K) -> (fp8 (rows, K), float32 scales (rows, 1))` with `x ~= fp8 * scales`, each row's
    largest magnitude mapped to e4m3's largest value."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Fp8Linear(nn.Module):
    """`nn.Linear`'s forward on fp8 weights (one scale per output channel) and fp8 activations (one scale
    per token, computed on the fly)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight", weight)  # (out, in), e4m3
        self.register_buffer("weight_scale", scale.t().contiguous())  # (1, out)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, scale = quantize_rows(x.reshape(-1, self.in_features))  # (tokens, in), (tokens, 1)
        out = torch._scaled_mm(  # row-wise scales need a bfloat16 output on a GPU
            rows, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, out_dtype=torch.bfloat16
        ).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def check_fp8_device(device: torch.device) -> None:
    """Refuse a GPU without fp8 tensor cores by name, before any weight is quantized."""
    if device.type == "cuda" and (capability := torch.cuda.get_device_capability(device)) < (8, 9):
        major, minor = capability
        raise ValueError(
            f"--fp8 needs a GPU with fp8 tensor cores (compute capability 8.9 or newer: Ada, Hopper); "
            f"{torch.cuda.get_device_name(device)} has {major}.{minor}"
        )
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--fp8 runs on a CUDA GPU or a CPU, not on {device.type}")


def quantize_language_model_fp8(language_model: nn.Module) -> int:
    """Replace, in place, every linear layer of a causal LM except its head with an `Fp8Linear`;
    returns how many were replaced. A layer whose sizes `_scaled_mm` cannot take stays as it is."""
    check_fp8_device(next(language_model.parameters()).device)
    head = language_model.get_output_embeddings()
    replaced = 0
    for module in list(language_model.modules()):
        for name, child in list(module.named_children()):
            aligned = isinstance(child, nn.Linear) and all(
                size % FP8_ALIGNMENT == 0 for size in (child.in_features, child.out_features)
            )
            if aligned and child is not head:
                setattr(module, name, Fp8Linear(child))  # the full-precision weight goes with `child`
                replaced += 1
    return replaced
