"""Making and loading Llama3-Med checkpoints: build from local components, convert from LLaVA (transformers'
format, or the original LLaVA code's, as LLaVA-1.5 and LLaVA-Med v1.5 are published), load.

Nothing here downloads weights by itself: a directory is read from disk, and a hub id is passed to
transformers only when the user names one.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionModel,
    GenerationConfig,
    LlavaForConditionalGeneration,
    PreTrainedConfig,
    PreTrainedModel,
)

from .config import Llama3MedConfig
from .model import Llama3MedForConditionalGeneration
from .model_card import looks_like_hub_id
from .processing import IMAGE_PLACEHOLDER, Llama3MedProcessor
from .processing.chat import LLAVA_CHAT_TEMPLATES
from .processing.images import DEFAULT_MAX_PIXELS

# The demo model that ships inside the package (trained on synthetic phantoms by recipes/demo/).
DEMO_MODEL_DIR = Path(__file__).parent / "demo_model"

# Normalisation of towers whose directory has no preprocessor_config.json.
DEFAULT_IMAGE_STATS = {
    "siglip_vision_model": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip_vision_model": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


def image_stats(vision_dir: str | Path, model_type: str) -> tuple[list[float], list[float]]:
    """The tower's mean and std: from its preprocessor_config.json, else the family's known values."""
    path = Path(vision_dir) / "preprocessor_config.json"
    if path.is_file():
        stats = json.loads(path.read_text())
        if "image_mean" in stats and "image_std" in stats:
            return list(stats["image_mean"]), list(stats["image_std"])
    if model_type not in DEFAULT_IMAGE_STATS:
        raise ValueError(f"{vision_dir}: no preprocessor_config.json and no known image statistics for {model_type}")
    mean, std = DEFAULT_IMAGE_STATS[model_type]
    return list(mean), list(std)


def make_processor(
    tokenizer,
    config: Llama3MedConfig,
    mean: Sequence[float],
    std: Sequence[float],
    image_fit: str = "pad",
    llava_tokenization: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
):
    """A processor whose image size and token count are read off the model config."""
    return Llama3MedProcessor(
        tokenizer=tokenizer,
        image_size=config.max_image_size,
        image_mean=mean,
        image_std=std,
        image_fit=image_fit,
        num_image_tokens=config.num_image_tokens,
        max_pixels=max_pixels,
        llava_tokenization=llava_tokenization,
    )


def llava_image_fit(model_dir: str | Path) -> str:
    """How a transformers LLaVA directory's own image processor fits images to a square: `pad` (its
    `do_pad`, LLaVA's convention, also where it says nothing) or `crop` (CLIP's centre crop, as the
    llava-hf ports of LLaVA-1.5 do)."""
    path = Path(model_dir) / "preprocessor_config.json"
    settings = json.loads(path.read_text()) if path.is_file() else {}
    return "crop" if settings.get("do_center_crop") and not settings.get("do_pad") else "pad"


def build(
    vision: str | Path,
    llm: str | Path,
    scales: Sequence[int] | None = None,
    vision_feature_layer: int = -2,
    projector_type: str = "mlp2x_gelu",
    dtype: str | torch.dtype = "auto",
    pyramid_resize: str = "bilinear_antialiased",
    image_fit: str = "pad",
) -> tuple[Llama3MedForConditionalGeneration, Llama3MedProcessor]:
    """A fresh Llama3-Med from a vision tower (SigLIP/CLIP dir) and a causal LM dir; projector untrained.

    `scales` defaults to 1x, 2x and 3x the tower's resolution (384/768/1152 for so400m-384), as in the
    paper; `pyramid_resize` is `Llama3MedConfig`'s and `image_fit` the processor's. The tokenizer gains
    an `<image>` token when it has none, and the LM's embeddings grow by it.
    """
    check_found(vision, "vision tower directory")
    check_found(llm, "LM directory")
    vision_full = AutoModel.from_pretrained(vision)
    vision_model = getattr(vision_full, "vision_model", vision_full)
    vision_config = vision_model.config
    if vision_config.model_type not in DEFAULT_IMAGE_STATS:
        raise ValueError(f"{vision}: vision tower type {vision_config.model_type!r} is not SigLIP or CLIP")
    base = vision_config.image_size
    scales = list(scales) if scales else [base, 2 * base, 3 * base]

    tokenizer = AutoTokenizer.from_pretrained(llm)
    language_model = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype)
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_PLACEHOLDER], special_tokens=True)
    if len(tokenizer) > language_model.get_input_embeddings().weight.shape[0]:
        language_model.resize_token_embeddings(len(tokenizer))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    config = Llama3MedConfig(
        vision_config=vision_config.to_dict(),
        text_config=language_model.config.to_dict(),
        scales=scales,
        vision_feature_layer=vision_feature_layer,
        projector_type=projector_type,
        pyramid_resize=pyramid_resize,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
    )
    model = Llama3MedForConditionalGeneration.from_components(config, vision_model, language_model)
    _set_stop_tokens(model, tokenizer)
    mean, std = image_stats(vision, vision_config.model_type)
    return model, make_processor(tokenizer, config, mean, std, image_fit=image_fit)


def rescale(
    model_dir: str | Path, scales: Sequence[int] | None = None, pyramid_resize: str | None = None
) -> tuple[Llama3MedForConditionalGeneration, Llama3MedProcessor]:
    """A model's tower, LM and tokenizer (chat template and image fit included) encoding at other S2
    scales, default 1x, 2x and 3x the tower's resolution, resized as `pyramid_resize` says (default: as
    the model does): the paper's pyramid tried on an existing model, such as a converted LLaVA-Med. The
    projector's input width is the tower's times the number of scales, so it starts afresh: the result
    needs at least the projector-alignment stage."""
    source, processor = load(model_dir)
    base = source.config.base_image_size
    config = Llama3MedConfig(
        vision_config=source.config.vision_config.to_dict(),
        text_config=source.config.text_config.to_dict(),
        scales=list(scales) if scales else [base, 2 * base, 3 * base],
        vision_feature_layer=source.config.vision_feature_layer,
        projector_type=source.config.projector_type,
        pyramid_resize=pyramid_resize or source.config.pyramid_resize,
        image_token_id=source.config.image_token_id,
    )
    model = Llama3MedForConditionalGeneration.from_components(
        config, source.vision_tower.vision_model, source.language_model
    )
    model.generation_config = source.generation_config  # its stop tokens and suppressed <image>
    return model, make_processor(
        processor.tokenizer,
        config,
        processor.image_mean,
        processor.image_std,
        image_fit=processor.image_fit,
        llava_tokenization=processor.llava_tokenization,
        max_pixels=processor.max_pixels,
    )


def build_scratch(
    vision_config: dict,
    text_config: dict,
    tokenizer,
    scales: Sequence[int] | None = None,
    vision_feature_layer: int = -1,
    projector_type: str = "mlp2x_gelu",
    image_mean: Sequence[float] = (0.5, 0.5, 0.5),
    image_std: Sequence[float] = (0.5, 0.5, 0.5),
) -> tuple[Llama3MedForConditionalGeneration, Llama3MedProcessor]:
    """A randomly initialised Llama3-Med from config dicts, for the demo model and tests; the LM's
    vocabulary is the tokenizer's, which must already hold `<image>`."""
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        raise ValueError(f"the tokenizer has no {IMAGE_PLACEHOLDER} token")
    base = vision_config.get("image_size", 384)
    config = Llama3MedConfig(
        vision_config=vision_config,
        text_config={
            **text_config,
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        scales=list(scales) if scales else [base, 2 * base, 3 * base],
        vision_feature_layer=vision_feature_layer,
        projector_type=projector_type,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
    )
    model = Llama3MedForConditionalGeneration(config)
    _set_stop_tokens(model, tokenizer)
    return model, make_processor(tokenizer, config, image_mean, image_std)


def convert_llava(llava_dir: str | Path) -> tuple[Llama3MedForConditionalGeneration, Llama3MedProcessor]:
    """Import a transformers `LlavaForConditionalGeneration` checkpoint as a single-scale Llama3-Med.

    With one scale the S2 encoder reduces to LLaVA's own encoding, so the converted model computes the
    same logits as the original.
    """
    llava = LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype="auto")
    lc = llava.config
    if not isinstance(lc.vision_feature_layer, int):
        raise ValueError(f"{llava_dir}: several vision feature layers {lc.vision_feature_layer} are not supported")
    has_cls = lc.vision_config.model_type == "clip_vision_model"
    if has_cls and lc.vision_feature_select_strategy == "full":
        raise ValueError(f"{llava_dir}: a CLIP tower with the 'full' strategy keeps the CLS token; unsupported")
    if lc.projector_hidden_act != "gelu" or not lc.multimodal_projector_bias:
        raise ValueError(f"{llava_dir}: only a biased Linear-GELU-Linear projector converts to mlp2x_gelu")
    config = Llama3MedConfig(
        vision_config=lc.vision_config.to_dict(),
        text_config=lc.text_config.to_dict(),
        scales=[lc.vision_config.image_size],
        vision_feature_layer=lc.vision_feature_layer,
        projector_type="mlp2x_gelu",
        image_token_id=lc.image_token_id,
    )
    with torch.device("meta"):
        language_model = AutoModelForCausalLM.from_config(config.text_config)
    language_model.model = llava.model.language_model
    language_model.lm_head = llava.lm_head
    language_model.generation_config = llava.generation_config
    model = Llama3MedForConditionalGeneration.from_components(config, llava.model.vision_tower, language_model)
    model.multi_modal_projector.load_state_dict(llava.model.multi_modal_projector.state_dict())
    _check_materialised(model)

    tokenizer = AutoTokenizer.from_pretrained(llava_dir)
    if tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER) != lc.image_token_id:
        raise ValueError(f"{llava_dir}: the tokenizer's <image> id differs from image_token_id {lc.image_token_id}")
    mean, std = image_stats(llava_dir, lc.vision_config.model_type)
    return model, make_processor(tokenizer, config, mean, std, image_fit=llava_image_fit(llava_dir))


# The original LLaVA code's model types and the LM each wraps, with the conversation mode its models were
# trained with (LLaVA-1.5: Vicuna; LLaVA-Med v1.5: Mistral-Instruct).
ORIGINAL_LLAVA_LMS = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral"}
DEFAULT_CONV_MODES = {"llama": "vicuna_v1", "mistral": "mistral_instruct"}
# Where the original LLaVA code keeps the projector and (when saved) the CLIP tower in its state dict.
_ORIGINAL_PROJECTOR = "model.mm_projector."
_ORIGINAL_TOWER = "model.vision_tower.vision_tower."


def is_original_llava(model_dir: str | Path) -> bool:
    """A checkpoint written by the original LLaVA code (its config names an `mm_vision_tower`)."""
    path = Path(model_dir) / "config.json"
    return path.is_file() and "mm_vision_tower" in json.loads(path.read_text())


def _original_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint in safetensors or PyTorch files, sharded or not."""
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        raise ValueError(f"{model_dir}: no *.safetensors or pytorch_model*.bin weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file) if file.suffix == ".safetensors" else torch.load(file, weights_only=True))
    return state


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def _original_tokenizer(model_dir: Path, text_config: PreTrainedConfig):
    """The checkpoint's tokenizer. Published LLaVA checkpoints hold only a SentencePiece `tokenizer.model`,
    which transformers reads through the sentencepiece and protobuf packages."""
    if not (model_dir / "tokenizer.json").is_file() and (model_dir / "tokenizer.model").is_file():
        if not all(_importable(name) for name in ("sentencepiece", "google.protobuf")):
            raise RuntimeError(
                f"{model_dir}: reading its tokenizer.model needs sentencepiece and protobuf: "
                "pip install 'llama3med[llava]'"
            )
    return AutoTokenizer.from_pretrained(model_dir, config=text_config)


def _refuse_unsupported_llava(model_dir: Path, raw: dict) -> None:
    """What the original LLaVA code can be configured for but a Llama3-Med cannot compute the same way."""
    checks = {  # field: (convertible, what it would need)
        "model_type": (raw.get("model_type") in ORIGINAL_LLAVA_LMS, "an MPT or other non-Llama/Mistral LM"),
        "mm_use_im_start_end": (not raw.get("mm_use_im_start_end"), "image start/end tokens"),
        "mm_vision_select_feature": (raw.get("mm_vision_select_feature", "patch") == "patch", "the CLS token kept"),
        "image_aspect_ratio": (
            not str(raw.get("image_aspect_ratio")).startswith("anyres"),
            "LLaVA-NeXT's any-resolution tiles",
        ),
        "mm_patch_merge_type": (raw.get("mm_patch_merge_type", "flat") == "flat", "LLaVA-NeXT's any-resolution tiles"),
        "mm_projector_type": (raw.get("mm_projector_type", "linear") in ("linear", "mlp2x_gelu"), "this projector"),
    }
    for field, (convertible, what) in checks.items():
        if not convertible:
            raise ValueError(f"{model_dir}: {field}={raw.get(field)!r} ({what}) cannot be converted")


def convert_original_llava(
    llava_dir: str | Path, vision: str | Path | None = None, conv_mode: str | None = None
) -> tuple[Llama3MedForConditionalGeneration, Llama3MedProcessor]:
    """Import a checkpoint of the original LLaVA code (`LlavaLlamaForCausalLM`, `LlavaMistralForCausalLM`:
    LLaVA-1.5, LLaVA-Med v1.5) as a Llama3-Med that computes what it computes: at its tower's one scale,
    or with `s2` (LLaVA's S2 tower, Shi et al.'s scaling on scales) at its `s2_scales`, resized as S2's
    code resizes them.

    Such a checkpoint holds the LM and the projector and names its CLIP tower (`mm_vision_tower`); the
    tower's config and image statistics, and its weights when the checkpoint lacks them, come from
    `vision` (default: that name, a local directory or a hub id). The tokenizer gains an `<image>` token,
    and its chat template becomes the LLaVA conversation mode `conv_mode` (default: the LM's, see
    `DEFAULT_CONV_MODES`), so that prompts are worded exactly as LLaVA's own evaluation words them.
    """
    path = Path(llava_dir)
    if (path / "adapter_config.json").is_file():
        raise ValueError(
            f"{llava_dir}: LoRA adapters; merge them into their base first (LLaVA's merge_lora_weights.py)"
        )
    raw = json.loads((path / "config.json").read_text())
    _refuse_unsupported_llava(path, raw)
    lm_type = ORIGINAL_LLAVA_LMS[raw["model_type"]]
    conv_mode = conv_mode or DEFAULT_CONV_MODES[lm_type]
    if conv_mode not in LLAVA_CHAT_TEMPLATES:
        raise ValueError(f"conv_mode must be one of {sorted(LLAVA_CHAT_TEMPLATES)}, got {conv_mode!r}")

    vision = vision or raw["mm_vision_tower"]
    try:
        vision_config = AutoConfig.from_pretrained(vision)
    except OSError as err:
        raise OSError(
            f"{llava_dir}: its vision tower {vision} cannot be read ({err}); give a local copy (--vision DIR)"
        ) from None
    vision_config = getattr(vision_config, "vision_config", vision_config)
    if vision_config.model_type != "clip_vision_model":
        raise ValueError(f"{vision}: a {vision_config.model_type!r} tower; the original LLaVA code reads CLIP towers")
    scales = _original_scales(llava_dir, raw, vision_config.image_size)
    if vision_config.hidden_size * len(scales) != raw["mm_hidden_size"]:
        width = f"{vision_config.hidden_size}" + (f" x {len(scales)} scales" if len(scales) > 1 else "")
        raise ValueError(f"{vision}: width {width}, but {llava_dir} has mm_hidden_size {raw['mm_hidden_size']}")

    state = _original_state_dict(path)
    # "vision_model." is in the names transformers 4 wrote (every published LLaVA), not in transformers 5's
    tower_weights = {
        k.removeprefix(_ORIGINAL_TOWER).removeprefix("vision_model."): v
        for k, v in state.items()
        if k.startswith(_ORIGINAL_TOWER)
    }
    tower = CLIPVisionModel.from_pretrained(vision, dtype="auto")
    if tower_weights:  # the checkpoint's own tower (LLaVA saves it; frozen, it equals the named one)
        tower.load_state_dict(tower_weights)

    text_fields = {k: v for k, v in raw.items() if not k.startswith("mm_") and k not in _LLAVA_ONLY_FIELDS}
    text_config = AutoConfig.for_model(lm_type, **text_fields)
    text_config.use_cache = True  # LLaVA saves use_cache=False from training
    lm_weights = {k: v for k, v in state.items() if not k.startswith((_ORIGINAL_PROJECTOR, "model.vision_tower."))}
    language_model, loading = MODEL_FOR_CAUSAL_LM_MAPPING[type(text_config)].from_pretrained(
        None, config=text_config, state_dict=lm_weights, dtype="auto", output_loading_info=True
    )
    missing, unexpected = sorted(loading["missing_keys"]), sorted(loading["unexpected_keys"])
    if missing or unexpected:
        raise ValueError(f"{llava_dir}: LM weights missing {missing[:3]}, unexpected {unexpected[:3]}")
    if (path / "generation_config.json").is_file():
        language_model.generation_config = GenerationConfig.from_pretrained(path)

    tokenizer = _original_tokenizer(path, text_config)
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATES[conv_mode]
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_PLACEHOLDER], special_tokens=True)
    if len(tokenizer) > language_model.get_input_embeddings().weight.shape[0]:
        # the new row is never read: the image features replace it, and generation never picks it
        language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token

    config = Llama3MedConfig(
        vision_config=vision_config.to_dict(),
        text_config=language_model.config.to_dict(),
        scales=scales,
        vision_feature_layer=raw.get("mm_vision_select_layer", -2),
        projector_type=raw.get("mm_projector_type", "linear"),
        pyramid_resize="bicubic" if len(scales) > 1 else "bilinear_antialiased",
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
    )
    model = Llama3MedForConditionalGeneration.from_components(config, tower, language_model)
    projector = {k.removeprefix(_ORIGINAL_PROJECTOR): v for k, v in state.items() if k.startswith(_ORIGINAL_PROJECTOR)}
    names = {"0.": "linear_1.", "2.": "linear_2."} if config.projector_type == "mlp2x_gelu" else {"": "linear_1."}
    model.multi_modal_projector.load_state_dict(
        {
            names[prefix] + k.removeprefix(prefix): v
            for k, v in projector.items()
            for prefix in names
            if k.startswith(prefix)
        }
    )
    _check_materialised(model)
    _set_stop_tokens(model, tokenizer)
    mean, std = image_stats(vision, "clip_vision_model")
    # LLaVA pads to a square only with image_aspect_ratio "pad"; otherwise CLIP's processor crops
    fit = "pad" if raw.get("image_aspect_ratio") == "pad" else "crop"
    return model, make_processor(tokenizer, config, mean, std, image_fit=fit, llava_tokenization=True)


def _original_scales(model_dir: str | Path, raw: dict, tile: int) -> list[int]:
    """The scales a checkpoint of the original LLaVA code encodes at: its tower's `tile` px, or with `s2`
    the `s2_scales` (default LLaVA's 336,672,1008) that its S2 tower cuts into tiles of the smallest."""
    if not raw.get("s2"):
        return [tile]
    text = str(raw.get("s2_scales", "336,672,1008"))
    try:
        scales = sorted(int(size) for size in text.split(","))
    except ValueError:
        raise ValueError(f"{model_dir}: s2_scales={text!r} is not a comma-separated list of sizes") from None
    if scales[0] != tile or len(set(scales)) < len(scales) or any(size % tile for size in scales):
        raise ValueError(
            f"{model_dir}: s2_scales={text!r} cannot be converted (only distinct multiples of the tower's {tile} px "
            "tiles, the smallest equal to it, are cut into whole tiles)"
        )
    return scales


# Fields of an original LLaVA config that describe the vision side or training, not the LM.
_LLAVA_ONLY_FIELDS = {
    "architectures",
    "model_type",
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "s2",
    "s2_scales",
    "use_mm_proj",
    "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter",
    "unfreeze_mm_vision_tower",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "_name_or_path",
    "transformers_version",
}


def _set_stop_tokens(model: PreTrainedModel, tokenizer) -> None:
    """Stop on the LM's own end tokens and the tokenizer's end-of-turn token; pad with its pad token;
    never generate `<image>` (see `_suppress_image_token`)."""
    _suppress_image_token(model)
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def _check_materialised(model: torch.nn.Module) -> None:
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise RuntimeError(f"weights left unset after assembly: {leftovers[:3]}")


def save(model: PreTrainedModel, processor: Llama3MedProcessor, out: str | Path, max_shard_size: str = "5GB") -> None:
    """Write a directory that `from_pretrained` (ours and the Auto classes) loads: safetensors shards."""
    model.save_pretrained(out, max_shard_size=max_shard_size)
    processor.save_pretrained(out)


def cast_saved(model_dir: str | Path, dtype: str) -> None:
    """Rewrite a saved model's floating-point weights in `dtype`, shard by shard, and record it in its
    config: a training stage's float32 master weights become the bfloat16 that answering uses, at half
    the disk."""
    directory, target = Path(model_dir), getattr(torch, dtype)
    total_size = 0
    for shard in sorted(directory.glob("*.safetensors")):
        tensors = {k: t.to(target) if t.is_floating_point() else t for k, t in load_file(shard).items()}
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, shard, metadata={"format": "pt"})
    index = directory / "model.safetensors.index.json"
    if index.is_file():  # sharded: the index states the total size
        content = json.loads(index.read_text())
        content.setdefault("metadata", {})["total_size"] = total_size
        index.write_text(json.dumps(content, indent=2) + "\n")
    config = json.loads((directory / "config.json").read_text())
    config["dtype"] = dtype
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _suppress_image_token(model: PreTrainedModel) -> None:
    """`<image>` is an input-only token: an answer that produced it would have no image features for it at
    the next step. Untrained or small models can rank it first, so generation never picks it."""
    suppressed = list(model.generation_config.suppress_tokens or [])
    if model.config.image_token_id not in suppressed:
        model.generation_config.suppress_tokens = [*suppressed, model.config.image_token_id]


def nf4_quantization(compute_dtype: torch.dtype):
    """transformers' config for storing the LM's linear layers in 4-bit NF4 with double quantization
    (QLoRA's storage, bitsandbytes' kernels), computing in `compute_dtype`; the tower, the projector and
    the LM head keep their precision."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError("4-bit weights need bitsandbytes: pip install 'llama3med[qlora]'")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"],
    )


def check_found(name: str | Path, what: str) -> None:
    """Refuse a `name` that is neither a path that exists nor, by its form, a hub id (`owner/name`),
    before transformers reads it as a malformed repository id."""
    if not Path(name).exists() and not looks_like_hub_id(name):
        raise ValueError(f"{name}: {what} not found")


def load(
    model_dir: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = "auto",
    quantization_config=None,
) -> tuple[Llama3MedForConditionalGeneration, Llama3MedProcessor]:
    """Model and processor of a Llama3-Med directory, checked to agree on image size and token count.
    A `quantization_config` (transformers') loads the weights quantized, straight onto `device`."""
    path = Path(model_dir)
    check_found(model_dir, "model directory")
    if path.exists() and not (path / "config.json").is_file():
        raise ValueError(f"{model_dir}: not a model directory (no config.json)")
    if is_original_llava(path):
        raise ValueError(f"{model_dir}: a checkpoint of the original LLaVA code; run `llama3med convert --llava` first")
    config = AutoConfig.from_pretrained(model_dir)
    if not isinstance(config, Llama3MedConfig):
        raise ValueError(f"{model_dir}: a {config.model_type!r} checkpoint; run `llama3med convert` first")
    placed = {} if quantization_config is None else {"device_map": {"": device or "cpu"}}
    model = Llama3MedForConditionalGeneration.from_pretrained(
        model_dir, dtype=dtype, quantization_config=quantization_config, **placed
    )
    processor = Llama3MedProcessor.from_pretrained(model_dir)
    if processor.num_image_tokens != config.num_image_tokens or processor.image_size != config.max_image_size:
        raise ValueError(
            f"{model_dir}: processor ({processor.image_size} px, {processor.num_image_tokens} tokens) does not "
            f"match the model ({config.max_image_size} px, {config.num_image_tokens} tokens)"
        )
    _suppress_image_token(model)  # also for checkpoints saved before this default existed
    if getattr(quantization_config, "load_in_4bit", False):
        _keep_4bit_layers_off_the_packed_cpu_kernel(model)
    if device is not None and quantization_config is None:
        model.to(device)
    return model.eval(), processor


def _keep_4bit_layers_off_the_packed_cpu_kernel(model: torch.nn.Module) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes repacks each 4-bit layer's weight for a faster kernel at
    its first forward, which fails unless the output width is a multiple of 32 and the input width one of
    the quantization block (the demo's 688-wide MLP is neither; Llama-3's widths all are): those layers
    keep the plain 4-bit kernel."""
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            block = module.weight.quant_state.blocksize
            if module.out_features % 32 or module.in_features % block:
                module.support_avx512bf16_for_cpu = False
