"""Loading medical images (DICOM, NIfTI, PNG, JPEG, TIFF, BMP) into 8-bit RGB, with clear errors.

DICOM slices and NIfTI volumes are rescaled to their physical values (Hounsfield units for CT) and
windowed to 8 bits the way a radiologist's viewer shows them; a volume (a NIfTI file, or a directory of
one DICOM series) gives one axial slice, oriented as such a viewer shows it. Everything else goes through
Pillow; a whole-slide pathology image (a pyramidal TIFF such as Aperio's SVS) gives the largest of its
resolutions within the pixel cap. Pixel and voxel counts are capped before decoding, so a decompression
bomb is refused without being expanded.
"""

from __future__ import annotations

import gzip
import io
import struct
import threading
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, TiffImagePlugin

DEFAULT_MAX_PIXELS = 64_000_000  # a 8000 x 8000 image; far above any radiology slice
MAX_VOLUME_VOXELS = 2**30  # a 1024^3 volume; a whole-body CT at 0.7 mm is about a quarter of that
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# files `find_images` takes by name; DICOM files are known by content, whatever they are called
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".svs", ".bmp", ".webp")
VL_WHOLE_SLIDE_MICROSCOPY = "1.2.840.10008.5.1.4.1.1.77.1.6"  # DICOM's SOP class of whole-slide images
TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic TIFF and BigTIFF, both byte orders

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


def shown_frame(count: int, frame: int | None = None) -> int:
    """The frame or slice shown of `count`: `frame`, or when none is chosen the middle one, as viewers
    open a series."""
    return count // 2 if frame is None else frame


def nifti_header_bytes(data: bytes) -> bytes | None:
    """The first bytes of a NIfTI-1 or NIfTI-2 file, decompressed when it is gzipped; None if `data` is
    not one. Single-file NIfTI carries `n+1` at byte 344 (NIfTI-1) or `n+2` at byte 4 (NIfTI-2)."""
    head = data[:540]
    if data[:2] == b"\x1f\x8b":
        try:
            head = zlib.decompressobj(wbits=31).decompress(data, 540)
        except zlib.error:
            return None
    return head if head[344:348] == b"n+1\x00" or head[4:8] == b"n+2\x00" else None


def parse_window(value) -> Window:
    """A window as people write it (`"lung"`, `"-600,1500"`, `[-600, 1500]`), checked."""
    if isinstance(value, str) and value in CT_WINDOWS:
        return value
    parts = value.split(",") if isinstance(value, str) else value
    try:
        centre, width = (float(part) for part in parts)
    except (TypeError, ValueError):
        raise ValueError(f"window must be CENTRE,WIDTH or one of {', '.join(CT_WINDOWS)}, got {value!r}") from None
    if width < 1:
        raise ValueError(f"window width must be at least 1, got {width:g}")
    return (centre, width)


def load_image(
    source: ImageSource,
    *,
    window: Window = None,
    frame: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """An 8-bit RGB image from a path (a file, or a directory of one DICOM series), raw bytes or a PIL
    image.

    `window` (DICOM and NIfTI) is a `(centre, width)` pair or a name from `CT_WINDOWS`; without it the
    file's own display curve is used (DICOM's VOI LUT or window tags, NIfTI's `cal_min`/`cal_max`), else
    its full range.
    `frame` picks a frame of a multi-frame DICOM, or a slice of a DICOM series or a NIfTI volume counted
    from the feet (default: the middle one). A gzipped NIfTI file asked for again is kept decompressed
    while it is unchanged (1 GiB of the latest in all), so that each of its slices is read in turn
    without decompressing the volume up to it again. A TIFF stack gives its page `frame` (the middle one
    by default); any other picture its first page, or for a whole-slide image over `max_pixels`, its
    largest smaller copy within them; a DICOM whole-slide image's file gives its tiles joined, and its
    folder the largest of its levels within `max_pixels`.
    """
    if isinstance(source, Image.Image):
        _check_single_frame(frame, source)
        return _to_rgb(source, source, max_pixels)
    if not isinstance(source, bytes) and Path(source).is_dir():
        slices = dicom_series(source, max_pixels)
        if len(slices) == 1:  # one file, perhaps multi-frame, or a whole slide's level
            return load_image(slices[0], window=window, frame=frame, max_pixels=max_pixels)
        index = shown_frame(len(slices), frame)
        if not 0 <= index < len(slices):
            raise ImageLoadError(source, f"slice {index} requested but the DICOM series has {len(slices)} slices")
        return load_image(slices[index], window=window, max_pixels=max_pixels)
    if not isinstance(source, bytes) and _picture_start(source) is not None:
        return _open_with_pillow(_regular_file(source), source, frame, max_pixels)  # read as Pillow needs it
    key = _file_key(source)
    data = _file_bytes(source, key)
    kind = _medical_kind(source, data)
    if kind is None:
        return _open_with_pillow(data, source, frame, max_pixels)
    if kind == "nifti":
        data = _keep_volume(source, key, data)
    to_uint8 = dicom_to_uint8 if kind == "dicom" else nifti_to_uint8
    return Image.fromarray(to_uint8(data, source, window=window, frame=frame, max_pixels=max_pixels)).convert("RGB")


def frame_count(source: str | Path | bytes) -> int:
    """How many images `load_image`'s `frame` chooses from: a DICOM's frames, a DICOM series' slices, a
    NIfTI volume's axial slices, a TIFF stack's pages, else 1. Reads headers only."""
    if not isinstance(source, bytes) and Path(source).is_dir():
        slices = dicom_series(source)
        return frame_count(slices[0]) if len(slices) == 1 else len(slices)
    if not isinstance(source, bytes):
        if (start := _picture_start(source)) is not None:
            return _picture_frames(_regular_file(source), start, source)  # its pixels are not read
        if (header := _dicom_image_header(Path(source))) is not None:
            return _shown_frames(header)  # its pixel data, maybe a thousand frames, is not read
        if (volume := _nifti_file_header(Path(source))) is not None:
            return _axial_count(volume)  # nor are its voxels, maybe 100 MB gzipped
    data = _read_bytes(source)
    kind = _medical_kind(source, data)
    if kind == "nifti":
        return _axial_count(_open_nifti(data, source))
    if kind == "dicom":
        return _shown_frames(_read_dicom(io.BytesIO(data), source, headers_only=True))
    return _picture_frames(data, data, source)


def dicom_series(directory: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Path]:
    """The DICOM files of the one series in `directory`, ordered from the feet up: by position along the
    slice normal (`ImagePositionPatient`, `ImageOrientationPatient`), else by `InstanceNumber`, else by
    name. Hidden files, and files that are not DICOM images (notes, a DICOMDIR), are passed over; headers
    only are read. A whole-slide image's folder (a file per resolution, beside its label and overview)
    gives the one file of its largest resolution within `max_pixels`.

    The order is kept for as long as no file in the directory changes (name, size or modification
    time): asking about each slice of a 300-slice series would otherwise read its 300 headers once per
    slice (0.2 s each time, against 4 ms for the slice itself). `find_images` keeps the order of each
    series it finds, so that its headers are read once in all."""
    listing = _listing(Path(directory))
    if (order := _SERIES_ORDERS.get(listing)) is None:
        headers = [(path, header) for path, *_ in listing if (header := _dicom_image_header(path)) is not None]
        order = _SERIES_ORDERS.put(listing, _order_series(directory, headers))
    if isinstance(order, _SlideLevels):
        return [order.within(max_pixels)]
    return list(order)


class _Recent:
    """What was read from files, by a key that names them as they were (`_listing`, `_file_key`), kept
    while `size` summed over the values stays within `limit`, the least recently used dropped first. The
    image loader's threads share it."""

    def __init__(self, limit: int, size: Callable[[object], int] = lambda value: 1):
        self.limit, self.size = limit, size
        self.values: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            if key in self.values:
                self.values.move_to_end(key)
            return self.values.get(key)

    def put(self, key, value):
        with self.lock:
            self.values[key] = value
            while sum(map(self.size, self.values.values())) > self.limit:
                self.values.popitem(last=False)
        return value


_SERIES_ORDERS = _Recent(limit=32)  # each series' slices from the feet up (or a slide's levels), by listing


def _listing(directory: Path) -> tuple[tuple[Path, int, int], ...]:
    """The directory's files that are not hidden, by name, with the size and modification time that
    tell whether a series' kept order still holds."""
    files = sorted(entry for entry in directory.iterdir() if entry.is_file() and not entry.name.startswith("."))
    return tuple((file, stat.st_size, stat.st_mtime_ns) for file in files for stat in [file.stat()])


def _order_series(directory: str | Path, headers: list[tuple[Path, object]]) -> tuple[Path, ...] | _SlideLevels:
    """The files of `headers` (a directory's DICOM images and their headers) from the feet up, checked
    to be the slices of one series; or a whole slide's levels."""
    if not headers:
        raise ImageLoadError(directory, "no DICOM images in the directory")
    if any(_is_slide(header) for _, header in headers):
        return _SlideLevels.of(directory, headers)
    if len(headers) > 1 and any(_frames(header) > 1 for _, header in headers):
        raise ImageLoadError(directory, "mixes multi-frame DICOM files into a series; give each a folder of its own")
    series = {str(header.get("SeriesInstanceUID", "")) for _, header in headers}
    if len(series) > 1:
        raise ImageLoadError(directory, f"holds {len(series)} DICOM series; give the directory of one")
    order = _feet_first([header for _, header in headers])
    return tuple(path for _, (path, _) in sorted(zip(order, headers, strict=True), key=lambda item: item[0]))


@dataclass(frozen=True)
class _SlideLevels:
    """A whole-slide image's files of the slide itself (DICOM's VL Whole Slide Microscopy: a file per
    resolution) by their pixel counts, largest first; its label and overview, photos of the glass, are
    left out."""

    directory: str | Path
    levels: tuple[tuple[int, Path], ...]

    @classmethod
    def of(cls, directory: str | Path, headers: list[tuple[Path, object]]) -> _SlideLevels:
        if not all(_is_slide(header) for _, header in headers):
            raise ImageLoadError(directory, "mixes a whole-slide image with other DICOM images")
        if len({str(header.get("SeriesInstanceUID", "")) for _, header in headers}) > 1:
            raise ImageLoadError(directory, "holds several whole-slide images; give the directory of one")
        views = [(_slide_pixels(header), path) for path, header in headers if _slide_view(header)]
        if not views:
            raise ImageLoadError(directory, "holds only a whole-slide image's label or overview")
        return cls(directory, tuple(sorted(views, key=lambda view: -view[0])))

    def within(self, max_pixels: int) -> Path:
        """The file of the largest resolution within `max_pixels`."""
        for pixels, path in self.levels:
            if pixels <= max_pixels:
                return path
        smallest = self.levels[-1][0]
        raise ImageLoadError(self.directory, f"its smallest level's {smallest} pixels exceed the limit of {max_pixels}")


def _is_slide(header) -> bool:
    return str(header.get("SOPClassUID", "")) == VL_WHOLE_SLIDE_MICROSCOPY


def _slide_view(header) -> bool:
    """Whether a whole-slide image's file shows the slide (a level, or its thumbnail), not its label or its
    overview; ImageType's third value says which."""
    image_type = list(header.get("ImageType", []))
    return len(image_type) < 3 or image_type[2] in ("VOLUME", "THUMBNAIL")


def _slide_pixels(header) -> int:
    """The pixels of a whole-slide level: its tiles joined, the Total Pixel Matrix."""
    return int(header.get("TotalPixelMatrixRows", header.Rows)) * int(
        header.get("TotalPixelMatrixColumns", header.Columns)
    )


def _shown_frames(header) -> int:
    """How many images `frame` chooses from in a DICOM file: its frames, except for a whole-slide image,
    whose frames are the tiles of one."""
    return 1 if _is_slide(header) else _frames(header)


def _slide_tiles(ds, source: object) -> tuple[int, int]:
    """How many rows of tiles a whole-slide level has, and how many tiles each, checked against its
    frames. DICOM's TILED_FULL order runs along each row of tiles, top row first, through the first focal
    plane and optical path before any other; sparse tiles, placed frame by frame, are not joined."""
    if _frames(ds) == 1:  # a thumbnail or label of one frame
        return 1, 1
    if str(ds.get("DimensionOrganizationType", "")) != "TILED_FULL":
        raise ImageLoadError(source, "a whole-slide image whose tiles are not TILED_FULL cannot be joined")
    down = -(-int(ds.TotalPixelMatrixRows) // int(ds.Rows))
    across = -(-int(ds.TotalPixelMatrixColumns) // int(ds.Columns))
    if (frames := _frames(ds)) < down * across:
        raise ImageLoadError(source, f"a whole-slide image of {down * across} tiles holds {frames} frames")
    return down, across


def _joined_tiles(tiles: np.ndarray, grid: tuple[int, int], ds) -> np.ndarray:
    """The slide's first plane from its tiles (`(down * across, rows, columns[, samples])`, `_slide_tiles`
    order), cut to its Total Pixel Matrix."""
    (down, across), (rows, columns) = grid, tiles.shape[1:3]
    joined = tiles.reshape(down, across, rows, columns, *tiles.shape[3:]).swapaxes(1, 2)
    joined = joined.reshape(down * rows, across * columns, *tiles.shape[3:])
    return joined[: int(ds.get("TotalPixelMatrixRows", rows)), : int(ds.get("TotalPixelMatrixColumns", columns))]


def find_images(root: str | Path, progress: bool = False) -> list[Path]:
    """The images in the folder tree `root`, each as `load_image` takes it: a folder whose DICOM files are
    the slices of one series (one `SeriesInstanceUID`), or the files of one whole-slide image, is one
    image (the folder); otherwise each DICOM file is one (a radiograph, a multi-frame file, a file naming
    no series); PNG, JPEG, TIFF, SVS, BMP, WebP and NIfTI files are one each. Hidden files and folders are
    passed over, and of DICOM files only headers are read. `progress`: a bar over the folders (a PACS
    export holds thousands)."""
    from tqdm import tqdm

    found: list[Path] = []
    folders = sorted([Path(root), *(d for d in Path(root).rglob("*") if d.is_dir())])
    for directory in tqdm(folders, desc="finding images", unit="folder", disable=not progress, leave=False):
        if any(part.startswith(".") for part in directory.relative_to(root).parts):
            continue
        listing = _listing(directory)
        found += [file for file, *_ in listing if file.name.lower().endswith(PICTURE_SUFFIXES + NIFTI_SUFFIXES)]
        headers = [(path, header) for path, *_ in listing if (header := _dicom_image_header(path)) is not None]
        series: dict[str, list[Path]] = {}  # single-frame DICOM images by series
        for path, header in headers:
            if _frames(header) == 1:
                series.setdefault(str(header.get("SeriesInstanceUID", "")) or str(path), []).append(path)
        most_slices = max((len(slices) for slices in series.values()), default=0)
        if any(_is_slide(header) for _, header in headers) or (len(series) == 1 and most_slices > 1):
            # a whole slide's files, or a series' slices: the folder is one image
            _SERIES_ORDERS.put(listing, _order_series(directory, headers))
            found.append(directory)
        elif most_slices > 1:
            raise ImageLoadError(directory, f"holds {len(series)} DICOM series; give each series a folder of its own")
        else:
            found += [path for path, header in headers if _frames(header) > 1]
            found += [slices[0] for slices in series.values()]
    return sorted(found)


DICOM_IDENTIFIERS = {  # what a PACS finds an image by, as answer tables name them
    "modality": "Modality",
    "study_instance_uid": "StudyInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
    "sop_instance_uid": "SOPInstanceUID",
}


def dicom_identifiers(source: ImageSource) -> list[dict[str, str]]:
    """The modality and UIDs of each image `load_image(source, frame=k)` shows, by `k`: a series' slices
    from the feet up, or the one entry of a DICOM file (its frames share its UIDs); none for any other
    image. They lead an answer back to the study and the very image in the PACS. Reads headers only."""
    if isinstance(source, (bytes, Image.Image)):
        return []
    path = Path(source)
    headers = [_dicom_image_header(file) for file in (dicom_series(path) if path.is_dir() else [path])]
    return [{name: str(h.get(tag, "")) for name, tag in DICOM_IDENTIFIERS.items()} for h in headers if h is not None]


def is_dicom_file(path: Path) -> bool:
    """A DICOM file, known by its content (`is_dicom`) or by a `.dcm` or `.dicom` name."""
    with path.open("rb") as handle:
        return is_dicom(handle.read(132)) or path.suffix.lower() in (".dcm", ".dicom")


def _dicom_image_header(path: Path):
    """The header of a DICOM image file (`is_dicom_file`); None for any other file, and for DICOM that
    holds no image (a DICOMDIR, a report)."""
    if not is_dicom_file(path):
        return None
    header = _read_dicom(path, path, headers_only=True)
    return header if "Rows" in header else None


def _frames(header) -> int:
    """How many frames a DICOM image's header says it holds."""
    return int(header.get("NumberOfFrames", 1) or 1)


def _feet_first(headers: list) -> list[float]:
    """A sort key per slice that grows towards the patient's head (DICOM's +z is superior)."""
    try:
        orientation = np.asarray(headers[0].ImageOrientationPatient, dtype=np.float64).reshape(6)
        normal = np.cross(orientation[:3], orientation[3:])
        normal = -normal if normal[2] < 0 else normal
        return [float(normal @ np.asarray(h.ImagePositionPatient, dtype=np.float64).reshape(3)) for h in headers]
    except (AttributeError, TypeError, ValueError):  # a tag missing, empty or malformed in some slice
        pass
    try:
        return [float(h.InstanceNumber) for h in headers]
    except (AttributeError, TypeError, ValueError):
        return [float(i) for i in range(len(headers))]


def _medical_kind(source: str | Path | bytes, data: bytes) -> str | None:
    """`dicom` or `nifti` by content or file suffix; None for what Pillow should read."""
    suffix = "" if isinstance(source, bytes) else "".join(Path(source).suffixes[-2:]).lower()
    if is_dicom(data) or suffix.endswith((".dcm", ".dicom")):
        return "dicom"
    if suffix.endswith(NIFTI_SUFFIXES) or nifti_header_bytes(data) is not None:
        return "nifti"
    return None


def _picture_start(source: str | Path) -> bytes | None:
    """The first bytes of a file for Pillow, one neither DICOM nor NIfTI by its name and those bytes; None
    for any other file, an empty one included."""
    with _regular_file(source).open("rb") as handle:
        start = handle.read(_NIFTI_SNIFF_BYTES)
    return start if start and _medical_kind(source, start) is None else None


def _regular_file(source: str | Path) -> Path:
    path = Path(source)
    if not path.exists():
        raise ImageLoadError(source, "file not found")
    if not path.is_file():
        raise ImageLoadError(source, "not a regular file")
    return path


_KEPT_VOLUMES = _Recent(limit=2**30, size=len)  # decompressed gzipped NIfTI files, 1 GiB in all
_VOLUMES_READ = _Recent(limit=256)  # the gzipped NIfTI files read once, not yet kept


def _file_key(source: str | Path | bytes) -> tuple[str, int, int] | None:
    """A file's path, size and modification time: while they hold, what was read from it holds."""
    if isinstance(source, bytes):
        return None
    try:
        stat = Path(source).stat()
    except OSError:
        return None
    return str(source), stat.st_size, stat.st_mtime_ns


def _file_bytes(source: str | Path | bytes, key: tuple[str, int, int] | None) -> bytes:
    """`_read_bytes`, or the decompressed NIfTI file `_keep_volume` kept under `key` (`_file_key`)."""
    return kept if key is not None and (kept := _KEPT_VOLUMES.get(key)) is not None else _read_bytes(source)


def _keep_volume(source: str | Path | bytes, key: tuple[str, int, int] | None, data: bytes) -> bytes:
    """A gzipped NIfTI file's bytes, decompressed and kept for its next slice when it is read a second
    time: a gzip stream is read from its start, so asking about each of a volume's n slices would
    decompress it n/2 times over, while one question about one slice decompresses no further than that
    slice. Only the bytes its header accounts for are decompressed, after that header has been checked
    (its voxel count capped); a volume larger than all `_KEPT_VOLUMES` may hold, or a stream that ends
    early, is left to be read slice by slice. Bytes given as such (no `key`) are never kept."""
    if key is None or data[:2] != b"\x1f\x8b":
        return data
    if _VOLUMES_READ.get(key) is None:
        _VOLUMES_READ.put(key, True)
        return data
    volume = _open_nifti(data, source)
    size = int(volume.dataobj.offset) + volume.get_data_dtype().itemsize * int(np.prod(volume.shape))
    if size > _KEPT_VOLUMES.limit:
        return data
    try:
        decompressed = zlib.decompressobj(wbits=31).decompress(data, size)
    except zlib.error:
        return data
    if len(decompressed) < size:
        return data
    return _KEPT_VOLUMES.put(key, decompressed)


def _read_bytes(source: str | Path | bytes) -> bytes:
    if isinstance(source, bytes):
        if not source:
            raise ImageLoadError(source, "empty image data")
        return source
    data = _regular_file(source).read_bytes()
    if not data:
        raise ImageLoadError(source, "file is empty")
    return data


def _open_with_pillow(file: Path | bytes, source: object, frame: int | None, max_pixels: int) -> Image.Image:
    """A picture through Pillow, from its file (a whole-slide image may be gigabytes, of which one
    resolution is read) or its bytes: a TIFF stack's page `frame` (the middle one by default), else the
    picture's first page or its largest copy within `max_pixels` (`_seek_view_within`)."""
    with _opened_picture(file, source) as image:
        if (pages := _stack_pages(image, source)) > 1:
            index = shown_frame(pages, frame)
            if not 0 <= index < pages:
                raise ImageLoadError(source, f"page {index} requested but the TIFF stack has {pages} pages")
            image.seek(index)
            _check_pixel_count(image.size[0] * image.size[1], source, max_pixels)
        else:
            _check_single_frame(frame, source)
            _seek_view_within(image, source, max_pixels)
        image.load()
        # turned as viewers and browsers show it: a phone's photo is stored sideways, its EXIF says how
        return _to_rgb(ImageOps.exif_transpose(image), source, max_pixels)


def _picture_frames(file: Path | bytes, start: bytes, source: object) -> int:
    """`frame_count` of a picture whose first bytes are `start`: a TIFF stack's pages, else 1; other
    pictures are not opened."""
    if start[:4] not in TIFF_SIGNATURES:
        return 1
    with _opened_picture(file, source) as image:
        return _stack_pages(image, source)


@contextmanager
def _opened_picture(file: Path | bytes, source: object) -> Iterator[Image.Image]:
    """Pillow's image of a picture, not yet decoded, with whatever Pillow raises over it (opening,
    seeking, decoding) turned into an `ImageLoadError` that names `source`."""
    try:
        handle = file.open("rb") if isinstance(file, Path) else io.BytesIO(file)
        with warnings.catch_warnings(), handle:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield _open_picture(handle)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageLoadError(source, f"refused as a decompression bomb ({err})") from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError(source, "not an image Pillow, pydicom or nibabel can read") from None
    except (OSError, SyntaxError, ValueError, IndexError, KeyError, struct.error) as err:
        raise ImageLoadError(source, f"corrupt or truncated image ({err})") from None


MAX_STACK_PAGES = 10_000  # a TIFF stack's pages are counted one header at a time; a sent file could hold millions


def _stack_pages(image: Image.Image, source: object) -> int:
    """How many pages a TIFF stack has (a microscope's or ImageJ's focal planes, channels or time points,
    a CT series saved as one TIFF): pages all of the first page's size and mode. 1 for any other picture,
    a whole-slide pyramid among them. Reads page headers only, and leaves `image` at its first page."""
    if not isinstance(image, TiffImagePlugin.TiffImageFile):
        return 1
    first, pages = (image.size, image.mode), 1
    for page in _later_pages(image, MAX_STACK_PAGES + 1):
        if (image.size, image.mode) != first:
            pages = 1  # pages of another size: not a stack
            break
        if page == MAX_STACK_PAGES:
            raise ImageLoadError(source, f"a TIFF of more than {MAX_STACK_PAGES} pages")
        pages = page + 1
    image.seek(0)
    return pages


def _later_pages(image: Image.Image, limit: int) -> Iterator[int]:
    """The numbers of a picture's pages after its first, below `limit`, `image` left at each in turn."""
    for page in range(1, limit):
        try:
            image.seek(page)
        except EOFError:  # no more pages
            return
        yield page


_SLIDE_PAGES_LOOKED_AT = 64  # a slide has a dozen or so; a sent file could hold a million tiny ones


def _open_picture(handle: BinaryIO) -> Image.Image:
    """Pillow's image of a file, not yet decoded. A TIFF is opened past `Image.open`'s size check of its
    first page, which refuses a whole-slide image however small its other resolutions;
    `_seek_view_within` checks the page that is decoded."""
    signature = handle.read(4)
    handle.seek(0)
    return TiffImagePlugin.TiffImageFile(handle) if signature in TIFF_SIGNATURES else Image.open(handle)


def _seek_view_within(image: Image.Image, source: object, max_pixels: int) -> None:
    """Leaves `image` at its first page or, when that is over `max_pixels`, at the largest smaller copy of
    it in the file: a whole-slide image holds the slide at several resolutions (pyramidal TIFF, Aperio's
    SVS), the full one often billions of pixels, while the model looks at about a million. A copy has the
    first page's shape up to the rounding of its size; other pages (a slide's label, its macro photo) do
    not, and are never chosen."""
    width, height = image.size
    if width * height <= max_pixels:
        return
    copies = []
    for page in _later_pages(image, _SLIDE_PAGES_LOOKED_AT):
        w, h = image.size
        if w * h <= max_pixels and abs(w * height - h * width) <= width + height:
            copies.append((w * h, page))
    if not copies:
        _check_pixel_count(width * height, source, max_pixels)  # raises: no copy fits either
    image.seek(max(copies)[1])


def _check_single_frame(frame: int | None, source: object) -> None:
    """A frame other than 0 of a one-frame image is a mistake (a volume expected, say), not a request to
    ignore."""
    if frame not in (None, 0):
        raise ImageLoadError(source, f"frame {frame} requested but the image has 1 frame")


def _check_pixel_count(pixels: int, source: object, max_pixels: int) -> None:
    if pixels > max_pixels:
        raise ImageLoadError(source, f"{pixels} pixels exceed the limit of {max_pixels} (decompression bomb?)")


def _to_rgb(image: Image.Image, source: object, max_pixels: int) -> Image.Image:
    _check_pixel_count(image.size[0] * image.size[1], source, max_pixels)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit greyscale (common for radiographs): stretch its own range to 8 bits.
        return Image.fromarray(_stretch_to_uint8(np.asarray(image, dtype=np.float64))).convert("RGB")
    return image.convert("RGB")


def _stretch_to_uint8(values: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """`low..high` (default: the values' own range) spread over 0..255; all 0 when the range is empty."""
    low = float(values.min()) if low is None else low
    high = float(values.max()) if high is None else high
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) / (high - low) * 255.0).astype(np.uint8)


def _read_dicom(file: io.BytesIO | Path, source: object, headers_only: bool = False):
    """The parsed dataset (without its pixel data when `headers_only`), or one line naming `source`."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(file, force=True, stop_before_pixels=headers_only)
    except (InvalidDicomError, OSError, ValueError, EOFError) as err:
        raise ImageLoadError(source, f"unreadable DICOM ({err})") from None


def dicom_to_uint8(
    data: bytes,
    source: object = "<dicom>",
    *,
    window: Window = None,
    frame: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode a DICOM file to a windowed 8-bit array, `(H, W)` for greyscale or `(H, W, 3)` for colour."""
    ds = _read_dicom(io.BytesIO(data), source)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageLoadError(source, "DICOM has no pixel data")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    index = 0  # the frame shown
    if _is_slide(ds):  # its frames are the tiles of one image
        down, across = _slide_tiles(ds, source)
        _check_single_frame(frame, source)
        _check_pixel_count(_slide_pixels(ds), source, max_pixels)
        pixels = _joined_tiles(_decoded_pixels(ds, source, down * across), (down, across), ds)
    else:
        _check_pixel_count(int(ds.get("Rows", 0)) * int(ds.get("Columns", 0)) * frames, source, max_pixels)
        pixels = _decoded_pixels(ds, source)
        if frames > 1:
            index = shown_frame(frames, frame)
            if not 0 <= index < frames:
                raise ImageLoadError(source, f"frame {index} requested but the DICOM has {frames} frames")
            pixels = pixels[index]
        else:
            _check_single_frame(frame, source)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if samples == 3:
        return np.clip(pixels, 0, 255).astype(np.uint8)
    if getattr(ds, "PhotometricInterpretation", "") == "PALETTE COLOR":  # ultrasound, nuclear medicine
        return _palette_to_rgb(pixels, ds, source)
    tag = partial(_frame_value, ds, index)  # the shown frame's tag, wherever the file keeps it
    values = pixels.astype(np.float64) * float(tag("RescaleSlope") or 1) + float(tag("RescaleIntercept") or 0)
    own_window = None
    if tag("WindowCenter") is not None and tag("WindowWidth") is not None:
        own_window = _first(tag("WindowCenter")), _first(tag("WindowWidth"))
    if window is None and ds.get("VOILUTSequence"):  # radiographs, mammograms: the vendor's own curve
        out = _voi_lut_to_uint8(values, ds, source)
    elif window is None and own_window and str(tag("VOILUTFunction") or "").upper() == "SIGMOID":
        out = _sigmoid_window(values, *own_window)
    else:
        out = _windowed(values, _resolve_window(window, own_window, source))
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        out = 255 - out  # MONOCHROME1: low values are bright
    return out


def _decoded_pixels(ds, source: object, frames: int | None = None) -> np.ndarray:
    """The file's pixel data decoded: all of it, or only its first `frames` frames."""
    from pydicom.pixels import iter_pixels

    try:
        return ds.pixel_array if frames is None else np.stack(list(iter_pixels(ds, indices=range(frames))))
    except Exception as err:  # pydicom raises many types for broken or unsupported pixel data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        encoding = f" ({syntax.name})" if syntax is not None else ""
        reason = " ".join(str(err).split())  # pydicom lists each decoder's reason on a line of its own
        raise ImageLoadError(source, f"cannot decode the DICOM pixel data{encoding}: {reason}") from None


# Where an enhanced multi-frame DICOM (Enhanced CT and MR, as today's scanners write a series in one file)
# keeps, for each frame or shared by all, what a classic file keeps at its top level: the functional
# group's sequence of each tag.
_FRAME_FUNCTIONAL_GROUPS = {
    "RescaleSlope": "PixelValueTransformationSequence",
    "RescaleIntercept": "PixelValueTransformationSequence",
    "WindowCenter": "FrameVOILUTSequence",
    "WindowWidth": "FrameVOILUTSequence",
    "VOILUTFunction": "FrameVOILUTSequence",
}


def _frame_value(ds, index: int, keyword: str):
    """`keyword`'s value for frame `index`: at the file's top level, else in the frame's own functional
    group, else in the shared one; None where it is nowhere."""
    if keyword in ds:
        return ds.data_element(keyword).value
    sequence = _FRAME_FUNCTIONAL_GROUPS[keyword]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    groups = [per_frame[index]] if index < len(per_frame) else []
    for group in [*groups, *(ds.get("SharedFunctionalGroupsSequence") or [])[:1]]:
        if (items := group.get(sequence)) and keyword in items[0]:
            return items[0].data_element(keyword).value
    return None


def _voi_lut_to_uint8(values: np.ndarray, ds, source: object) -> np.ndarray:
    """The file's first VOI LUT (PS3.3 C.11.2; where a file also gives a window, the LUT comes first, as
    in pydicom's `apply_voi_lut`), its output range spread over 0..255. The range is the one its entries
    span, not the one their bit depth allows: some files declare 16-bit entries that reach only 4095."""
    from pydicom.pixels import apply_voi

    try:
        entries, first = ds.VOILUTSequence[0].LUTDescriptor[:2]
        table = apply_voi(np.arange(first, first + (entries or 2**16)), ds).astype(np.float64)
        mapped = apply_voi(np.rint(values).astype(np.int64), ds).astype(np.float64)
    except (ValueError, KeyError, AttributeError, IndexError, TypeError, NotImplementedError) as err:
        raise ImageLoadError(source, f"DICOM with an unusable VOI LUT ({err})") from None
    return _stretch_to_uint8(mapped, float(table.min()), float(table.max()))


def _sigmoid_window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """The DICOM SIGMOID VOI function (PS3.3 C.11.2.1.3.1), which some mammograms ask for, to 0..255."""
    return np.round(255.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))).astype(np.uint8)


def _palette_to_rgb(indices: np.ndarray, ds, source: object) -> np.ndarray:
    """A PALETTE COLOR image's `(H, W, 3)` 8-bit colours, through its red, green and blue lookup tables
    (entries of 8 or 16 bits, as their descriptors say); windowing does not apply to it."""
    from pydicom.pixels import apply_color_lut

    try:
        colours = apply_color_lut(indices, ds)
    except (ValueError, KeyError, AttributeError) as err:
        raise ImageLoadError(source, f"PALETTE COLOR DICOM with unusable lookup tables ({err})") from None
    bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    return (colours >> (bits - 8)).astype(np.uint8) if bits > 8 else colours.astype(np.uint8)


def nifti_to_uint8(
    data: bytes,
    source: object = "<nifti>",
    *,
    window: Window = None,
    frame: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """One axial slice of a NIfTI volume (`.nii` or `.nii.gz`), windowed to `(H, W)` 8-bit.

    The slice is the one nearest to axial in the volume's own affine, counted from the feet, and shown as
    radiologists view axial images: anterior at the top, the patient's right on the viewer's left. Only
    that slice is decompressed into memory, with the file's scaling (`scl_slope`, `scl_inter`) applied.
    """
    volume = _open_nifti(data, source)
    try:
        plane = _axial_slice(volume, frame, source, max_pixels)
    except ImageLoadError:
        raise
    except (OSError, EOFError, ValueError, zlib.error) as err:
        raise ImageLoadError(source, f"corrupt or truncated NIfTI ({' '.join(str(err).split())})") from None
    finite = np.isfinite(plane)
    if not finite.any():
        raise ImageLoadError(source, "the NIfTI slice holds no finite values")
    plane = np.where(finite, plane, plane[finite].min())  # NaN (outside a mask, in float maps) shows as the background
    low, high = float(volume.header["cal_min"]), float(volume.header["cal_max"])
    own_window = ((low + high) / 2 + 0.5, high - low + 1) if high > low else None  # maps cal_min..cal_max to 0..255
    return _windowed(plane, _resolve_window(window, own_window, source))


def _open_nifti(data: bytes, source: object):
    """The volume's header and a proxy of its voxels (nothing decompressed past the header yet), checked."""
    head = nifti_header_bytes(data)
    if head is None:
        raise ImageLoadError(source, "not a NIfTI-1 or NIfTI-2 file (no n+1/n+2 magic; .hdr/.img pairs are not read)")
    return _nifti_from_stream(_nifti_stream(io.BytesIO(data), data), head, source)


def _nifti_file_header(path: Path):
    """A NIfTI file's volume read no further than its header (and header extensions), for its shape and
    affine (the file is closed: its voxels cannot be read); None for a file that is not NIfTI."""
    with path.open("rb") as handle:
        start = handle.read(_NIFTI_SNIFF_BYTES)
        if (head := nifti_header_bytes(start)) is None:
            return None
        handle.seek(0)
        return _nifti_from_stream(_nifti_stream(handle, start), head, path)


_NIFTI_SNIFF_BYTES = 4096  # a gzipped NIfTI header decompresses from its first few hundred bytes


def _nifti_stream(handle: BinaryIO, start: bytes) -> BinaryIO:
    """`handle` as NIfTI is read from it: decompressed on the fly when the file (beginning `start`) is gzipped."""
    return gzip.GzipFile(fileobj=handle) if start[:2] == b"\x1f\x8b" else handle


def _nifti_from_stream(stream: BinaryIO, head: bytes, source: object):
    """`_open_nifti` of a stream, given its header's first bytes `head` (`nifti_header_bytes`)."""
    import nibabel

    image_class = nibabel.Nifti1Image if head[344:348] == b"n+1\x00" else nibabel.Nifti2Image
    try:
        volume = image_class.from_stream(stream)
    except Exception as err:  # nibabel raises several types for broken headers
        raise ImageLoadError(source, f"unreadable NIfTI header ({' '.join(str(err).split())})") from None
    shape = volume.shape
    if len(shape) > 3 and any(extent != 1 for extent in shape[3:]):
        extents = "x".join(map(str, shape))
        raise ImageLoadError(source, f"NIfTI has {len(shape)} dimensions ({extents}); give one 3D volume")
    if volume.get_data_dtype().kind not in "biuf":
        kind = volume.get_data_dtype()
        raise ImageLoadError(source, f"NIfTI voxels of type {kind} (only greyscale volumes are read)")
    voxels = int(np.prod(shape, dtype=np.int64))
    if voxels > MAX_VOLUME_VOXELS:
        raise ImageLoadError(source, f"{voxels} voxels exceed the limit of {MAX_VOLUME_VOXELS} (decompression bomb?)")
    return volume


def _axial_count(volume) -> int:
    """How many axial slices the volume has (`_axial_axis`)."""
    return (volume.shape + (1, 1))[:3][_axial_axis(volume)[0]]


def _axial_axis(volume) -> tuple[int, np.ndarray]:
    """The array axis nearest the patient's superior direction, and each array axis's world axis and
    direction (`nibabel.io_orientation`: R=0, A=1, S=2; +1 or -1)."""
    import nibabel

    orientation = nibabel.io_orientation(volume.affine)
    if np.isnan(orientation).any():  # a degenerate affine: take the array's axes as they are
        orientation = np.array([[0, 1], [1, 1], [2, 1]])
    return int(np.flatnonzero(orientation[:, 0] == 2)[0]), orientation


def _axial_slice(volume, frame: int | None, source: object, max_pixels: int) -> np.ndarray:
    """`(H, W)` float64: axial slice `frame` (from the feet) in display orientation (rows from anterior to
    posterior, columns from the patient's right to left)."""
    shape = (volume.shape + (1, 1))[:3]
    axial, orientation = _axial_axis(volume)
    count = shape[axial]
    index = shown_frame(count, frame)
    if not 0 <= index < count:
        slices = f"{count} axial slice" + ("" if count == 1 else "s")
        raise ImageLoadError(source, f"slice {index} requested but the NIfTI volume has {slices}")
    in_plane = [axis for axis in range(3) if axis != axial]
    _check_pixel_count(shape[in_plane[0]] * shape[in_plane[1]], source, max_pixels)
    position = index if orientation[axial, 1] > 0 else count - 1 - index
    if len(volume.shape) < 3:
        plane = np.asarray(volume.dataobj, dtype=np.float64)
    else:
        where = [slice(None)] * 3 + [0] * (len(volume.shape) - 3)
        where[axial] = position
        plane = np.asarray(volume.dataobj[tuple(where)], dtype=np.float64)
    if orientation[in_plane[0], 0] > orientation[in_plane[1], 0]:  # make the axes (towards R, towards A)
        plane, in_plane = plane.T, in_plane[::-1]
    for dim, axis in enumerate(in_plane):
        if orientation[axis, 1] < 0:
            plane = np.flip(plane, dim)
    return plane[::-1, ::-1].T


def _resolve_window(
    window: Window, own_window: tuple[float, float] | None, source: object
) -> tuple[float, float] | None:
    """The caller's window (a preset name or a pair), else the file's own, else None (the full range)."""
    if isinstance(window, str):
        if window not in CT_WINDOWS:
            raise ImageLoadError(source, f"unknown window preset {window!r}; known: {', '.join(CT_WINDOWS)}")
        return CT_WINDOWS[window]
    if window is not None:
        return float(window[0]), float(window[1])
    return own_window


def _windowed(values: np.ndarray, centre_width: tuple[float, float] | None) -> np.ndarray:
    return window_values(values, *centre_width) if centre_width else _stretch_to_uint8(values)


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
