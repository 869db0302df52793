"""The projector from S2 image features into the LM's embedding space."""

from __future__ import annotations

import torch
from torch import nn

from ..config import Llama3MedConfig


class MultiModalProjector(nn.Module):
    """`mlp2x_gelu` (Linear -> GELU -> Linear, LLaVA-1.5's and the paper's) or a single `linear` layer."""

    def __init__(self, config: Llama3MedConfig):
        super().__init__()
        width = config.text_config.hidden_size
        self.linear_1 = nn.Linear(config.image_feature_size, width)
        if config.projector_type == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(width, width)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        hidden = self.linear_1(image_features)
        if hasattr(self, "linear_2"):
            hidden = self.linear_2(self.act(hidden))
        return hidden
