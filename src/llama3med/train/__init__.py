"""Two-stage training (projector alignment, then instruction tuning) on the HF Trainer."""

from .recipe import Recipe, load_recipe
from .trainer import train

__all__ = ["Recipe", "load_recipe", "train"]
