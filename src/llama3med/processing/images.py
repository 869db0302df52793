"""Loading medical images (DICOM, PNG, JPEG, TIFF, BMP) into 8-bit RGB, with clear errors.

DICOM slices are rescaled to their physical values (Hounsfield units for CT) and windowed to 8 bits the
way a radiologist's viewer shows them; everything else goes through Pillow. The pixel count is capped
before decoding, so a decompression bomb is refused without being expanded.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 64_000_000  # a 8000 x 8000 image; far above any radiology slice

# (centre, width) in Hounsfield units: the usual CT presets.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}

Window = tuple[float, float] | str | None
ImageSource = str | Path | bytes | Image.Image


class ImageLoadError(ValueError):
    """An image that cannot be used; the message names the source and the reason."""

    def __init__(self, source: object, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"{describe_source(source)}: {reason}")


def describe_source(source: object) -> str:
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.size[0]}x{source.size[1]}>"
    return str(source)


def is_dicom(data: bytes) -> bool:
    """DICOM Part 10 files carry `DICM` after a 128-byte preamble."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def load_image(
    source: ImageSource,
    *,
    window: Window = None,
    frame: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """An 8-bit RGB image from a path, raw bytes or a PIL image.

    `window` (DICOM only) is a `(centre, width)` pair or a name from `CT_WINDOWS`; without it the
    file's own window is used, else its full range. `frame` picks a frame of a multi-frame DICOM
    (default: the middle one).
    """
    if isinstance(source, Image.Image):
        return _to_rgb(source, source, max_pixels)
    data = _read_bytes(source)
    if is_dicom(data) or (not isinstance(source, bytes) and Path(source).suffix.lower() in (".dcm", ".dicom")):
        pixels = dicom_to_uint8(data, source, window=window, frame=frame, max_pixels=max_pixels)
        return Image.fromarray(pixels).convert("RGB")
    return _open_with_pillow(data, source, max_pixels)


def _read_bytes(source: str | Path | bytes) -> bytes:
    if isinstance(source, bytes):
        if not source:
            raise ImageLoadError(source, "empty image data")
        return source
    path = Path(source)
    if not path.exists():
        raise ImageLoadError(source, "file not found")
    if not path.is_file():
        raise ImageLoadError(source, "not a regular file")
    data = path.read_bytes()
    if not data:
        raise ImageLoadError(source, "file is empty")
    return data


def _open_with_pillow(data: bytes, source: object, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_pixel_count(image.size[0] * image.size[1] * getattr(image, "n_frames", 1), source, max_pixels)
            image.load()
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageLoadError(source, f"refused as a decompression bomb ({err})") from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError(source, "not an image Pillow or pydicom can read") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(source, f"corrupt or truncated image ({err})") from None
    return _to_rgb(image, source, max_pixels)


def _check_pixel_count(pixels: int, source: object, max_pixels: int) -> None:
    if pixels > max_pixels:
        raise ImageLoadError(source, f"{pixels} pixels exceed the limit of {max_pixels} (decompression bomb?)")


def _to_rgb(image: Image.Image, source: object, max_pixels: int) -> Image.Image:
    _check_pixel_count(image.size[0] * image.size[1], source, max_pixels)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit greyscale (common for radiographs): stretch its own range to 8 bits.
        return Image.fromarray(_stretch_to_uint8(np.asarray(image, dtype=np.float64))).convert("RGB")
    return image.convert("RGB")


def _stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) / (high - low) * 255.0).astype(np.uint8)


def dicom_to_uint8(
    data: bytes,
    source: object = "<dicom>",
    *,
    window: Window = None,
    frame: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode a DICOM file to a windowed 8-bit array, `(H, W)` for greyscale or `(H, W, 3)` for colour."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as err:
        raise ImageLoadError(source, f"unreadable DICOM ({err})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageLoadError(source, "DICOM has no pixel data")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    _check_pixel_count(int(ds.get("Rows", 0)) * int(ds.get("Columns", 0)) * frames, source, max_pixels)
    try:
        pixels = ds.pixel_array
    except Exception as err:  # pydicom raises many types for broken or unsupported pixel data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        encoding = f" ({syntax.name})" if syntax is not None else ""
        reason = " ".join(str(err).split())  # pydicom lists each decoder's reason on a line of its own
        raise ImageLoadError(source, f"cannot decode the DICOM pixel data{encoding}: {reason}") from None
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if frames > 1:
        index = frames // 2 if frame is None else frame
        if not 0 <= index < frames:
            raise ImageLoadError(source, f"frame {index} requested but the DICOM has {frames} frames")
        pixels = pixels[index]
    if samples == 3:
        return np.clip(pixels, 0, 255).astype(np.uint8)
    values = pixels.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1) or 1) + float(
        getattr(ds, "RescaleIntercept", 0) or 0
    )
    centre_width = _resolve_window(window, ds, source)
    out = window_values(values, *centre_width) if centre_width else _stretch_to_uint8(values)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        out = 255 - out  # MONOCHROME1: low values are bright
    return out


def _resolve_window(window: Window, ds, source: object) -> tuple[float, float] | None:
    if isinstance(window, str):
        if window not in CT_WINDOWS:
            raise ImageLoadError(source, f"unknown window preset {window!r}; known: {', '.join(CT_WINDOWS)}")
        return CT_WINDOWS[window]
    if window is not None:
        return float(window[0]), float(window[1])
    if "WindowCenter" in ds and "WindowWidth" in ds:
        return _first(ds.WindowCenter), _first(ds.WindowWidth)
    return None


def _first(value) -> float:
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = value[0]
    return float(value)


def window_values(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """The DICOM linear VOI window (PS3.3 C.11.2.1.2.1) to 0..255."""
    if width < 1:
        raise ValueError(f"window width must be >= 1, got {width}")
    scaled = ((values - (centre - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.round(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)
