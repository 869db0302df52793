"""Stage `tower`: teach a vision tower built from scratch where findings are, before the paper's stages.

The paper starts from SigLIP, pretrained on billions of image-text pairs. A tower built from scratch (the
demo's) has no such start, and the two stages alone do not teach it small findings: the caption loss
reaches the answers' prior long before the gradient back through the LM shapes the tower. This stage
gives the tower a dense signal instead: a linear head on each image token's multi-scale feature predicts
whether a finding's box touches that token's cell of the image. The head is dropped afterwards, as
SigLIP's text tower is; the stage's output is the whole Llama3-Med with its trained tower.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import Llama3MedForConditionalGeneration
from ..model.multiscale import encode_multiscale

# Cells with a finding are a few percent of the grid; weighting them up keeps the head from settling on
# "no finding anywhere".
FINDING_WEIGHT = 4.0


class FindingMapModel(nn.Module):
    """The Llama3-Med's vision tower (shared, not copied) with a linear finding head per image token."""

    def __init__(self, model: Llama3MedForConditionalGeneration):
        super().__init__()
        config = model.config
        self.vision_tower = model.vision_tower
        self.scales, self.base_image_size, self.image_grid = config.scales, config.base_image_size, config.image_grid
        self.pyramid_resize = config.pyramid_resize
        self.head = nn.Linear(config.image_feature_size, 1)
        self.vision_tower.requires_grad_(True)

    def forward(self, pixel_values: torch.Tensor, finding_map: torch.Tensor) -> dict[str, torch.Tensor]:
        """`(B, 3, S_max, S_max)` images and `(B, grid * grid)` targets -> per-token logits and their loss."""
        features = encode_multiscale(
            self.vision_tower, pixel_values, self.scales, self.base_image_size, self.image_grid, self.pyramid_resize
        )
        logits = self.head(features).squeeze(-1)  # (B, grid * grid)
        weight = torch.tensor(FINDING_WEIGHT, device=logits.device)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, finding_map, pos_weight=weight)
        return {"loss": loss, "logits": logits}
