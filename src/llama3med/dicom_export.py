"""Results back into the PACS: a heat map as a DICOM Secondary Capture image in the study of the image it
explains, referencing that image, so that a reader opens it beside the scan in the viewer.

The patient and study attributes are copied from the source image (a PACS files an image by them);
the series and instance UIDs are derived from the source and the picture, so a rerun writes the same
instance again rather than a duplicate, and every heat map of one source series joins one series."""

from __future__ import annotations

import datetime
import hashlib
import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from .processing import IMAGE_PLACEHOLDER, dicom_series, frame_count
from .processing.images import ImageSource, is_dicom_file, shown_frame

COPIED_FROM_SOURCE = (  # the patient and study, by which a PACS files the heat map with its scan
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)  # each present (empty where the source lacks it), as the standard asks of these attributes
COPIED_IF_PRESENT = ("StudyInstanceUID", "StudyDescription", "IssuerOfPatientID")
SERIES_DESCRIPTION = "llama3med heat map (research, not for diagnosis)"
SERIES_NUMBER = 9901  # far from a scanner's own series numbers


def shown_dicom(image: ImageSource, frame: int | None) -> tuple[Path, int | None] | None:
    """The DICOM file of `image` that `load_image(image, frame=frame)` shows, and its frame where it has
    several: the file itself, or a series folder's shown slice; None for any other image."""
    if isinstance(image, (bytes, Image.Image)):
        return None
    path = Path(image)
    if path.is_dir():
        slices = dicom_series(path)
        return (slices[shown_frame(len(slices), frame)], None) if slices else None
    if not is_dicom_file(path):
        return None
    frames = frame_count(path)
    return path, (shown_frame(frames, frame) if frames > 1 else None)


def heat_map_dicom(picture: Image.Image, source: Path, comment: str, frame: int | None = None) -> Dataset:
    """`picture` (the model's view with its heat map) as a Secondary Capture in `source`'s study, with
    `comment` (the question and answer) as its ImageComments."""
    original = pydicom.dcmread(source, stop_before_pixels=True)
    pixels = np.asarray(picture.convert("RGB"), dtype=np.uint8)
    digest = hashlib.sha256(pixels.tobytes() + comment.encode()).hexdigest()
    series_uid = generate_uid(entropy_srcs=["llama3med heat maps", str(original.get("SeriesInstanceUID", source))])
    instance_uid = generate_uid(entropy_srcs=[str(original.get("SOPInstanceUID", source)), str(frame), digest])
    now = datetime.datetime.now()

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: names as the source decodes them, any question or answer
    for keyword in COPIED_FROM_SOURCE:
        setattr(ds, keyword, original.get(keyword, ""))
    for keyword in COPIED_IF_PRESENT:
        if keyword in original:
            setattr(ds, keyword, original.data_element(keyword).value)
    if "StudyInstanceUID" not in ds:  # a source without one: a study of its own, the same on a rerun
        ds.StudyInstanceUID = generate_uid(entropy_srcs=["llama3med study", str(source.resolve())])
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, instance_uid
    ds.SeriesInstanceUID, ds.SeriesNumber = series_uid, SERIES_NUMBER
    ds.InstanceNumber = original.get("InstanceNumber", 1)  # a series' maps sort in the viewer as their slices
    ds.Modality, ds.ConversionType = "OT", "WSD"  # other, made at a workstation
    ds.SeriesDescription, ds.ImageComments = SERIES_DESCRIPTION, comment
    ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.Manufacturer, ds.BurnedInAnnotation, ds.PatientOrientation = "llama3med", "NO", ""
    ds.DerivationDescription = "relevance of each image token to the answer (gradient x input) over the image"
    reference = Dataset()
    reference.ReferencedSOPClassUID = original.get("SOPClassUID", "")
    reference.ReferencedSOPInstanceUID = original.get("SOPInstanceUID", "")
    if frame is not None:
        reference.ReferencedFrameNumber = frame + 1  # DICOM counts frames from 1
    ds.SourceImageSequence = [reference]
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, instance_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def heat_map_comment(question: str, answer: str) -> str:
    """What a DICOM heat map explains, for its ImageComments: the question (without its image
    placeholder) and the answer."""
    return f"Question: {question.replace(IMAGE_PLACEHOLDER, '').strip()} Answer: {answer.strip()}"


def heat_map_dicom_bytes(picture: Image.Image, shown: tuple[Path, int | None] | None, comment: str) -> bytes:
    """The DICOM file of `heat_map_dicom` for `shown`, the DICOM file and frame a heat map explains
    (`shown_dicom`)."""
    if shown is None:
        raise ValueError("a DICOM heat map belongs to a DICOM image's study, and this image is not DICOM")
    source, source_frame = shown
    buffer = io.BytesIO()
    heat_map_dicom(picture, source, comment, source_frame).save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
