from .modeling_llama3med import Llama3MedForConditionalGeneration, Llama3MedPreTrainedModel
from .multiscale import encode_multiscale
from .projector import MultiModalProjector
from .vision_tower import VisionTower

__all__ = [
    "Llama3MedForConditionalGeneration",
    "Llama3MedPreTrainedModel",
    "MultiModalProjector",
    "VisionTower",
    "encode_multiscale",
]
