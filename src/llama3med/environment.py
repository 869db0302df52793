"""What this machine offers llama3med: versions, devices and optional parts, for a bug report or for
knowing before a long job whether `--fp8`, `--load-4bit`, compressed DICOM or DeepSpeed will work."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

# distributions whose presence changes what llama3med can do, and what for
PACKAGES = {
    "torch": "the model",
    "transformers": "the model",
    "tokenizers": "the model",
    "accelerate": "training",
    "peft": "LoRA and QLoRA (the train extra)",
    "bitsandbytes": "--load-4bit and QLoRA (the qlora extra)",
    "deepspeed": "DeepSpeed ZeRO (the deepspeed extra)",
    "tensorboard": "training logs (the train extra)",
    "pydicom": "DICOM",
    "python-gdcm": "compressed DICOM (JPEG Lossless, JPEG-LS, JPEG 2000)",
    "pylibjpeg-libjpeg": "12-bit lossy JPEG DICOM (GPL-3.0, optional)",
    "nibabel": "NIfTI",
    "pyarrow": "parquet benchmarks (the eval extra)",
    "openai": "eval --api-url and the openai teacher (the eval and datagen extras)",
    "anthropic": "the anthropic teacher (the datagen extra)",
    "fastapi": "serve",
    "uvicorn": "serve",
    "sentencepiece": "convert of LLaVA checkpoints (the llava extra)",
}


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# what `cpu_bfloat16_hardware` found means for choosing `--dtype` on the CPU
CPU_BFLOAT16 = {
    "AMX": "in hardware (AMX): on the CPU, --dtype bfloat16 runs the model faster than the default float32",
    "AVX512-BF16": "in hardware (AVX512-BF16)",
    None: "without hardware support: on the CPU, keep the default float32",
}


def cpu_bfloat16_hardware() -> str | None:
    """The CPU's instructions for bfloat16 matmuls as PyTorch finds them: "AMX" (Intel Sapphire Rapids and
    later, several times float32's rate), "AVX512-BF16", or None where the CPU has neither."""
    import torch

    def has(check: str) -> bool:
        return bool(getattr(torch.cpu, check, lambda: False)())

    if has("_is_amx_tile_supported"):
        return "AMX"
    return "AVX512-BF16" if has("_is_avx512_bf16_supported") else None


def cpp_compiler() -> str | None:
    """The C++ compiler `torch.compile` would build CPU kernels with (`$CXX`, else g++), or None where
    none runs: `--compile` on a CPU cannot work without one."""
    from torch._inductor import cpp_builder, exc

    try:
        return cpp_builder.get_cpp_compiler()
    except (exc.InvalidCxxCompiler, RuntimeError, OSError):
        return None


def memory_gib() -> float | None:
    """This machine's memory, which bounds a model on the CPU (an 8B LM takes 16 GB in bfloat16, 32 in
    float32); None where the OS does not say."""
    try:
        return round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)
    except (AttributeError, ValueError, OSError):  # Windows has no sysconf
        return None


def describe() -> dict[str, object]:
    """The facts, as plain data (`llama3med env --json`)."""
    import torch

    from . import __version__

    facts: dict[str, object] = {
        "llama3med": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_cores": os.cpu_count(),
        "memory_gib": memory_gib(),
        "cpp_compiler": cpp_compiler(),
        "cpu_vector_isa": torch.backends.cpu.get_cpu_capability(),
        "cpu_bfloat16": cpu_bfloat16_hardware(),
        "torch_cuda": torch.version.cuda,
        "packages": {name: _version(name) for name in PACKAGES},
        "gpus": [],
    }
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            capability = (props.major, props.minor)
            facts["gpus"].append(
                {
                    "name": props.name,
                    "memory_gib": round(props.total_memory / 2**30, 1),
                    "compute_capability": f"{props.major}.{props.minor}",
                    "bfloat16": capability >= (8, 0),
                    "fp8": capability >= (8, 9),
                }
            )
    facts["mps"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return facts


def format_facts(facts: dict) -> str:
    """The facts as lines to paste into an issue."""
    lines = [f"{key}: {facts[key]}" for key in ("llama3med", "python", "platform", "cpu_cores", "memory_gib")]
    lines.append(f"cpu kernels: {facts['cpu_vector_isa']}; bfloat16 matmuls {CPU_BFLOAT16[facts['cpu_bfloat16']]}")
    lines.append(f"C++ compiler for --compile on the CPU: {facts['cpp_compiler'] or 'none found (install g++)'}")
    lines.append(f"torch built for CUDA: {facts['torch_cuda'] or 'no (CPU build)'}")
    for index, gpu in enumerate(facts["gpus"]):
        lines.append(
            f"GPU {index}: {gpu['name']}, {gpu['memory_gib']} GiB, compute capability {gpu['compute_capability']}"
            f" (bfloat16 {'yes' if gpu['bfloat16'] else 'no'}, --fp8 {'yes' if gpu['fp8'] else 'no'})"
        )
    if not facts["gpus"]:
        lines.append("GPUs: none visible" + (" (Apple MPS is available)" if facts["mps"] else ""))
    width = max(map(len, PACKAGES))
    lines.append("packages:")
    lines += [f"  {name.ljust(width)}  {version:<14} {PACKAGES[name]}" for name, version in facts["packages"].items()]
    return "\n".join(lines)
