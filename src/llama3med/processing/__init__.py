from .chat import (
    IMAGE_PLACEHOLDER,
    LLAMA3_CHAT_TEMPLATE,
    llava_to_messages,
    message_content,
    multimodal_to_messages,
    with_system,
)
from .images import (
    CT_WINDOWS,
    ImageLoadError,
    dicom_identifiers,
    dicom_series,
    dicom_to_uint8,
    find_images,
    frame_count,
    load_image,
    nifti_to_uint8,
    parse_window,
    window_values,
)
from .processor import IGNORE_INDEX, Llama3MedProcessor, SampleTooLongError, pad_sequences
from .tokenizer import train_bpe_tokenizer

__all__ = [
    "CT_WINDOWS",
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "LLAMA3_CHAT_TEMPLATE",
    "ImageLoadError",
    "Llama3MedProcessor",
    "SampleTooLongError",
    "dicom_identifiers",
    "dicom_series",
    "dicom_to_uint8",
    "find_images",
    "frame_count",
    "llava_to_messages",
    "load_image",
    "message_content",
    "multimodal_to_messages",
    "nifti_to_uint8",
    "pad_sequences",
    "parse_window",
    "train_bpe_tokenizer",
    "window_values",
    "with_system",
]
