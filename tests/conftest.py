"""Fixtures: tiny real components (SigLIP/CLIP towers, Llama LMs, a trained BPE tokenizer) built from
configs, and DICOM files written with pydicom. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from llama3med import Llama3MedConfig
from llama3med.processing import train_bpe_tokenizer

CORPUS = [
    "Is there a lesion in the liver? Yes, there is one small lesion in the right lobe.",
    "What modality is this? This is an axial CT slice of the abdomen.",
    "How many lesions are visible? Two lesions are visible.",
    "Which side is the lesion on? The lesion is on the left side.",
    "Is the kidney normal? No, the left kidney shows a cyst.",
    "Describe the image. An MRI slice of the brain with no abnormality.",
]

TINY_SIGLIP = dict(
    model_type="siglip_vision_model",
    image_size=32,
    patch_size=8,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
)
TINY_CLIP = dict(TINY_SIGLIP, model_type="clip_vision_model")


def tiny_llama(vocab_size: int) -> dict:
    return dict(
        model_type="llama",
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="session")
def tokenizer():
    return train_bpe_tokenizer(CORPUS * 4, vocab_size=320, model_max_length=512)


@pytest.fixture()
def tiny_config(tokenizer) -> Llama3MedConfig:
    return Llama3MedConfig(
        vision_config=TINY_SIGLIP,
        text_config=tiny_llama(len(tokenizer)),
        scales=[32, 64, 96],
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )


@pytest.fixture(scope="session")
def component_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """A SigLIP tower dir and a Llama LM dir with a text-only tokenizer, as users have them."""
    root = tmp_path_factory.mktemp("components")
    tokenizer = train_bpe_tokenizer(CORPUS * 4, vocab_size=320, model_max_length=512, image_token=False)
    torch.manual_seed(0)
    vision = AutoModel.from_config(AutoConfig.for_model(**TINY_SIGLIP))
    vision.save_pretrained(root / "siglip")
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_llama(len(tokenizer))))
    llm.save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    return root / "siglip", root / "llama"


@pytest.fixture(scope="session")
def built_model_dir(tmp_path_factory, component_dirs) -> Path:
    from llama3med.checkpoints import build, save

    out = tmp_path_factory.mktemp("built") / "model"
    torch.manual_seed(0)
    model, processor = build(*component_dirs, scales=[32, 64, 96])
    save(model, processor, out)
    return out


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    with_pixels: bool = True,
) -> Path:
    """A real DICOM Part 10 file of unsigned 16-bit (or 8-bit) greyscale pixels; 3-D arrays are frames."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape[-2:]
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept or 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if with_pixels:
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
