"""`llama3med train`: the paper's two stages on the HF Trainer, so one command runs on a CPU, a GPU, or
many under torchrun/accelerate with DDP, FSDP or DeepSpeed, and resumes exactly from its checkpoints.

Stage `pretrain` aligns the projector on image-caption pairs; stage `finetune` trains the projector and
the LM (fully, or with LoRA or QLoRA) on conversations. Stage `tower`, for a tower built from scratch,
comes first: it teaches the tower where findings are (`tower.py`). The output directory ends up holding
a model that `llama3med ask` loads, beside the Trainer's `checkpoint-N` folders.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import logging
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

from .. import checkpoints
from ..data.conversations import ConversationCollator, ConversationDataset, RecordDataset, read_records
from ..data.findings import FindingMapDataset, collate_finding_maps
from ..inference import peak_memory_gib
from ..model_card import write_model_card
from ..processing import train_bpe_tokenizer
from .recipe import MODEL_PARTS, Recipe
from .tower import FindingMapModel
from .vqa_eval import VQAEvalCallback

logger = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class EpochSeededLengthSampler(LengthGroupedSampler):
    """Groups samples of similar length into batches; the shuffle depends only on (seed, epoch), so a
    resumed run draws the same order as the run it continues."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


class Llama3MedTrainer(Trainer):
    """The HF Trainer, with length grouping read from the dataset's token counts instead of by loading
    every sample (which would decode every image), and a learning rate per model part where the recipe
    gives one."""

    def __init__(self, *args, learning_rates: dict[str, float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.learning_rates = learning_rates or {}

    def create_optimizer(self, model=None):
        """The Trainer's optimizer (its weight-decay groups, its optimizer class), with each group split
        by model part so that a part named in `learning_rates` gets its own rate; the schedule scales
        every group alike."""
        optimizer = super().create_optimizer(model)
        if not self.learning_rates:
            return optimizer
        part_of = {id(p): model_part(name) for name, p in (model or self.model).named_parameters()}
        groups = []
        for group in optimizer.param_groups:
            by_part: dict[str | None, list] = {}
            for parameter in group["params"]:
                by_part.setdefault(part_of.get(id(parameter)), []).append(parameter)
            groups += [
                {**group, "params": params, "lr": self.learning_rates.get(part, group["lr"])}
                for part, params in by_part.items()
            ]
        idle = set(self.learning_rates) - {part_of.get(id(p)) for group in groups for p in group["params"]}
        if idle:
            raise ValueError(f"recipe: learning_rates names {sorted(idle)}, which have no trainable parameter here")
        optimizer.param_groups = groups
        return optimizer

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and isinstance(dataset, ConversationDataset):
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return EpochSeededLengthSampler(dataset.lengths, batch, self.args.data_seed or self.args.seed)
        return super()._get_train_sampler(train_dataset)


class ProgressLog(ProgressCallback):
    """The Trainer's progress bar (steps, ETA), with each log written as one readable line (the last
    step's always); with `training.disable_tqdm` the lines alone, as a log file wants them."""

    def __init__(self):
        super().__init__()
        self.start = self.last = (0, time.perf_counter())

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last = (state.global_step, time.perf_counter())  # a resumed run starts mid-way
        if not args.disable_tqdm:
            super().on_train_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            # The last steps' loss is logged, averaged over all processes like every logged loss, so the
            # run's mean loss is too: unlogged, the Trainer adds the first process's own loss alone.
            control.should_log = True
        if self.training_bar is not None:
            super().on_step_end(args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        step, now = state.global_step, time.perf_counter()
        parts = [f"step {step}/{state.max_steps}"]
        if "loss" in logs:  # the rate is over the steps since the last loss line
            global_batch = args.train_batch_size * args.gradient_accumulation_steps * args.world_size
            rate = (step - self.last[0]) * global_batch / max(now - self.last[1], 1e-9)
            self.last = (step, now)
            seconds_per_step = (now - self.start[1]) / max(step - self.start[0], 1)
            eta = datetime.timedelta(seconds=round((state.max_steps - step) * seconds_per_step))
            parts += [
                f"loss {logs['loss']:.4f}",
                f"lr {logs.get('learning_rate', 0.0):.2e}",
                f"{rate:.1f} samples/s",
                f"ETA {eta}",
            ]
        else:
            parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items()]
        line = " | ".join(parts)
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            print(line, flush=True)


def corpus_texts(recipe: Recipe) -> list[str]:
    """Every turn of every data file, to train a from-scratch model's tokenizer on."""
    texts = []
    for source in recipe.sources:
        for record in read_records(source.path):
            turns = record.get("conversations") or []
            texts += [str(turn.get("value", "")) for turn in turns if isinstance(turn, dict)]
    return texts


def qlora_config(args: TrainingArguments):
    """QLoRA's storage for the LM, computing in the run's precision."""
    return checkpoints.nf4_quantization(torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32)


def prepare_model(recipe: Recipe, args: TrainingArguments):
    """Model and processor the recipe starts from: a checkpoint, components to build, or a scratch spec.
    Whatever the stage then initialises before the Trainer seeds itself (a scratch model, LoRA adapters,
    the tower stage's finding head) is drawn from the recipe's seed, so a rerun starts the same."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    torch.manual_seed(recipe.seed)
    spec = recipe.model
    if is_deepspeed_zero3_enabled() and (recipe.stage == "tower" or not isinstance(spec, str)):
        raise ValueError(
            "recipe: DeepSpeed ZeRO-3 loads a saved Llama3-Med directory partitioned, but cannot build one from "
            "components or from scratch, nor run the tower stage: make the model first (`llama3med build`, or a "
            "stage under DDP or ZeRO-2) and name its directory as the recipe's model"
        )
    if recipe.quantized:
        if not isinstance(spec, str):
            raise ValueError("recipe: QLoRA (lora.bits: 4) starts from a Llama3-Med directory (a pretrain output)")
        return checkpoints.load(spec, args.device, recipe.dtype, quantization_config=qlora_config(args))
    if isinstance(spec, str):
        return checkpoints.load(spec, dtype=recipe.dtype)
    if "scratch" in spec:  # the recipe checked the mapping's keys (`check_model_spec`)
        scratch = dict(spec["scratch"])
        tokenizer = train_bpe_tokenizer(
            corpus_texts(recipe), vocab_size=scratch.pop("vocab_size", 1024), model_max_length=recipe.max_length
        )
        return checkpoints.build_scratch(
            scratch.pop("vision"), scratch.pop("text"), tokenizer, scales=scratch.pop("scales", None), **scratch
        )
    return checkpoints.build(**spec, dtype=recipe.dtype)


@contextmanager
def _peft_reading_deprecated_attributes():
    """peft 0.21 reads transformers' `is_gradient_checkpointing`, deprecated since transformers 5.25: a
    warning on every LoRA run that its user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def apply_lora(model, spec: dict, train_vision_tower: bool):
    """LoRA adapters on the LM's linear layers; the projector (and the tower if trained) train fully."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise RuntimeError("LoRA needs peft: pip install 'llama3med[train]'") from None
    targets = "|".join(spec.get("target_modules", LORA_TARGETS))
    config = LoraConfig(
        r=int(spec.get("r", 16)),
        lora_alpha=float(spec.get("alpha", 32)),
        lora_dropout=float(spec.get("dropout", 0.05)),
        target_modules=rf"language_model\..*\.({targets})",
        modules_to_save=["multi_modal_projector", *(["vision_tower"] if train_vision_tower else [])],
    )
    with _peft_reading_deprecated_attributes():
        return get_peft_model(model, config)


def merged_model(model, recipe: Recipe, adapter_dir: Path):
    """The trained model as a plain one: the adapters folded into the LM. Under QLoRA they are folded into
    the base weights reloaded at full precision, not into their 4-bit copies, whose rounding would blur
    them; under ZeRO-3 into the base reloaded whole, since each process holds only a part of its own."""
    from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    if not recipe.quantized and not is_deepspeed_zero3_enabled():
        return model.merge_and_unload()
    from peft import PeftModel

    unset_hf_deepspeed_config()  # the reload is this process's alone, not partitioned across all of them
    base, _ = checkpoints.load(recipe.model, dtype=recipe.dtype)
    with _peft_reading_deprecated_attributes():
        with_adapters = PeftModel.from_pretrained(base, adapter_dir)
    return with_adapters.merge_and_unload()


def training_arguments(recipe: Recipe) -> TrainingArguments:
    options = {
        "logging_steps": 10,
        "save_strategy": "steps",
        "save_steps": 500,
        "report_to": "tensorboard" if importlib.util.find_spec("tensorboard") else "none",
        "dataloader_pin_memory": torch.cuda.is_available(),
        "use_cpu": not torch.cuda.is_available(),  # so torchrun on CPUs runs DDP over gloo
        **recipe.training,
        "output_dir": recipe.output_dir,
        "seed": recipe.seed,
        "remove_unused_columns": False,  # the collator's keys are the model's inputs
    }
    if options.get("gradient_checkpointing"):
        options.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"recipe: training has options TrainingArguments does not know: {unknown}")
    args = TrainingArguments(**options)
    if args.deepspeed and args.use_cpu and args.world_size > 1:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    return args


STAGE_PURPOSES = {
    "tower": "the vision tower taught where findings are, from their boxes",
    "pretrain": "the paper's stage 1: the projector aligned on image captions",
    "finetune": "the paper's stage 2: instruction tuning on visual conversations",
}


def write_training_card(out: Path, config, recipe: Recipe, summary: dict, total_parameters: int) -> None:
    """The model card of a trained stage: where it started, on what data, how far, and the whole recipe."""
    started = f"`{recipe.model}`" if isinstance(recipe.model, str) else "the components the recipe names"
    data = ", ".join(f"`{s.path}` (ratio {s.ratio:g})" for s in recipe.sources)
    adapters = f"; LoRA r={recipe.lora.get('r')} merged into the LM" if recipe.lora is not None else ""
    peak = summary["peak_memory_gib"]
    memory = f"; peak memory {peak:.2f} GiB" if peak is not None else ""
    training = (
        f"From {started} on {data}: {summary['samples']} samples, {summary['steps']} steps, mean training loss "
        f"{summary['train_loss']:.4f}; {summary['trainable_parameters']:,} of {total_parameters:,} parameters "
        f"trained{adapters}{memory}. The loss curve is in `train_summary.json`."
    )
    if recipe.system:
        training += f" Its conversations opened with the system message {recipe.system!r}: ask with `--system`."
    recipe_text = yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False)
    write_model_card(
        out,
        config,
        f"Trained by `llama3med train`, stage `{recipe.stage}`: {STAGE_PURPOSES[recipe.stage]}.",
        base_models=[recipe.model] if isinstance(recipe.model, str) else [],
        sections={"Training": training, "Recipe": f"```yaml\n{recipe_text}```"},
    )


def skipped_text(dataset: RecordDataset) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in sorted(dataset.skipped.items())) or "none"


def model_part(parameter_name: str) -> str | None:
    """Which of `MODEL_PARTS` a parameter belongs to (peft's and DDP's prefixes allowed)."""
    components = parameter_name.split(".")
    return next((part for part in MODEL_PARTS if part in components), None)


def count_parameters(model) -> tuple[int, int]:
    """Trainable and all parameters; under DeepSpeed ZeRO-3, whose processes each hold a part of every
    weight, the whole weights' sizes."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(n for n, trainable in sizes if trainable), sum(n for n, _ in sizes)


def float32_master_weights(module: torch.nn.Module) -> None:
    """Trainable parameters in float32, so that the optimizer updates full-precision master weights; the
    frozen ones keep their dtype (bf16 halves an 8B LM's memory under LoRA), and bf16 is for compute.
    Weights ZeRO-3 has partitioned are left to it: it keeps float32 master copies of its parts itself."""
    for parameter in module.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32 and not hasattr(parameter, "ds_id"):
            parameter.data = parameter.data.float()


def prepare_stage(recipe: Recipe, model, processor):
    """What the stage trains, on what, batched how: `(trained module, dataset, collator)`."""
    if recipe.stage == "tower":
        dataset = FindingMapDataset(recipe.sources, processor, model.config.image_grid, recipe.seed, recipe.strict)
        return FindingMapModel(model), dataset, collate_finding_maps
    dataset = ConversationDataset(
        recipe.sources, processor, recipe.max_length, recipe.seed, recipe.strict, recipe.system
    )
    return trained_parts(recipe, model), dataset, ConversationCollator(processor.tokenizer.pad_token_id)


def trained_parts(recipe: Recipe, model):
    """The model with what the pretrain or finetune stage trains set trainable: the stage's parts, or
    LoRA adapters in place of the LM's weights."""
    train_language_model = False if recipe.quantized else recipe.train_language_model  # adapters only
    model.set_trainable(recipe.stage, recipe.train_vision_tower, train_language_model)
    if recipe.lora is not None:
        model = apply_lora(model, recipe.lora, recipe.train_vision_tower)
    return model


def vqa_eval_callback(recipe: Recipe, args: TrainingArguments) -> VQAEvalCallback | None:
    """The recipe's `vqa_eval`, its questions read (a bad path fails before the model loads); refused
    where no process holds the whole model."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if recipe.vqa_eval is None:
        return None
    if args.fsdp or is_deepspeed_zero3_enabled():
        raise ValueError(
            "recipe: vqa_eval answers on the first process, which under FSDP or ZeRO-3 holds only a shard of the "
            "weights; drop it and evaluate the saved checkpoints with llama3med eval"
        )
    return VQAEvalCallback({"system": recipe.system, **recipe.vqa_eval}, recipe.output_dir)  # asked as it trains


def train(recipe: Recipe, resume: bool | str = False) -> Path:
    """Run one stage; returns the output directory holding the final model."""
    args = training_arguments(recipe)  # first: it sets up the process group under torchrun
    vqa_eval = vqa_eval_callback(recipe, args)
    model, processor = prepare_model(recipe, args)
    trained, dataset, collator = prepare_stage(recipe, model, processor)
    if not len(dataset):
        files = ", ".join(str(s.path) for s in recipe.sources)
        raise ValueError(f"no usable record in {files} (skipped: {skipped_text(dataset)})")
    float32_master_weights(trained)
    trainable, total = count_parameters(trained)
    if args.process_index == 0:
        print(
            f"{recipe.stage}: {len(dataset)} samples (skipped: {skipped_text(dataset)}); "
            f"training {trainable:,} of {total:,} parameters"
        )

    trainer = Llama3MedTrainer(
        model=trained,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        learning_rates=recipe.learning_rates,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)  # what the Trainer logs with disable_tqdm: ProgressLog does it
    trainer.add_callback(ProgressLog())
    if vqa_eval is not None:
        vqa_eval.trainer = trainer
        trainer.add_callback(vqa_eval)
    result = trainer.train(resume_from_checkpoint=resume or None)

    out = Path(recipe.output_dir)
    if recipe.stage == "tower":  # the whole Llama3-Med, holding the trained tower; the finding head is dropped
        if args.process_index == 0:
            checkpoints.save(model, processor, out)
    elif recipe.lora is not None:
        trainer.save_model(str(out / "adapter"))  # by every process: under ZeRO-3 it gathers the adapters
        if args.process_index == 0:
            checkpoints.save(merged_model(trainer.model, recipe, out / "adapter"), processor, out)
    else:
        trainer.save_model(str(out))
    if args.process_index == 0:
        if recipe.save_dtype:
            checkpoints.cast_saved(out, recipe.save_dtype)
        summary = {
            "stage": recipe.stage,
            "samples": len(dataset),
            "skipped": dict(dataset.skipped),
            "steps": result.global_step,
            "train_loss": result.training_loss,
            "losses": [(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log],
            "trainable_parameters": trainable,
            "peak_memory_gib": peak_memory_gib(args.device),  # this process's; the GPU's on a GPU
        }
        (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
        peak = summary["peak_memory_gib"]
        memory = f", peak memory {peak:.2f} GiB" if peak is not None else ""
        write_training_card(out, model.config, recipe, summary, total)
        print(
            f"saved {out}: {result.global_step} steps, mean loss {result.training_loss:.4f}, "
            f"skipped records: {skipped_text(dataset)}{memory}"
        )
    return out
