"""Heat maps back into the PACS: a `.dcm` heat map is a DICOM Secondary Capture filed in the study of the
scan it explains, referencing the very image, with the same pixels as the PNG."""

import io
import json
import shutil

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file

from conftest import write_dicom
from llama3med.cli import main
from llama3med.dicom_export import SERIES_DESCRIPTION
from llama3med.processing import dicom_series

QUESTION = "Is there a lesion in this image?"


def test_ask_writes_a_dcm_heat_map_into_the_study_of_the_scan_it_explains(tmp_path, capsys):
    scan = shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct.dcm")  # a real CT slice, with a patient
    asked = ["ask", "--image", str(scan), QUESTION]
    assert main([*asked, "--heatmap", str(tmp_path / "where.png")]) == 0
    assert main([*asked, "--heatmap", str(tmp_path / "where.dcm")]) == 0
    answer = capsys.readouterr().out.splitlines()[-1]
    heat_map, source = pydicom.dcmread(tmp_path / "where.dcm"), pydicom.dcmread(scan)
    assert heat_map.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage and heat_map.Modality == "OT"
    for keyword in ("PatientName", "PatientID", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyID"):
        assert heat_map.data_element(keyword).value == source.data_element(keyword).value, keyword
    assert heat_map.SeriesInstanceUID != source.SeriesInstanceUID and heat_map.SeriesDescription == SERIES_DESCRIPTION
    [reference] = heat_map.SourceImageSequence
    assert (reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID) == (
        source.SOPClassUID,
        source.SOPInstanceUID,
    )
    assert heat_map.ImageComments == f"Question: {QUESTION} Answer: {answer}"
    assert heat_map.PhotometricInterpretation == "RGB"
    assert np.array_equal(heat_map.pixel_array, np.asarray(Image.open(tmp_path / "where.png").convert("RGB")))

    assert main([*asked, "--heatmap", str(tmp_path / "again.dcm")]) == 0  # a rerun files the same instance again
    again = pydicom.dcmread(tmp_path / "again.dcm")
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (heat_map.SeriesInstanceUID, heat_map.SOPInstanceUID)


def test_a_dcm_heat_map_of_an_image_that_is_not_dicom_is_refused_before_the_model_loads(tmp_path, capsys):
    asked = ["ask", "--image", "examples/phantom_ct_lesion.nii.gz", QUESTION, "--heatmap", str(tmp_path / "h.dcm")]
    assert main(asked) == 1
    error = capsys.readouterr().err
    assert "h.dcm: a DICOM heat map joins the study of a DICOM image" in error and "demo model" not in error


def test_answer_writes_each_dicom_slices_heat_map_as_dcm_in_one_series_and_other_images_as_png(
    built_model_dir, tmp_path
):
    folder, series = tmp_path / "cohort", tmp_path / "cohort" / "ct"
    series.mkdir(parents=True)
    slices = np.random.default_rng(0).integers(0, 2000, size=(3, 32, 32)).astype(np.uint16)
    study, uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for k in range(3):
        write_dicom(series / f"IM{k:04d}", slices[k], intercept=-1000, study_uid=study, series_uid=uid)
    Image.fromarray((slices[0] // 8).astype(np.uint8)).save(folder / "screenshot.png")
    out = tmp_path / "answers"
    asked = ["answer", str(folder), "--question", QUESTION, "--slice-step", "1", "--model", str(built_model_dir)]
    assert main([*asked, "--out", str(out), "--max-new-tokens", "3", "--heatmaps", "--heatmap-format", "dicom"]) == 0
    heat_maps = out / "heatmaps"
    assert [p.name for p in sorted(heat_maps.glob("*.dcm"))] == ["ct@0.dcm", "ct@1.dcm", "ct@2.dcm"]
    assert [p.name for p in heat_maps.glob("*.png")] == ["screenshot.png.png"]  # not DICOM: a PNG as before
    assert len(list(heat_maps.glob("*.json"))) == 4
    written = [pydicom.dcmread(path) for path in sorted(heat_maps.glob("*.dcm"))]
    shown = [pydicom.dcmread(path) for path in dicom_series(series)]  # slice k of the series, from the feet
    assert {d.SeriesInstanceUID for d in written} != {uid} and len({d.SeriesInstanceUID for d in written}) == 1
    assert [d.SourceImageSequence[0].ReferencedSOPInstanceUID for d in written] == [s.SOPInstanceUID for s in shown]
    assert {d.StudyInstanceUID for d in written} == {study}
    assert main([*asked, "--out", str(tmp_path / "other"), "--heatmap-format", "dicom"]) == 1  # without --heatmaps
    numbers = json.loads((out / "heatmaps" / "screenshot.png.json").read_text())
    assert numbers["question_id"] == "screenshot.png" and len(numbers["relevance"]) > 1


def test_chat_writes_a_dcm_heat_map_of_its_last_answer(tmp_path, capsys, monkeypatch):
    scan = shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct.dcm")
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\n/heatmap {tmp_path / 'where.dcm'}\n"))
    assert main(["chat", "--image", str(scan)]) == 0
    heat_map = pydicom.dcmread(tmp_path / "where.dcm")
    assert heat_map.StudyInstanceUID == pydicom.dcmread(scan).StudyInstanceUID
    assert heat_map.ImageComments.startswith(f"Question: {QUESTION} Answer: ")


def test_a_multi_frame_dicoms_heat_map_references_the_frame_it_explains(tmp_path, capsys):
    frames = np.random.default_rng(1).integers(0, 2000, size=(3, 32, 32)).astype(np.uint16)
    scan = write_dicom(tmp_path / "cine.dcm", frames, modality="MR")
    assert main(["ask", "--image", str(scan), "--frame", "1", QUESTION, "--heatmap", str(tmp_path / "where.dcm")]) == 0
    [reference] = pydicom.dcmread(tmp_path / "where.dcm").SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == pydicom.dcmread(scan).SOPInstanceUID
    assert reference.ReferencedFrameNumber == 2  # DICOM counts frames from 1
