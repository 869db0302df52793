"""The benchmark scripts keep working: the GPU suite's small-shape run checks every fast path against its
reference, as the real run does on one GPU, and the CPU scripts compare their paths' results."""

import json
import math
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
    assert figures["evaluation"]["identical_answers"] == figures["evaluation"]["questions"]
    assert figures["evaluation"]["heat_map"]["seconds"] > 0  # one explanation with the whole model
    assert "heat map (ask --heatmap):" in run.stdout
    assert figures["evaluation"]["ranked"]["questions_per_s"] > 0 and "eval --rank-options" in run.stdout
    finetune = figures["finetune"]
    assert (finetune["batch"], finetune["lora"]["r"]) == (4, 128)  # the single-GPU LoRA recipe's
    assert finetune["loss_relative_diff"] < 1e-5 and finetune["grad_norms_relative_diff"] < 1e-4
    qlora = finetune["arms"]["Llama3-Med's loss, QLoRA (NF4 LM)"]
    assert 0 < qlora["nf4_logits_relative_diff"] < 0.5 and math.isfinite(
        qlora["loss"]
    )  # 4-bit copies of the same weights
    for name, moved in (("fp8", 0.1), ("nf4", 0.5)):  # --fp8's and --load-4bit's decoding
        quantized = figures[name]
        assert quantized["layers"] == 2 * 7 and quantized["weights_gib"]["quantized"] < quantized["weights_gib"]["bf16"]
        assert 0 < quantized["logits_relative_diff"] < moved
        assert quantized["batch 16"]["tokens_before_first_difference"] > 0 and quantized["batch 16"]["x_bf16"] > 0
    assert run.stdout.rstrip().splitlines()[-1].lstrip().startswith("batch 16")  # the table comes last


def test_the_training_memory_benchmark_compares_the_losses_of_steps_in_two_processes():
    script = ROOT / "benchmarks" / "train_memory.py"
    run = subprocess.run([sys.executable, str(script), "--length", "800"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    last = run.stdout.rstrip().splitlines()[-1]
    ratio = float(last.split("memory ")[1].split("x")[0])
    assert ratio > 1.5, last  # 729 image tokens of 800: the head runs on a few dozen positions


def test_the_serving_benchmark_answers_the_same_chats_with_and_without_the_image_cache():
    script = ROOT / "benchmarks" / "serve_turns.py"
    command = [sys.executable, str(script), "--images", "2", "--turns", "3", "--rounds", "1", "--max-tokens", "4"]
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.rstrip().splitlines()
    assert [line.split()[-1] for line in lines[1:3]] == ["6/6", "6/6"]  # identical answers, both paths
    assert lines[-1].startswith("cache, each round: 4 hits, 2 misses")  # each chat's later turns hit


def test_the_load_benchmark_serves_the_same_greedy_answers_one_at_a_time_and_in_a_running_batch():
    script = ROOT / "benchmarks" / "serve_load.py"
    command = [sys.executable, str(script), "--clients", "3", "--requests", "2", "--sampled-clients", "1"]
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.rstrip().splitlines()
    assert [line.split()[-1] for line in lines[1:3]] == ["4/4", "4/4"]  # the greedy clients' answers


def test_the_ranking_benchmark_finds_the_log_probabilities_and_picks_of_each_option_scored_alone():
    script = ROOT / "benchmarks" / "eval_throughput.py"
    command = [sys.executable, str(script), "--images", "2", "--rank-options"]
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    last = run.stdout.rstrip().splitlines()[-1]
    picks = last.split("identical picks: ")[1].split("/")
    assert picks[0] == picks[1] and float(last.split("log-probabilities ")[1].split(";")[0]) < 1e-4, last
