"""The `llama3med` command as a user runs it: answers from DICOM, one readable line on bad input."""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
import torch
import transformers

from conftest import write_dicom
from llama3med.checkpoints import DEMO_MODEL_DIR
from llama3med.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(SRC)}  # this checkout's code, whatever is installed
    command = [sys.executable, "-m", "llama3med.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def test_ask_answers_about_a_dicom_file(built_model_dir):
    ct = pydicom.data.get_testdata_file("CT_small.dcm")
    result = run_cli("ask", "--model", built_model_dir, "--image", ct, "--max-new-tokens", "5", "Is there a lesion?")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()  # a random tiny model says something; the pipeline ran end to end


def test_ask_is_deterministic_when_greedy_and_takes_a_window(built_model_dir, tmp_path, capsys):
    ct = write_dicom(tmp_path / "ct.dcm", np.arange(256, dtype=np.uint16).reshape(16, 16) * 8, slope=1, intercept=-1024)
    args = ["ask", "--model", str(built_model_dir), "--image", str(ct), "--max-new-tokens", "4", "Is it normal?"]
    assert main(args) == 0 and main(args) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first == second
    assert main([*args, "--window", "lung"]) == 0
    assert main([*args, "--window=-600,1500"]) == 0


def test_ask_reads_a_nifti_volume_or_a_dicom_series_and_frame_picks_the_slice(built_model_dir, tmp_path, capsys):
    voxels = np.random.default_rng(0).integers(-1000, 1000, size=(32, 32, 3), dtype=np.int16)
    volume = tmp_path / "ct.nii.gz"
    nibabel.save(nibabel.Nifti1Image(voxels, np.eye(4)), volume)
    series = tmp_path / "series"
    series.mkdir()
    uid = pydicom.uid.generate_uid()
    for k in range(3):
        write_dicom(series / f"{k}.dcm", (voxels[..., k] + 1000).astype(np.uint16), intercept=-1000, series_uid=uid)
    for image in (volume, series):
        args = ["ask", "--model", str(built_model_dir), "--image", str(image), "--max-new-tokens", "4", "Is it normal?"]
        assert main(args) == 0 and main([*args, "--frame", "0"]) == 0
        assert main([*args, "--frame", "3"]) == 1
    errors = capsys.readouterr().err
    assert "ct.nii.gz: slice 3 requested but the NIfTI volume has 3 axial slices" in errors
    assert "series: slice 3 requested but the DICOM series has 3 slices" in errors


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: p / "missing.dcm", "missing.dcm: file not found"),
        (lambda p: (p / "notes.png").write_text("not an image") and p / "notes.png", "not an image"),
        (lambda p: write_dicom(p / "nopix.dcm", np.zeros((2, 2), np.uint16), with_pixels=False), "no pixel data"),
    ],
)
def test_bad_images_end_in_one_readable_line_and_a_non_zero_exit(built_model_dir, tmp_path, capsys, make, expected):
    image = make(tmp_path)
    assert main(["ask", "--model", str(built_model_dir), "--image", str(image), "Is there a lesion?"]) == 1
    errors = capsys.readouterr().err
    assert errors.strip().count("\n") == 0 and errors.startswith("llama3med: error:") and expected in errors


def test_the_command_prints_that_line_alone_on_stderr(built_model_dir, tmp_path):
    result = run_cli("ask", "--model", built_model_dir, "--image", tmp_path / "missing.dcm", "Is there a lesion?")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"llama3med: error: {tmp_path / 'missing.dcm'}: file not found"]


def test_a_recipe_naming_a_model_option_build_lacks_is_one_line_before_anything_loads(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(
        "stage: pretrain\nmodel: {vision: siglip, llm: llama, scale: [384]}\n"
        f"data: [{{path: {tmp_path / 'captions.json'}}}]\noutput_dir: {tmp_path / 'out'}\n"
    )
    result = run_cli("train", recipe)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "llama3med: error: recipe: model has unknown keys ['scale']; known: ['image_fit', 'llm', 'projector_type', "
        "'pyramid_resize', 'scales', 'vision', 'vision_feature_layer']"
    ]


def test_a_question_with_its_own_placeholder_is_refused(built_model_dir, capsys):
    ct = pydicom.data.get_testdata_file("CT_small.dcm")
    assert main(["ask", "--model", str(built_model_dir), "--image", ct, "<image> what?"]) == 1
    assert "must not contain <image>" in capsys.readouterr().err


def test_device_puts_the_model_where_it_is_named_and_a_device_this_machine_lacks_is_one_line(built_model_dir, capsys):
    ct = pydicom.data.get_testdata_file("CT_small.dcm")
    args = ["ask", "--model", str(built_model_dir), "--image", ct, "--max-new-tokens", "4", "Is it normal?"]
    assert main([*args, "--device", "cpu"]) == 0 and main([*args, "--dtype", "float32"]) == 0
    on_cpu, default = capsys.readouterr().out.splitlines()
    assert on_cpu == default or torch.cuda.is_available()  # without a GPU the default is the CPU
    count = torch.cuda.device_count()
    assert main([*args, "--device", f"cuda:{count}"]) == 1
    assert f"--device cuda:{count}: this machine has {count} CUDA GPU" in capsys.readouterr().err
    assert main([*args, "--device", "gpu0"]) == 1
    assert "--device gpu0: not a device name" in capsys.readouterr().err


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"llama3med {importlib.metadata.version('llama3med')}\n"


def test_env_reports_versions_and_devices_for_a_bug_report(capsys):
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert f"torch              {torch.__version__}" in text and "pydicom" in text
    assert ("GPU 0:" in text) == torch.cuda.is_available()
    assert main(["env", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["packages"]["transformers"] == transformers.__version__ and facts["cpu_cores"] == os.cpu_count()
    assert len(facts["gpus"]) == torch.cuda.device_count()
    if os.path.exists("/proc/meminfo"):  # Linux counts its memory in kB there
        total_kib = int(next(line for line in open("/proc/meminfo") if line.startswith("MemTotal")).split()[1])
        assert abs(facts["memory_gib"] - total_kib / 2**20) < 0.1


def test_compile_on_a_cpu_without_a_cpp_compiler_is_refused_before_anything_is_answered(tmp_path, capsys):
    from torch._inductor import config as inductor_config

    questions = Path(__file__).parents[1] / "examples" / "questions.jsonl"
    out = tmp_path / "answers"
    command = ["answer", str(questions), "--model", str(DEMO_MODEL_DIR), "--compile", "--device", "cpu"]
    with inductor_config.patch({"cpp.cxx": (None, str(tmp_path / "no-such-g++"))}):
        assert main(["env"]) == 0
        assert "C++ compiler for --compile on the CPU: none found (install g++)" in capsys.readouterr().out
        assert main([*command, "--out", str(out)]) == 1
        assert "--compile on a CPU needs a C++ compiler and none runs here" in capsys.readouterr().err
    assert not (out / "answers.jsonl").exists()
    assert main(["env", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cpp_compiler"]  # this machine's: the tests compile elsewhere


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads the CPU's flags from Linux")
def test_env_says_whether_the_cpu_computes_bfloat16_as_its_flags_say(capsys):
    flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()[2:])
    expected = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None
    assert main(["env", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cpu_bfloat16"] == expected
    assert main(["env"]) == 0
    advice = "--dtype bfloat16 runs the model faster" if expected == "AMX" else "bfloat16 matmuls"
    assert advice in capsys.readouterr().out


@pytest.mark.parametrize("command", ["build", "convert", "ask", "chat", "answer"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and "usage: llama3med" in capsys.readouterr().out
