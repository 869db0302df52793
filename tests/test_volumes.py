"""Volumes, as CT and MR come: NIfTI files (`.nii`, `.nii.gz`), one axial slice windowed and oriented as a
radiologist's viewer shows it whatever voxel order the file stores; and directories of one DICOM series,
one slice per file, ordered from the feet up."""

import gzip
import io

import nibabel
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from conftest import write_dicom
from llama3med.processing import (
    ImageLoadError,
    dicom_series,
    find_images,
    frame_count,
    images,
    load_image,
    window_values,
)

SLICES = 5
SLICE_STEP = 100  # HU added per slice from the feet up, so each slice can be told apart


def ct_volume(storage: tuple[str, str, str] = ("L", "P", "S")) -> tuple[nibabel.Nifti1Image, list[np.ndarray]]:
    """pydicom's real CT slice as a 5-slice NIfTI volume stored in the axis order `storage`, and the
    8-bit soft-tissue view of each slice as the DICOM itself shows it (from the feet up). The DICOM's rows
    run to the patient's posterior and its columns to the left, so its voxel `[column, row, k]` is in
    L, P, S order."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    stored = ds.pixel_array.copy()
    hounsfield = stored.astype(np.int16) + int(ds.RescaleIntercept)  # (rows, columns)
    views = []
    for k in range(SLICES):
        ds.PixelData = (stored + k * SLICE_STEP).astype(stored.dtype).tobytes()
        views.append(np.asarray(load_image(ds_bytes(ds), window="soft_tissue"))[..., 0])
    voxels = np.stack([hounsfield.T + k * SLICE_STEP for k in range(SLICES)], axis=2)  # (columns, rows, slices)
    spacing = float(ds.PixelSpacing[0])
    volume = nibabel.Nifti1Image(voxels, np.diag([-spacing, -spacing, 2.5, 1.0]))  # to RAS+: L and P are negative
    if storage != ("L", "P", "S"):
        change = nibabel.orientations.ornt_transform(
            nibabel.io_orientation(volume.affine), nibabel.orientations.axcodes2ornt(storage)
        )
        volume = volume.as_reoriented(change)
    assert nibabel.aff2axcodes(volume.affine) == storage
    return volume, views


def ds_bytes(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def grey(source, **kwargs) -> np.ndarray:
    image = np.asarray(load_image(source, **kwargs))
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 0] == image[..., 2]).all()
    return image[..., 0]


@pytest.mark.parametrize(
    "storage", [("L", "P", "S"), ("R", "A", "S"), ("L", "A", "I"), ("S", "R", "A"), ("P", "I", "L")]
)
def test_a_ct_volume_shows_its_middle_axial_slice_as_the_dicom_does_whatever_its_voxel_order(storage):
    volume, views = ct_volume(storage)
    assert np.array_equal(grey(volume.to_bytes(), window="soft_tissue"), views[SLICES // 2])


@pytest.mark.parametrize("storage", [("L", "P", "S"), ("L", "A", "I")])
def test_frame_picks_an_axial_slice_counted_from_the_feet(storage):
    volume, views = ct_volume(storage)
    for k in (0, SLICES - 1):
        assert np.array_equal(grey(volume.to_bytes(), window="soft_tissue", frame=k), views[k])
    assert frame_count(volume.to_bytes()) == SLICES
    with pytest.raises(
        ImageLoadError, match=r"^<\d+ bytes>: slice 5 requested but the NIfTI volume has 5 axial slices$"
    ):
        load_image(volume.to_bytes(), frame=SLICES)


def test_gzipped_and_plain_files_by_suffix_or_by_content_load_alike(tmp_path):
    volume, views = ct_volume()
    plain, packed = volume.to_bytes(), gzip.compress(volume.to_bytes())
    (tmp_path / "ct.nii").write_bytes(plain)
    (tmp_path / "ct.nii.gz").write_bytes(packed)
    (tmp_path / "ct-without-suffix").write_bytes(packed)
    for source in (plain, packed, tmp_path / "ct.nii", tmp_path / "ct.nii.gz", tmp_path / "ct-without-suffix"):
        assert np.array_equal(grey(source, window="soft_tissue"), views[SLICES // 2])


def test_nifti2_files_load_too():
    volume, views = ct_volume()
    second = nibabel.Nifti2Image(np.asanyarray(volume.dataobj), volume.affine)
    assert np.array_equal(grey(second.to_bytes(), window="soft_tissue"), views[SLICES // 2])


def test_the_files_scaling_gives_hounsfield_units_and_its_display_range_is_the_default_window():
    """2 x 2 voxels stored R, A: the view puts anterior at the top and the patient's right on the left."""
    stored = np.array([[[0], [1000]], [[1040], [1424]]], dtype=np.int16)  # [x][y]; HU = stored - 1024
    volume = nibabel.Nifti1Image(stored, np.eye(4))
    volume.header.set_slope_inter(1.0, -1024.0)
    shown = np.array([[400.0, -24.0], [16.0, -1024.0]])  # HU as displayed
    assert np.array_equal(grey(volume.to_bytes(), window=(40, 400)), window_values(shown, 40, 400))
    volume.header["cal_min"], volume.header["cal_max"] = -24.0, 400.0  # the file's own display range
    assert grey(volume.to_bytes()).tolist() == [[255, 0], [24, 0]]
    volume.header["cal_min"], volume.header["cal_max"] = 0.0, 0.0  # unset: the full range
    assert grey(volume.to_bytes()).tolist() == [[255, 179], [186, 0]]


def test_non_finite_voxels_of_a_float_map_show_as_its_background():
    voxels = np.array([[[1.0], [np.nan]], [[3.0], [np.inf]]], dtype=np.float32)
    assert grey(nibabel.Nifti1Image(voxels, np.eye(4)).to_bytes()).tolist() == [[0, 0], [255, 0]]  # anterior up
    with pytest.raises(ImageLoadError, match="holds no finite values"):
        load_image(nibabel.Nifti1Image(np.full((2, 2, 1), np.nan, dtype=np.float32), np.eye(4)).to_bytes())


def test_a_volume_with_several_time_points_is_refused_by_its_dimensions():
    series = nibabel.Nifti1Image(np.zeros((4, 4, 3, 2), dtype=np.int16), np.eye(4))
    with pytest.raises(ImageLoadError, match=r"NIfTI has 4 dimensions \(4x4x3x2\); give one 3D volume"):
        load_image(series.to_bytes())
    single = nibabel.Nifti1Image(np.zeros((4, 4, 3, 1), dtype=np.int16), np.eye(4))
    assert load_image(single.to_bytes()).size == (4, 4)


def test_a_truncated_file_is_named_as_corrupt(tmp_path):
    volume, _ = ct_volume()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(gzip.compress(volume.to_bytes())[:4000])
    with pytest.raises(ImageLoadError, match=r"cut\.nii\.gz: corrupt or truncated NIfTI"):
        load_image(path)


def test_a_gzipped_volume_asked_about_slice_after_slice_is_decompressed_once_while_unchanged(tmp_path, monkeypatch):
    volume, views = ct_volume()
    path = tmp_path / "ct.nii.gz"
    path.write_bytes(gzip.compress(volume.to_bytes()))
    reads = []
    read_bytes = images._read_bytes
    monkeypatch.setattr(images, "_read_bytes", lambda source: reads.append(source) or read_bytes(source))
    for k in range(SLICES):
        assert np.array_equal(grey(path, window="soft_tissue", frame=k), views[k])
    assert len(reads) == 2  # the first slice streamed from the file, the second kept the whole volume
    brighter = nibabel.Nifti1Image(np.asanyarray(volume.dataobj) + 200, volume.affine)
    path.write_bytes(gzip.compress(brighter.to_bytes() + b"\0"))  # the file changed: read again
    assert np.array_equal(grey(path, window="soft_tissue", frame=0), views[2])
    assert len(reads) == 3


def test_a_gzipped_volume_too_large_to_keep_is_read_slice_by_slice(tmp_path, monkeypatch):
    volume, views = ct_volume()
    path = tmp_path / "ct.nii.gz"
    path.write_bytes(gzip.compress(volume.to_bytes()))
    monkeypatch.setattr(images._KEPT_VOLUMES, "limit", len(volume.to_bytes()) - 1)
    for k in (0, 4, 1, 3):
        assert np.array_equal(grey(path, window="soft_tissue", frame=k), views[k])
    assert not any(key[0] == str(path) for key in images._KEPT_VOLUMES.values)


def test_a_header_claiming_a_huge_volume_is_refused_before_decompressing(tmp_path):
    header = nibabel.Nifti1Header()
    header.set_data_shape((4096, 4096, 4096))
    header.set_data_dtype(np.int16)
    bomb = header.binaryblock + b"\0" * 4 + b"\0" * 1024  # a header for 128 GiB, and almost no data
    with pytest.raises(ImageLoadError, match="68719476736 voxels exceed the limit"):
        load_image(gzip.compress(bomb))


@pytest.mark.parametrize("image_class", [nibabel.Nifti1Image, nibabel.Nifti2Image])
@pytest.mark.parametrize("name, pack", [("ct.nii", bytes), ("ct.nii.gz", gzip.compress)])
def test_the_slices_of_a_nifti_file_are_counted_from_its_header_alone(tmp_path, monkeypatch, image_class, name, pack):
    volume, _ = ct_volume(("S", "R", "A"))  # the slices along the first array axis
    volume = image_class(np.asanyarray(volume.dataobj), volume.affine)
    volume.header.extensions.append(nibabel.nifti1.Nifti1Extension("comment", b"a header extension"))
    path = tmp_path / name
    path.write_bytes(pack(volume.to_bytes()))
    monkeypatch.setattr(images, "_read_bytes", lambda source: pytest.fail(f"{source} read whole"))
    assert frame_count(path) == SLICES


def test_a_nifti_file_whose_header_claims_a_huge_volume_is_refused_when_its_slices_are_counted(tmp_path):
    header = nibabel.Nifti1Header()
    header.set_data_shape((4096, 4096, 4096))
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))
    with pytest.raises(ImageLoadError, match=r"bomb\.nii\.gz: 68719476736 voxels exceed the limit"):
        frame_count(path)


def test_a_file_named_nii_that_is_not_nifti_is_refused(tmp_path):
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(gzip.compress(b"not a volume" * 100))
    with pytest.raises(ImageLoadError, match=r"scan\.nii\.gz: not a NIfTI-1 or NIfTI-2 file"):
        load_image(path)


def ct_series(directory, positions: list[float | None], instance_numbers: list[int] | None = None) -> list[np.ndarray]:
    """pydicom's real CT slice written as one series, a slice per file at the given table positions (mm,
    +z towards the head; None: no position tag), with file names that do not follow the order; and each
    slice's own view."""
    directory.mkdir()
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    stored, series = ds.pixel_array.copy(), pydicom.uid.generate_uid()
    views = []
    for k, z in enumerate(positions):
        ds.PixelData = (stored + k * SLICE_STEP).astype(stored.dtype).tobytes()
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series, pydicom.uid.generate_uid()
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        if z is None:
            ds.pop("ImagePositionPatient", None)
        else:
            ds.ImagePositionPatient = [-40.0, -40.0, z]
        if instance_numbers is not None:
            ds.InstanceNumber = instance_numbers[k]
        path = directory / f"IM{(7 * k) % len(positions):04d}"  # names out of order, no suffix
        ds.save_as(path)
        views.append(grey(path, window="soft_tissue"))
    (directory / "notes.txt").write_text("exported from PACS")
    return views


def test_a_dicom_series_directory_is_ordered_from_the_feet_by_position_and_opens_at_its_middle(tmp_path):
    positions = [30.0, -10.0, 10.0, 50.0, -30.0]  # slice k was written at positions[k]
    views = ct_series(tmp_path / "series", positions, instance_numbers=[1, 2, 3, 4, 5])  # numbers that disagree
    feet_up = [views[k] for k in np.argsort(positions)]
    assert frame_count(tmp_path / "series") == len(positions)
    assert np.array_equal(grey(tmp_path / "series", window="soft_tissue"), feet_up[2])
    for index in (0, 4):
        assert np.array_equal(grey(tmp_path / "series", window="soft_tissue", frame=index), feet_up[index])
    with pytest.raises(ImageLoadError, match="series: slice 5 requested but the DICOM series has 5 slices"):
        load_image(tmp_path / "series", frame=5)


def test_a_series_headers_are_read_once_while_its_files_stay_as_they_are(tmp_path, monkeypatch):
    (tmp_path / "cohort").mkdir()
    ct_series(tmp_path / "cohort" / "series", [0.0, 5.0, 10.0])
    header_reads = []
    read_dicom = images._read_dicom

    def counted(file, source, headers_only=False):
        header_reads.extend([file] if headers_only else [])
        return read_dicom(file, source, headers_only)

    monkeypatch.setattr(images, "_read_dicom", counted)
    assert find_images(tmp_path / "cohort") == [tmp_path / "cohort" / "series"]
    assert len(header_reads) == 3  # each slice's, by find_images
    feet_up = dicom_series(tmp_path / "cohort" / "series")
    assert frame_count(tmp_path / "cohort" / "series") == 3
    for frame in range(3):  # each slice asked for
        load_image(tmp_path / "cohort" / "series", frame=frame)
    assert len(header_reads) == 3
    moved = pydicom.dcmread(feet_up[0])
    moved.ImagePositionPatient = [-40.0, -40.0, 20.0]  # the lowest slice, moved above the others
    moved.save_as(feet_up[0])
    assert dicom_series(tmp_path / "cohort" / "series") == [*feet_up[1:], feet_up[0]]
    assert len(header_reads) == 6


def test_the_frames_of_a_multi_frame_dicom_are_counted_from_its_header_alone(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "cine.dcm", np.zeros((4, 8, 8), np.uint8))
    monkeypatch.setattr(images, "_read_bytes", lambda source: pytest.fail(f"{source} read whole"))
    assert frame_count(path) == 4


def test_a_series_without_positions_is_ordered_by_instance_number(tmp_path):
    views = ct_series(tmp_path / "series", [None, None, None], instance_numbers=[3, 1, 2])
    for index, k in enumerate([1, 2, 0]):
        assert np.array_equal(grey(tmp_path / "series", window="soft_tissue", frame=index), views[k])


def test_a_directory_of_two_series_or_of_no_dicom_is_refused(tmp_path):
    ct_series(tmp_path / "one", [0.0, 5.0])
    ds = pydicom.dcmread(tmp_path / "one" / "IM0000")
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "one" / "other.dcm")
    with pytest.raises(ImageLoadError, match="holds 2 DICOM series; give the directory of one"):
        load_image(tmp_path / "one")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageLoadError, match="empty: no DICOM images in the directory"):
        load_image(tmp_path / "empty")


def test_a_folder_mixing_a_series_and_a_multi_frame_file_is_refused_when_found(tmp_path):
    ct_series(tmp_path / "series", [0.0, 5.0])
    write_dicom(tmp_path / "series" / "cine.dcm", np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(ImageLoadError, match="series: mixes multi-frame DICOM files into a series; give each a folder"):
        find_images(tmp_path)
