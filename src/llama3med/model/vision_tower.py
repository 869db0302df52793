"""The frozen ViT (SigLIP or CLIP), cut at the feature layer LLaVA reads.

Only the layers up to `vision_feature_layer` are built, so the layers after it are neither computed nor
kept in memory, and the tower is never asked for all its hidden states. The pooling head and the final
layer norm, which LLaVA-style models do not read, are dropped too. Compiled for a CPU without AVX-512,
SigLIP's tanh GELU is computed in an equal form without `tanh` (`TanhGelu`).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.activations import GELUTanh

from ..config import kept_vision_layers

# with AVX-512, inductor's vectorised `tanh` is fast enough that PyTorch's GELU kernel compiles faster
_CPU_TANH_IS_SLOW = torch.backends.cpu.get_cpu_capability() != "AVX512"


class TanhGelu(nn.Module):
    """SigLIP's activation, the tanh approximation of GELU `0.5 x (1 + tanh(z))`. Compiled for a CPU
    without AVX-512 it is computed as the same function `x * sigmoid(2 z)`: vectorised `tanh` costs about
    three times `exp` on an AVX2 CPU, where it was a fifth of the compiled tower's time (with AVX-512,
    PyTorch's kernel is 4-7 % faster than that form). Uncompiled, the form is several passes over memory
    instead of PyTorch's one kernel, so eager calls keep the kernel. `sigmoid_form` chooses the compiled form."""

    def __init__(self, sigmoid_form: bool = _CPU_TANH_IS_SLOW):
        super().__init__()
        self.sigmoid_form = sigmoid_form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sigmoid_form and x.is_cpu and torch.compiler.is_compiling():
            return x * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x))
        return F.gelu(x, approximate="tanh")


class VisionTower(nn.Module):
    """Patch features of base-size tiles: `(tiles, 3, S, S) -> (tiles, grid * grid, hidden)`."""

    def __init__(self, vision_config: PreTrainedConfig, feature_layer: int):
        super().__init__()
        truncated = copy.deepcopy(vision_config)
        truncated.num_hidden_layers = kept_vision_layers(vision_config.num_hidden_layers, feature_layer)
        if hasattr(truncated, "vision_use_head"):
            truncated.vision_use_head = False
        self.vision_model = AutoModel.from_config(truncated)
        # The last hidden state is read before the final norm (as `hidden_states[k]` is).
        self.vision_model.post_layernorm = nn.Identity()
        for module in list(self.vision_model.modules()):
            for name, child in module.named_children():
                if isinstance(child, GELUTanh):
                    setattr(module, name, TanhGelu())
        self.grid = vision_config.image_size // vision_config.patch_size

    @property
    def num_layers(self) -> int:
        return self.vision_model.config.num_hidden_layers

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vision_model(pixel_values=pixel_values).last_hidden_state  # (tiles, prefix + g*g, C)
        num_prefix = hidden.shape[1] - self.grid**2  # CLIP's CLS token; SigLIP has none
        return hidden[:, num_prefix:]

    def load_from_hf_tower(self, tower: PreTrainedModel) -> None:
        """Copy the weights of a full HF vision model (or a CLIP/SigLIP model's vision part)."""
        tower = getattr(tower, "vision_model", tower)
        wanted = self.vision_model.state_dict()
        source = {k: v for k, v in tower.state_dict().items() if k in wanted}
        missing = sorted(set(wanted) - set(source))
        if missing:
            raise ValueError(f"the vision tower checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
        self.vision_model.load_state_dict(source)
