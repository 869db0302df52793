"""Training recipes: one YAML file per stage, overridable from the command line with `--set key=value`.

A recipe names the stage, where the model comes from, the data mixture and the output directory; its
`training:` mapping goes unchanged to `transformers.TrainingArguments`, so every option of the HF Trainer
(batch size, schedule, bf16, gradient checkpointing, FSDP, DeepSpeed, ...) is available under its own name.
Relative paths are relative to the working directory, as for any command-line tool.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..data.benchmarks import BENCHMARKS, PROMPT_STYLES
from ..data.conversations import Source


class RecipeLoader(yaml.SafeLoader):
    """YAML as people write it in configs: `1e-4` is a number (plain YAML 1.1 reads it as a string)."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=RecipeLoader)


# The model's trainable parts, as named in its state dict; `learning_rates` may give each its own rate
# (as LLaVA-NeXT's mm_vision_tower_lr and mm_projector_lr do).
MODEL_PARTS = ("vision_tower", "multi_modal_projector", "language_model")
STAGES = ("tower", "pretrain", "finetune")
LORA_KEYS = {"r", "alpha", "dropout", "target_modules", "bits"}
# `vqa_eval`: a VQA set answered and scored while a stage trains (train/vqa_eval.py)
VQA_EVAL_KEYS = {
    "benchmark",
    "data",
    "split",
    "image_root",
    "limit",
    "prompt",
    "system",
    "every",
    "max_new_tokens",
    "batch_size",
    "rank_options",
}


def check_vqa_eval(spec: dict) -> None:
    """Refuse a malformed `vqa_eval` recipe entry before anything loads, by key."""
    if not isinstance(spec, dict) or "data" not in spec:
        raise ValueError(
            "recipe: vqa_eval needs at least 'data' (and usually 'benchmark'), e.g. {benchmark: slake, data: ...}"
        )
    unknown = set(spec) - VQA_EVAL_KEYS
    if unknown:
        raise ValueError(f"recipe: vqa_eval has unknown keys {sorted(unknown)}; known: {sorted(VQA_EVAL_KEYS)}")
    for key in ("limit", "every", "max_new_tokens", "batch_size"):
        value = spec.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"recipe: vqa_eval.{key} must be a whole number of at least 1, got {value!r}")
    if spec.get("benchmark", "llava-med") not in BENCHMARKS:
        raise ValueError(
            f"recipe: vqa_eval.benchmark must be one of {', '.join(BENCHMARKS)}, got {spec['benchmark']!r}"
        )
    if not isinstance(spec.get("rank_options", False), bool):
        raise ValueError(f"recipe: vqa_eval.rank_options must be true or false, got {spec['rank_options']!r}")
    if spec.get("prompt", "plain") not in PROMPT_STYLES:
        raise ValueError(f"recipe: vqa_eval.prompt must be one of {', '.join(PROMPT_STYLES)}, got {spec['prompt']!r}")
    if not isinstance(spec.get("system", ""), str):
        raise ValueError(f"recipe: vqa_eval.system must be a text, got {spec['system']!r}")


def check_model_spec(model: object) -> None:
    """Refuse a recipe's `model` that is neither a directory nor a mapping `llama3med build` (under
    `scratch`, the scratch builder) takes, naming the keys missing or unknown, before anything loads."""
    from ..checkpoints import build, build_scratch

    if isinstance(model, str):
        return
    if not isinstance(model, dict):
        raise ValueError(f"recipe: model must be a directory or a mapping, got {model!r}")
    if "scratch" in model:
        where, spec, needed = "model.scratch", model["scratch"], {"vision", "text"}
        known = {*needed, "vocab_size", *inspect.signature(build_scratch).parameters}
        known -= {"vision_config", "text_config", "tokenizer"}
    else:
        where, spec, needed = "model", model, {"vision", "llm"}
        known = set(inspect.signature(build).parameters) - {"dtype"}
    if not isinstance(spec, dict):
        raise ValueError(f"recipe: {where} must be a mapping, got {spec!r}")
    if unknown := set(spec) - known:
        raise ValueError(f"recipe: {where} has unknown keys {sorted(unknown)}; known: {sorted(known)}")
    if missing := needed - set(spec):
        raise ValueError(
            f"recipe: {where} lacks {sorted(missing)}: a model is a directory, {{vision, llm}} to build, or "
            "{scratch: {vision, text}}"
        )


@dataclass
class Recipe:
    stage: str  # "tower" (the tower on finding maps), "pretrain" (projector on captions), "finetune"
    model: str | dict  # a Llama3-Med directory, {vision, llm, ...} to build, or {scratch: {...}}
    data: list[dict]  # [{path, image_root, ratio}]
    output_dir: str
    max_length: int = 2048
    system: str | None = None  # the system message of conversations that have none (then: eval --system)
    dtype: str = "auto"  # weights' dtype when loading: auto, float32, bfloat16, float16
    train_vision_tower: bool = False
    train_language_model: bool | None = None  # None: the stage decides (pretrain: frozen, finetune: trained)
    lora: dict | None = None  # {r, alpha, dropout, target_modules, bits}: LoRA on the LM (bits: 4 is QLoRA)
    learning_rates: dict = field(default_factory=dict)  # {part: lr} overriding training.learning_rate
    save_dtype: str | None = None  # the final model's weights on disk: bfloat16, float16, float32 (None: as trained)
    strict: bool = False  # fail on the first bad record instead of skipping it
    seed: int = 0
    vqa_eval: dict | None = None  # {benchmark, data, limit, every, ...}: answers scored while training (vqa_eval.py)
    training: dict = field(default_factory=dict)  # transformers.TrainingArguments

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"recipe: stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.stage == "tower" and (self.lora is not None or self.train_language_model):
            raise ValueError(
                "recipe: stage tower trains the vision tower alone; lora and train_language_model do not apply"
            )
        check_model_spec(self.model)
        if self.system is not None and not isinstance(self.system, str):
            raise ValueError(f"recipe: system must be a text, got {self.system!r}")
        if not isinstance(self.data, list) or not self.data:
            raise ValueError("recipe: data must be a non-empty list of {path, image_root, ratio}")
        for i, entry in enumerate(self.data):
            if not isinstance(entry, dict) or "path" not in entry:
                raise ValueError(f"recipe: data[{i}] needs a 'path'")
            unknown = set(entry) - {"path", "image_root", "ratio"}
            if unknown:
                raise ValueError(f"recipe: data[{i}] has unknown keys {sorted(unknown)}")
        if self.lora is not None:
            if not isinstance(self.lora, dict):
                raise ValueError(f"recipe: lora must be a mapping such as {{r: 16, alpha: 32}}, got {self.lora!r}")
            unknown = set(self.lora) - LORA_KEYS
            if unknown:
                raise ValueError(f"recipe: lora has unknown keys {sorted(unknown)}; known: {sorted(LORA_KEYS)}")
            if self.lora.get("bits") not in (None, 4):
                raise ValueError(f"recipe: lora.bits must be 4 (QLoRA: the LM in 4-bit NF4), got {self.lora['bits']!r}")
        if self.save_dtype not in (None, "bfloat16", "float16", "float32"):
            raise ValueError(f"recipe: save_dtype must be bfloat16, float16 or float32, got {self.save_dtype!r}")
        self.learning_rates = self.learning_rates or {}
        if not isinstance(self.learning_rates, dict):
            raise ValueError(f"recipe: learning_rates must map parts to rates, got {self.learning_rates!r}")
        unknown = set(self.learning_rates) - set(MODEL_PARTS)
        if unknown:
            raise ValueError(f"recipe: learning_rates has unknown parts {sorted(unknown)}; known: {list(MODEL_PARTS)}")
        for part, rate in self.learning_rates.items():
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate <= 0:
                raise ValueError(f"recipe: learning_rates.{part} must be a positive number, got {rate!r}")
        if self.vqa_eval is not None:
            if self.stage == "tower":
                raise ValueError("recipe: stage tower does not answer questions; vqa_eval is for pretrain and finetune")
            check_vqa_eval(self.vqa_eval)
        if "output_dir" in self.training:
            raise ValueError("recipe: set output_dir at the top level, not under training")

    @property
    def quantized(self) -> bool:
        """QLoRA: the LM's linear layers are loaded in 4 bits and frozen; only the adapters train."""
        return self.lora is not None and self.lora.get("bits") == 4

    @property
    def sources(self) -> list[Source]:
        return [
            Source(Path(d["path"]), Path(d.get("image_root", Path(d["path"]).parent)), float(d.get("ratio", 1.0)))
            for d in self.data
        ]


def set_value(tree: dict, dotted_key: str, value: Any) -> None:
    """Set `a.b.0.c` in nested dicts and lists, creating dicts on the way."""
    *parents, last = dotted_key.split(".")
    node: Any = tree
    for part in parents:
        if isinstance(node, list):
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a recipe and apply `key=value` overrides (values parsed as YAML: `1e-4`, `true`, `[1, 2]`)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: recipe not found")
    try:
        tree = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: a recipe is a mapping of keys to values")
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {override!r}")
        try:
            set_value(tree, key.strip(), parse_yaml(text))
        except (IndexError, ValueError, TypeError, AttributeError):
            raise ValueError(f"--set {override}: no such place in the recipe") from None
    known = {f.name for f in fields(Recipe)}
    unknown = set(tree) - known
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    missing = {"stage", "model", "data", "output_dir"} - set(tree)
    if missing:
        raise ValueError(f"{path}: missing keys {sorted(missing)}")
    return Recipe(**tree)
