"""Image loading: DICOM windowing by the standard, and every kind of bad input named in its error."""

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image

from conftest import write_dicom
from llama3med.processing import ImageLoadError, dicom_identifiers, find_images, frame_count, load_image, window_values


def dicom_window(values, centre, width):
    """PS3.3 C.11.2.1.2.1, written out case by case."""
    out = []
    for x in np.asarray(values, dtype=float).ravel():
        if x <= centre - 0.5 - (width - 1) / 2:
            out.append(0)
        elif x > centre - 0.5 + (width - 1) / 2:
            out.append(255)
        else:
            out.append(round(((x - (centre - 0.5)) / (width - 1) + 0.5) * 255))
    return np.array(out, dtype=np.uint8).reshape(np.shape(values))


def test_ct_window_applies_rescale_then_the_files_window(tmp_path):
    stored = np.array([[0, 1000], [1024, 1064], [1224, 1500], [2000, 4000]], dtype=np.uint16)
    path = write_dicom(tmp_path / "ct.dcm", stored, slope=1.0, intercept=-1024.0, window=(40.0, 400.0))
    hounsfield = stored.astype(float) - 1024.0
    got = np.asarray(load_image(path))[..., 0]
    np.testing.assert_array_equal(got, dicom_window(hounsfield, 40.0, 400.0))
    assert got[0, 0] == 0 and got[3, 1] == 255  # air is black, dense bone is white


def test_caller_window_and_presets_override_the_file(tmp_path):
    stored = np.array([[0, 400], [424, 1024]], dtype=np.uint16)
    path = write_dicom(tmp_path / "ct.dcm", stored, slope=1.0, intercept=-1024.0, window=(40.0, 400.0))
    hounsfield = stored.astype(float) - 1024.0
    lung = np.asarray(load_image(path, window="lung"))[..., 0]
    np.testing.assert_array_equal(lung, dicom_window(hounsfield, -600.0, 1500.0))
    custom = np.asarray(load_image(path, window=(-500, 1000)))[..., 0]
    np.testing.assert_array_equal(custom, dicom_window(hounsfield, -500.0, 1000.0))


def test_without_window_tags_the_full_range_is_stretched(tmp_path):
    stored = np.array([[100, 200], [300, 100]], dtype=np.uint16)
    got = np.asarray(load_image(write_dicom(tmp_path / "mr.dcm", stored)))[..., 0]
    np.testing.assert_array_equal(got, [[0, 128], [255, 0]])


def test_monochrome1_is_inverted(tmp_path):
    stored = np.array([[0, 255]], dtype=np.uint8)
    got = np.asarray(load_image(write_dicom(tmp_path / "xr.dcm", stored, photometric="MONOCHROME1")))[..., 0]
    np.testing.assert_array_equal(got, [[255, 0]])


def test_multiframe_takes_the_middle_frame_or_the_chosen_one(tmp_path):
    frames = np.stack([np.full((4, 4), 10 * (i + 1), dtype=np.uint16) for i in range(5)])
    path = write_dicom(tmp_path / "multi.dcm", frames, window=(30.0, 41.0))
    middle = np.asarray(load_image(path))[..., 0]
    np.testing.assert_array_equal(middle, dicom_window(np.full((4, 4), 30.0), 30.0, 41.0))
    first = np.asarray(load_image(path, frame=0))[..., 0]
    np.testing.assert_array_equal(first, dicom_window(np.full((4, 4), 10.0), 30.0, 41.0))
    with pytest.raises(ImageLoadError, match="frame 7 requested but the DICOM has 5 frames"):
        load_image(path, frame=7)
    assert frame_count(path) == 5 and frame_count(write_dicom(tmp_path / "one.dcm", frames[0])) == 1


def test_an_enhanced_ct_reads_its_rescale_and_window_from_its_functional_groups(tmp_path):
    """Enhanced CT (a whole series in one file) keeps the rescale and window in functional groups, shared
    by all frames or a frame's own, not at the top level."""
    stored = np.stack([np.full((4, 4), 1024 + 100 * i, dtype=np.uint16) for i in range(3)])  # 0, 100, 200 HU
    path = write_dicom(tmp_path / "enhanced.dcm", stored)
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.EnhancedCTImageStorage
    shared, rescale, window = pydicom.Dataset(), pydicom.Dataset(), pydicom.Dataset()
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = 1, -1024, "HU"
    window.WindowCenter, window.WindowWidth = 40, 400
    shared.PixelValueTransformationSequence, shared.FrameVOILUTSequence = [rescale], [window]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = [pydicom.Dataset() for _ in range(3)]
    own_window = pydicom.Dataset()
    own_window.WindowCenter, own_window.WindowWidth = 150, 100  # the last frame's own
    frames[2].FrameVOILUTSequence = [own_window]
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.save_as(path)

    for frame, hounsfield, (centre, width) in [(0, 0.0, (40, 400)), (1, 100.0, (40, 400)), (2, 200.0, (150, 100))]:
        got = np.asarray(load_image(path, frame=frame))[..., 0]
        np.testing.assert_array_equal(got, dicom_window(np.full((4, 4), hounsfield), centre, width))
    lung = np.asarray(load_image(path, frame=1, window="lung"))[..., 0]  # a preset in Hounsfield units
    np.testing.assert_array_equal(lung, dicom_window(np.full((4, 4), 100.0), -600.0, 1500.0))


def test_a_picture_counts_one_frame_from_its_first_bytes_alone(tmp_path, monkeypatch):
    picture = tmp_path / "slide.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(picture)
    picture.write_bytes(picture.read_bytes() + bytes(8 * 2**20))  # 8 MiB after the image, as if it were big
    opened = []
    real_open = Path.open
    monkeypatch.setattr(Path, "read_bytes", lambda path: pytest.fail(f"{path} read whole"))
    monkeypatch.setattr(Path, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    assert frame_count(picture) == 1 and set(opened) == {picture}


def test_a_radiographs_voi_lut_is_its_display_curve_unless_a_window_is_asked_for(tmp_path):
    stored = np.array([[0, 1024, 2048], [3072, 4095, 100]], dtype=np.uint16)
    path = write_dicom(tmp_path / "dx.dcm", stored, modality="DX", window=(2048.0, 4096.0))
    ds = pydicom.dcmread(path)
    curve = np.round(np.sqrt(np.arange(4096) / 4095) * 4095).astype(np.uint16)  # 16-bit entries up to 4095
    item = pydicom.Dataset()
    item.add_new(pydicom.datadict.tag_for_keyword("LUTDescriptor"), "US", [4096, 0, 16])
    item.add_new(pydicom.datadict.tag_for_keyword("LUTData"), "OW", curve.tobytes())
    ds.VOILUTSequence = pydicom.Sequence([item])
    ds.save_as(path)
    got = np.asarray(load_image(path))[..., 0]
    np.testing.assert_array_equal(got, np.round(curve[stored] / 4095 * 255).astype(np.uint8))
    windowed = np.asarray(load_image(path, window=(2048, 4096)))[..., 0]
    np.testing.assert_array_equal(windowed, dicom_window(stored.astype(float), 2048.0, 4096.0))


def test_a_sigmoid_voi_function_is_applied_to_the_files_own_window(tmp_path):
    path = write_dicom(tmp_path / "mg.dcm", np.array([[50, 100, 150]], dtype=np.uint16), window=(100.0, 50.0))
    ds = pydicom.dcmread(path)
    ds.VOILUTFunction = "SIGMOID"
    ds.save_as(path)
    np.testing.assert_array_equal(
        np.asarray(load_image(path))[..., 0], [[5, 128, 250]]
    )  # 255 / (1 + e^(-4 (x - c) / w))


@pytest.mark.parametrize("lut_bits", [16, 8])
def test_a_palette_color_image_is_shown_in_its_lookup_tables_colours(tmp_path, lut_bits):
    path = write_dicom(tmp_path / "us.dcm", np.array([[0, 1], [2, 3]], dtype=np.uint8), photometric="PALETTE COLOR")
    ds = pydicom.dcmread(path)
    full = 2**lut_bits - 1
    tables = {"Red": [0, full, 0, full], "Green": [0, 0, full, full // 2], "Blue": [0, 0, 0, full]}
    for colour, entries in tables.items():
        descriptor = pydicom.datadict.tag_for_keyword(f"{colour}PaletteColorLookupTableDescriptor")
        ds.add_new(descriptor, "US", [4, 0, lut_bits])  # 4 entries, the first for index 0
        data = np.array(entries, dtype=np.uint16 if lut_bits == 16 else np.uint8).tobytes()
        ds.add_new(pydicom.datadict.tag_for_keyword(f"{colour}PaletteColorLookupTableData"), "OW", data)
    ds.save_as(path)
    got = np.asarray(load_image(path, window="lung")).reshape(-1, 3)  # a window does not apply to colour
    np.testing.assert_array_equal(got, [[0, 0, 0], [255, 0, 0], [0, 255, 0], [255, 127, 255]])


def test_a_one_frame_image_refuses_any_frame_but_its_first(tmp_path):
    single = write_dicom(tmp_path / "one.dcm", np.array([[0, 255]], dtype=np.uint8))
    photo = tmp_path / "photo.png"
    Image.new("L", (4, 4), 80).save(photo)
    for source in (single, photo, Image.open(photo)):
        assert np.asarray(load_image(source, frame=0)).shape[:2] == np.asarray(load_image(source)).shape[:2]
        with pytest.raises(ImageLoadError, match="frame 3 requested but the image has 1 frame"):
            load_image(source, frame=3)


def test_pydicoms_real_ct_and_mr_slices_load():
    for name in ("CT_small.dcm", "MR_small.dcm"):
        image = load_image(pydicom.data.get_testdata_file(name))
        assert image.mode == "RGB" and image.size in ((128, 128), (64, 64))
        assert np.asarray(image).std() > 10  # real anatomy, not a blank frame


def transcode(source: str, out, syntax: str):
    """`source` rewritten in a compressed transfer syntax by GDCM, as a PACS export would hold it."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(source)
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(out))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return out


@pytest.mark.parametrize("syntax", ["JPEGLosslessProcess14_1", "JPEGLSLossless", "JPEG2000Lossless", "RLELossless"])
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_compressed_dicom_loads_as_the_same_image(tmp_path, name, syntax):
    source = pydicom.data.get_testdata_file(name)
    compressed = transcode(source, tmp_path / name, syntax)
    assert pydicom.dcmread(compressed).file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(np.asarray(load_image(compressed)), np.asarray(load_image(source)))


def test_dicom_pixel_data_no_decoder_can_read_is_named_by_its_encoding_on_one_line():
    twelve_bit_lossy_jpeg = pydicom.data.get_testdata_file("JPGExtended.dcm")  # ships with pydicom
    with pytest.raises(ImageLoadError, match=r"cannot decode the DICOM pixel data \(JPEG Extended") as caught:
        load_image(twelve_bit_lossy_jpeg)
    assert "\n" not in str(caught.value) and "12-bit" in str(caught.value)


def test_dicom_is_recognised_by_content_without_a_suffix(tmp_path):
    path = write_dicom(tmp_path / "scan", np.array([[0, 1000]], dtype=np.uint16))
    assert load_image(path.read_bytes()).size == (2, 1)


def test_window_width_below_one_is_refused():
    with pytest.raises(ValueError, match="window width"):
        window_values(np.zeros(2), 0, 0.5)


@pytest.mark.parametrize("suffix", ["png", "jpg", "tif", "bmp"])
def test_common_formats_load_as_8_bit_rgb(tmp_path, suffix):
    path = tmp_path / f"slide.{suffix}"
    Image.new("L", (12, 8), 200).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (12, 8)
    assert abs(int(np.asarray(image)[4, 6, 0]) - 200) <= 2  # JPEG is lossy


def test_a_photo_is_turned_as_its_exif_orientation_says_viewers_show_it(tmp_path):
    stored = np.zeros((32, 48, 3), np.uint8)
    stored[:8, :8] = (255, 0, 0)  # the stored top-left corner, red
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: shown turned 90 degrees clockwise, as a phone held upright stores it
    path = tmp_path / "photo.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=100)
    shown = np.asarray(load_image(path)).astype(int)
    assert shown.shape == (48, 32, 3)
    assert shown[2, -3, 0] > 200 and shown[2, -3, 1] < 60  # the red corner is now at the top right


def test_16_bit_png_is_stretched_to_8_bits(tmp_path):
    path = tmp_path / "xray16.png"
    Image.fromarray(np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)).save(path)
    got = np.asarray(load_image(path))[..., 0]
    np.testing.assert_array_equal(got, [[0, 64], [128, 255]])


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p, "file not found"),
        (lambda p: (p.write_bytes(b""), p)[1], "file is empty"),
        (lambda p: (p.write_text("this is a report, not an image"), p)[1], "not an image"),
    ],
)
def test_missing_empty_and_non_image_files_are_named(tmp_path, make, reason):
    path = make(tmp_path / "scan.png")
    with pytest.raises(ImageLoadError, match=reason) as err:
        load_image(path)
    assert str(path) in str(err.value)


def test_truncated_png_is_refused(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="corrupt or truncated"):
        load_image(path)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("L", (4000, 4000)).save(path)  # 16 M pixels in a few kilobytes
    assert path.stat().st_size < 100_000
    with pytest.raises(ImageLoadError, match="exceed the limit"):
        load_image(path, max_pixels=1_000_000)


def test_a_tiff_stack_is_a_volume_of_pages_each_counted_alone(tmp_path):
    path = tmp_path / "stack.tif"  # focal planes of one field, as a microscope or ImageJ saves them
    pages = [Image.new("L", (1000, 1000), value) for value in (10, 20, 30)]
    pages[0].save(path, save_all=True, append_images=pages[1:])
    assert frame_count(path) == 3 and frame_count(path.read_bytes()) == 3
    middle = load_image(path, max_pixels=2_000_000)  # 3 M pixels in all, 1 M decoded
    assert middle.size == (1000, 1000) and np.asarray(middle)[0, 0, 0] == 20
    assert np.asarray(load_image(path, frame=2))[0, 0, 0] == 30
    with pytest.raises(ImageLoadError, match="page 3 requested but the TIFF stack has 3 pages"):
        load_image(path, frame=3)


def test_a_tiff_of_pages_of_several_sizes_gives_its_first_page(tmp_path):
    path = tmp_path / "figure.tif"
    Image.new("L", (300, 200), 10).save(path, save_all=True, append_images=[Image.new("L", (100, 100), 20)])
    assert frame_count(path) == 1 and np.asarray(load_image(path))[0, 0, 0] == 10
    with pytest.raises(ImageLoadError, match="frame 1 requested but the image has 1 frame"):
        load_image(path, frame=1)


@pytest.fixture(scope="module")
def whole_slide(tmp_path_factory):
    """A pyramidal TIFF as slide scanners write one (Aperio's SVS is such a TIFF): the slide at full
    resolution, 12,800 x 16,000 px (blank here, so that the file stays small), its label, and two smaller
    copies in 256 px tiles; each page deflated. Returns the path and the copies' pixels."""
    rng = np.random.default_rng(0)
    label, sixteenth, thirty_second = (
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(600, 600), (1000, 800), (500, 400)]
    )
    height, width, tile = 16_000, 12_800, np.zeros((256, 256, 3), np.uint8)
    tiles = (tile for _ in range(-(-height // 256) * -(-width // 256)))
    path = tmp_path_factory.mktemp("slides") / "slide.svs"
    with tifffile.TiffWriter(path, bigtiff=True) as tiff:
        tiff.write(
            tiles, shape=(height, width, 3), dtype="uint8", tile=(256, 256), photometric="rgb", compression="zlib"
        )
        tiff.write(label, photometric="rgb", subfiletype=1)
        for copy in (sixteenth, thirty_second):
            tiff.write(copy, tile=(256, 256), photometric="rgb", compression="zlib", subfiletype=1)
    return path, sixteenth, thirty_second


def test_a_whole_slide_image_gives_its_largest_copy_within_the_pixel_limit(whole_slide):
    path, sixteenth, thirty_second = whole_slide
    # 204.8 M pixels at full resolution, which Pillow alone refuses outright; the 1/16 copy fits 64 M
    np.testing.assert_array_equal(np.asarray(load_image(path)), sixteenth)
    np.testing.assert_array_equal(np.asarray(load_image(path.read_bytes())), sixteenth)
    # under a tighter limit the 1/32 copy, never the label (larger, but of another shape)
    np.testing.assert_array_equal(np.asarray(load_image(path, max_pixels=500_000)), thirty_second)
    assert frame_count(path) == 1


def test_a_whole_slide_image_with_no_copy_within_the_limit_is_refused(whole_slide):
    path, *_ = whole_slide
    with pytest.raises(ImageLoadError, match="204800000 pixels exceed the limit of 150000"):
        load_image(path, max_pixels=150_000)


def write_slide_file(
    path: Path, image: np.ndarray, series_uid: str, kind: str = "VOLUME", tile: int = 256, jpeg: bool = False
) -> Path:
    """One file of a DICOM whole-slide image (VL Whole Slide Microscopy Image Storage) as converters write
    them: `image` (`(H, W, 3)`, one of the slide's resolutions, or its `LABEL` or `OVERVIEW` photo) cut
    into `tile`-pixel frames in TILED_FULL order, the last row and column of tiles padded; with `jpeg`,
    each tile a baseline JPEG, as most scanners store them."""
    height, width = image.shape[:2]
    down, across = -(-height // tile), -(-width // tile)
    padded = np.zeros((down * tile, across * tile, 3), np.uint8)
    padded[:height, :width] = image
    tiles = padded.reshape(down, tile, across, tile, 3).swapaxes(1, 2).reshape(-1, tile, tile, 3)
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.6"
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = pydicom.dataset.FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3", series_uid, "SM"
    ds.ImageType = ["ORIGINAL", "PRIMARY", kind, "NONE"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.Rows = ds.Columns = tile
    ds.NumberOfFrames = len(tiles)
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = height, width
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.PixelData = tiles.tobytes()
    if jpeg:
        encoded = []
        for pixels in tiles:
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
            encoded.append(buffer.getvalue())
        ds.PixelData = pydicom.encaps.encapsulate(encoded)
        ds["PixelData"].VR, ds.PhotometricInterpretation = "OB", "YBR_FULL_422"
        meta.TransferSyntaxUID = pydicom.uid.JPEGBaseline8Bit
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_dicom_whole_slide_file_gives_its_tiles_joined(tmp_path):
    slide = np.random.default_rng(0).integers(0, 256, (700, 900, 3), dtype=np.uint8)  # 3 x 4 tiles, 2 padded
    path = write_slide_file(tmp_path / "level.dcm", slide, "1.2.3.4")
    np.testing.assert_array_equal(np.asarray(load_image(path)), slide)
    assert frame_count(path) == 1  # its 12 frames are tiles of one image
    with pytest.raises(ImageLoadError, match="frame 1 requested but the image has 1 frame"):
        load_image(path, frame=1)
    one_tile = write_slide_file(tmp_path / "thumbnail.dcm", slide, "1.2.3.4", "THUMBNAIL", tile=1024)
    np.testing.assert_array_equal(np.asarray(load_image(one_tile)), slide)


def test_a_dicom_whole_slide_file_of_jpeg_tiles_decodes_within_jpegs_error(tmp_path):
    rows, columns = np.mgrid[0:700, 0:900]
    slide = np.stack([columns * 255 // 899, rows * 255 // 699, np.full_like(rows, 128)], axis=-1).astype(np.uint8)
    path = write_slide_file(tmp_path / "level.dcm", slide, "1.2.3.4", jpeg=True)
    assert np.abs(np.asarray(load_image(path)).astype(int) - slide).mean() < 2


def test_a_dicom_whole_slide_folder_gives_its_largest_level_within_the_limit(tmp_path):
    rng = np.random.default_rng(1)
    levels = {size: rng.integers(0, 256, (*size, 3), dtype=np.uint8) for size in [(1000, 1200), (500, 600), (250, 300)]}
    folder = tmp_path / "cohort" / "slide"
    folder.mkdir(parents=True)
    for number, image in enumerate(levels.values()):
        write_slide_file(folder / f"level{number}.dcm", image, "1.2.3.4")
    write_slide_file(folder / "label.dcm", rng.integers(0, 256, (300, 300, 3), dtype=np.uint8), "1.2.3.4", "LABEL")
    write_slide_file(folder / "overview.dcm", np.zeros((400, 1200, 3), np.uint8), "1.2.3.4", "OVERVIEW")

    np.testing.assert_array_equal(np.asarray(load_image(folder)), levels[1000, 1200])
    np.testing.assert_array_equal(np.asarray(load_image(folder, max_pixels=400_000)), levels[500, 600])
    np.testing.assert_array_equal(np.asarray(load_image(folder, max_pixels=100_000)), levels[250, 300])
    with pytest.raises(ImageLoadError, match="smallest level's 75000 pixels exceed the limit of 50000"):
        load_image(folder, max_pixels=50_000)
    assert frame_count(folder) == 1
    assert find_images(tmp_path / "cohort") == [folder]  # one image, not five
    shown = pydicom.dcmread(folder / "level0.dcm", stop_before_pixels=True)
    assert [row["sop_instance_uid"] for row in dicom_identifiers(folder)] == [shown.SOPInstanceUID]


def test_dicom_without_pixel_data_is_refused(tmp_path):
    path = write_dicom(tmp_path / "nopix.dcm", np.zeros((4, 4), dtype=np.uint16), with_pixels=False)
    with pytest.raises(ImageLoadError, match="no pixel data"):
        load_image(path)


def test_dicom_bomb_is_refused_from_its_header(tmp_path):
    path = write_dicom(tmp_path / "big.dcm", np.zeros((64, 64), dtype=np.uint16))
    with pytest.raises(ImageLoadError, match="exceed the limit"):
        load_image(path, max_pixels=1000)


def test_unknown_window_preset_is_named(tmp_path):
    path = write_dicom(tmp_path / "ct.dcm", np.zeros((2, 2), dtype=np.uint16))
    with pytest.raises(ImageLoadError, match="unknown window preset 'liver'"):
        load_image(path, window="liver")
