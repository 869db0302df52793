"""The GPU benchmark script keeps working where there is no GPU: its small-shape run checks every fast
path against its reference, as the real run does on one GPU."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_the_gpu_suite_runs_its_checks_at_small_shapes(tmp_path):
    out = tmp_path / "figures.json"
    script = ROOT / "benchmarks" / "gpu_suite.py"
    run = subprocess.run([sys.executable, str(script), "--tiny", "--json", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert [name for name, section in figures.items() if isinstance(section, dict) and "error" in section] == []
    assert figures["ceilings"]["matmul_tflops"] > 0 and figures["ceilings"]["copy_tb_per_s"] > 0
    assert figures["encoder"]["max_abs_diff"] < 1e-5 and len(figures["encoder"]["paths"]) >= 3
    assert all(figures["decoding"]["identical_tokens"].values())
    assert figures["memory"]["lora_step"]["loss_is_finite"] and figures["memory"]["qlora_step"]["loss_is_finite"]
    assert 0 < figures["memory"]["qlora_step"]["nf4_logits_relative_diff"] < 0.5  # 4-bit copies of the same weights
    assert figures["evaluation"]["identical_answers"] == figures["evaluation"]["questions"]
    assert run.stdout.rstrip().splitlines()[-1].startswith("QLoRA step")  # the table comes last
