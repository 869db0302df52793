"""Llama3-Med: high-resolution biomedical vision-language assistants.

Importing the package registers the model with transformers' Auto classes, so
`AutoConfig`, `AutoModelForImageTextToText` and `AutoProcessor` load our checkpoints.
"""

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from .config import Llama3MedConfig
from .model import Llama3MedForConditionalGeneration
from .processing import ImageLoadError, Llama3MedProcessor, load_image

__version__ = "0.1.0"

AutoConfig.register(Llama3MedConfig.model_type, Llama3MedConfig, exist_ok=True)
AutoModelForImageTextToText.register(Llama3MedConfig, Llama3MedForConditionalGeneration, exist_ok=True)
AutoProcessor.register(Llama3MedConfig, Llama3MedProcessor, exist_ok=True)

__all__ = [
    "ImageLoadError",
    "Llama3MedConfig",
    "Llama3MedForConditionalGeneration",
    "Llama3MedProcessor",
    "load_image",
]
