"""One GPU, one run, well under ten minutes: the device's ceilings, the S2 encoder and greedy decoding at
the real sizes (SigLIP-so400m at 384/768/1152 px, Llama-3-8B; random weights, bf16), a SLAKE-shaped
evaluation with the whole model (and the time and peak memory of one heat map, and the rate of ranked
multiple-choice answers), the peak memory of
inference, and one step of the single-GPU LoRA finetune recipe on the whole model (HF's loss, ours, and
QLoRA). Every fast path is checked against its reference (max abs diff of features, identical greedy
tokens or answers, the same loss and gradients) before it is timed. Prints its table last; `--json`
writes the figures. Installs nothing; the finetune step needs peft, and its QLoRA arm bitsandbytes
(skipped with a note where missing).

    python benchmarks/gpu_suite.py --json gpu_figures.json     # one GPU
    python benchmarks/gpu_suite.py --tiny                      # small shapes on any device: a smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial

import torch
import train_memory
from encoder_throughput import SIZES, rate, reference_encode
from eval_throughput import compare, phantom_questions, random_model
from transformers import AutoConfig, AutoModel, LlamaConfig, LlamaForCausalLM

from llama3med import Llama3MedConfig
from llama3med.config import LLAMA3_8B
from llama3med.eval.runner import rank_options
from llama3med.explain import answer_relevance
from llama3med.fp8 import quantize_language_model_fp8
from llama3med.generation import StaticCacheDecoder
from llama3med.model.multiscale import encode_multiscale
from llama3med.model.vision_tower import VisionTower
from llama3med.train.recipe import load_recipe

TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=8192,
)
TINY_SIGLIP = dict(
    image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4
)
TINY_MODEL = Llama3MedConfig(
    vision_config=dict(model_type="siglip_vision_model", **TINY_SIGLIP),
    text_config=dict(model_type="llama", **TINY_LLAMA),
    scales=[32, 64, 96],
    image_token_id=TINY_LLAMA["vocab_size"] - 1,
)


class Device:
    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self.torch = torch.device("cuda" if self.cuda else "cpu")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.name = torch.cuda.get_device_name() if self.cuda else "cpu"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def seconds(self, fn: Callable[[], object], repeats: int) -> float:
        """Mean seconds per call after a warm-up call (`encoder_throughput.rate`)."""
        return 1 / rate(fn, 1, repeats, self.sync)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None


def ceilings(dev: Device, tiny: bool) -> dict:
    """bf16 matmul TFLOP/s and device copy bandwidth, the references every other figure is read against."""
    n = 512 if tiny else 8192
    a, b = (torch.randn(n, n, device=dev.torch, dtype=dev.dtype) for _ in range(2))
    matmul = dev.seconds(lambda: a @ b, 3 if tiny else 20)
    block = torch.empty(2**22 if tiny else 2**30, dtype=torch.uint8, device=dev.torch)
    target = torch.empty_like(block)
    copy = dev.seconds(lambda: target.copy_(block), 3 if tiny else 20)
    return {"matmul_tflops": 2 * n**3 / matmul / 1e12, "copy_tb_per_s": 2 * block.numel() / copy / 1e12}


def tower_flops_per_image(config, scales: list[int], kept_layers: int) -> float:
    """Matmul FLOPs of one image's tiles up to the feature layer (patch embedding, attention, MLP)."""
    tokens, width, inner = (config.image_size // config.patch_size) ** 2, config.hidden_size, config.intermediate_size
    per_layer = 2 * tokens * (4 * width * width + 2 * width * inner) + 4 * tokens * tokens * width
    embed = 2 * tokens * 3 * config.patch_size**2 * width
    tiles = sum((scale // config.image_size) ** 2 for scale in scales)
    return tiles * (embed + kept_layers * per_layer)


def encoder(dev: Device, tiny: bool, ceiling_tflops: float) -> dict:
    config = AutoConfig.for_model("siglip_vision_model", **(TINY_SIGLIP if tiny else SIZES["so400m"]))
    base, grid, layer = config.image_size, config.image_size // config.patch_size, -2
    scales = [base, 2 * base, 3 * base]
    torch.manual_seed(0)
    full = AutoModel.from_config(config).to(dev.torch, dev.dtype).eval()
    tower = VisionTower(config, feature_layer=layer)
    tower.load_from_hf_tower(full)
    tower = tower.to(dev.torch, dev.dtype).eval()
    flops = tower_flops_per_image(config, scales, tower.num_layers)
    batch, repeats = (2, 2) if tiny else (8, 10)

    def s2(encode_tiles):
        return lambda x: encode_multiscale(encode_tiles, x, scales, base, grid)

    paths = {
        "reference (a call per scale, hidden states), batch 1": (
            lambda x: reference_encode(full, x, scales, base, grid, layer),
            1,
        ),
        "ours (truncated, one call), batch 1": (s2(tower), 1),
        f"ours, batch {batch}": (s2(tower), batch),
    }
    if dev.cuda:  # compiling on a CPU needs a compiler toolchain and minutes; the GPU is where it pays
        paths[f"ours + torch.compile, batch {batch}"] = (s2(torch.compile(tower, dynamic=False)), batch)
    rows, max_diff = {}, 0.0
    with torch.inference_mode():
        for name, (encode, n) in paths.items():
            pixels = torch.randn(n, 3, scales[-1], scales[-1], device=dev.torch, dtype=dev.dtype)
            reference = reference_encode(full, pixels, scales, base, grid, layer)
            max_diff = max(max_diff, (encode(pixels).float() - reference.float()).abs().max().item())
            images_per_s = rate(partial(encode, pixels), n, repeats, dev.sync)
            rows[name] = {"images_per_s": images_per_s, "ceiling_share": images_per_s * flops / 1e12 / ceiling_tflops}
    return {"tflop_per_image": flops / 1e12, "max_abs_diff": max_diff, "paths": rows}


def build_llama(dev: Device, tiny: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    with train_memory.built_on(dev.torch, dev.dtype):
        model = LlamaForCausalLM(LlamaConfig(**(TINY_LLAMA if tiny else LLAMA3_8B)))
    return model.eval()


def evaluation(dev: Device, tiny: bool, images: int) -> dict:
    """A SLAKE-shaped run (about 11 questions per image) of the whole model at the real sizes: `llama3med
    eval`'s path (batched, each image encoded once, its prompt prefix cached once), and on a GPU also
    `eval --compile`'s, against the loop that answers one question at a time with HF `generate` and
    re-encodes the image. The vocabulary is a small BPE trained on the questions, so the LM head is
    smaller than Llama-3's; everything else is at size."""
    vision = TINY_SIGLIP if tiny else SIZES["so400m"]
    with tempfile.TemporaryDirectory() as folder:
        records = phantom_questions(folder, images, 3 * vision["image_size"], slake_like=True)
        with train_memory.built_on(dev.torch, dev.dtype):
            model, processor = random_model(vision, TINY_LLAMA if tiny else LLAMA3_8B, records)
        result = compare(model, processor, records, batch_size=16, max_new_tokens=8, compiled=dev.cuda)
        for name, measure in (("heat_map", heat_map), ("ranked", ranked_options)):
            try:
                result[name] = measure(dev, model, processor, records)
            except Exception as err:  # noqa: BLE001 - reported in the table; the evaluation's figures stand
                result[name] = {"error": f"{type(err).__name__}: {err}"}
    del model
    dev.reset_peak()
    return result


def heat_map(dev: Device, model, processor, records) -> dict:
    """Seconds and peak memory of one `ask --heatmap` explanation (`answer_relevance`: the image encoded,
    then a forward and a backward through the LM to its features)."""
    record = records[0]
    dev.reset_peak()
    seconds = dev.seconds(lambda: answer_relevance(model, processor, record.image, record.question, record.answer), 3)
    return {"seconds": seconds, "peak_gib": dev.peak_gib()}


def ranked_options(dev: Device, model, processor, records) -> dict:
    """Questions per second and peak memory of `eval --rank-options` over the run's questions, each made
    a four-option one (its answer and three others): a forward pass per option from the image's prefix."""
    others = ("none of these", "cannot tell", "another finding", "normal")
    choices = [
        replace(r, options=tuple(dict.fromkeys([r.answer, *others]))[:4], answer="A", answer_type="CHOICE")
        for r in records
    ]
    dev.reset_peak()
    seconds = dev.seconds(lambda: list(rank_options(model, processor, choices, batch_size=16)), 1)
    return {"questions": len(choices), "questions_per_s": len(choices) / seconds, "peak_gib": dev.peak_gib()}


def decode_length(tiny: bool) -> int:
    return 8 if tiny else 64


def decode_prompt(dev: Device, model: LlamaForCausalLM, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same 32 random prompt tokens per row, and their mask, for every decoding arm at `batch`."""
    ids = torch.randint(10, model.config.vocab_size, (batch, 32), generator=torch.Generator().manual_seed(batch))
    return ids.to(dev.torch), torch.ones_like(ids, device=dev.torch)


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def decoding(dev: Device, tiny: bool, model: LlamaForCausalLM, copy_tb_per_s: float) -> dict:
    """Greedy new tokens/s at batch 1 and 16: HF `generate` (dynamic cache; the issue's table has its
    static-cache + compile figures, whose compiles would take minutes of this run) and our static-cache
    decoder, eager and with its step compiled into a CUDA graph on a GPU; the batch-1 floor reads every
    weight once per token. Compiling our step sets the LM's attention to `sdpa_grouped_decode`, which
    is what HF's SDPA computes eagerly, so `generate`'s path stays as it was."""
    new_tokens = decode_length(tiny)
    decoders = {"ours: static-cache decoder": StaticCacheDecoder(model, model.generation_config)}
    if dev.cuda:
        compiled = StaticCacheDecoder(model, model.generation_config)
        compiled.compile()
        decoders["ours: static-cache decoder, step compiled (CUDA graph)"] = compiled
    rows, identical = {}, {}
    for batch in (1, 16):
        ids, mask = decode_prompt(dev, model, batch)
        settings = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
        with torch.inference_mode():
            embeds = model.get_input_embeddings()(ids)
        runs = {"HF generate, dynamic cache": partial(model.generate, ids, attention_mask=mask, **settings)}
        for name, decoder in decoders.items():
            runs[name] = partial(decoder, embeds, mask, new_tokens, min_new_tokens=new_tokens)
        outputs = {}
        for name, run in runs.items():
            with torch.inference_mode():
                outputs[name] = run()[:, -new_tokens:]
                seconds = dev.seconds(run, 1 if tiny else 3)
            rows[f"{name}, batch {batch}"] = {"new_tokens_per_s": batch * new_tokens / seconds}
        reference = outputs["HF generate, dynamic cache"]
        for name, output in outputs.items():
            identical[f"{name}, batch {batch}"] = bool(torch.equal(output, reference))
    floor = copy_tb_per_s * 1e12 / weight_bytes(model)
    return {"paths": rows, "identical_tokens": identical, "batch1_floor_tokens_per_s": floor}


def quantized_decoding(
    dev: Device, tiny: bool, copy_tb_per_s: float, bf16_rates: dict[int, float], quantize: Callable
) -> dict:
    """The LM's linear layers quantized in place by `quantize` (`--fp8`'s `quantize_language_model_fp8`,
    `--load-4bit`'s NF4),
    decoded by our static-cache decoder, its step compiled into a CUDA graph on a GPU (eager where the
    compile fails, with the error kept), at batch 1 and 16. Against the same LM in bf16 (the weights
    `decoding` had): the weights' memory, the batch-1 floor, how far a probe's logits move, and how many
    greedy tokens match the bf16 decoder's before the first that differs. Random weights give nearly
    flat logits, where greedy tokens flip at the least change, so the match is a lower bound; on real
    weights compare benchmark scores (`llama3med eval --fp8` or `--load-4bit`)."""
    model, new_tokens = build_llama(dev, tiny), decode_length(tiny)
    bf16_bytes, prompts, reference = weight_bytes(model), {}, {}
    with torch.inference_mode():
        for batch in (1, 16):
            ids, mask = prompts[batch] = decode_prompt(dev, model, batch)
            embeds = model.get_input_embeddings()(ids)
            reference[batch] = StaticCacheDecoder(model, model.generation_config)(embeds, mask, new_tokens, new_tokens)
    layers, moved = logits_moved(model, quantize)
    if dev.cuda:
        torch.cuda.empty_cache()  # the bf16 weights just dropped
    quantized_bytes = weight_bytes(model)
    figures = {
        "layers": layers,
        "weights_gib": {"bf16": bf16_bytes / 2**30, "quantized": quantized_bytes / 2**30},
        "logits_relative_diff": moved,
        "compiled": dev.cuda,
    }
    decoder = StaticCacheDecoder(model, model.generation_config)
    if dev.cuda:
        decoder.compile()
    with torch.inference_mode():
        for batch, (ids, mask) in prompts.items():
            embeds = model.get_input_embeddings()(ids)
            run = partial(decoder, embeds, mask, new_tokens, min_new_tokens=new_tokens)
            try:
                tokens = run()
            except Exception as err:  # noqa: BLE001 - a step that does not compile is timed eagerly instead
                if not figures["compiled"]:
                    raise
                figures["compiled"], figures["compile_error"] = False, f"{type(err).__name__}: {err}"[:300]
                decoder = StaticCacheDecoder(model, model.generation_config)
                run = partial(decoder, embeds, mask, new_tokens, min_new_tokens=new_tokens)
                tokens = run()
            same = (tokens == reference[batch]).long().cumprod(dim=1).sum(dim=1).float()  # matching prefix per row
            rate_quantized = batch * new_tokens / dev.seconds(run, 1 if tiny else 3)
            figures[f"batch {batch}"] = {
                "new_tokens_per_s": rate_quantized,
                "x_bf16": rate_quantized / bf16_rates.get(batch, float("nan")),
                "tokens_before_first_difference": same.mean().item(),
                "identical_rows": int((same == new_tokens).sum()),
            }
    figures["batch1_floor_tokens_per_s"] = copy_tb_per_s * 1e12 / quantized_bytes
    figures["new_tokens"] = new_tokens
    return figures


def logits_moved(model: LlamaForCausalLM, quantize: Callable[[LlamaForCausalLM], int]) -> tuple[int, float]:
    """`quantize(model)` in place: the layers it converted, and how far a probe's logits moved (relative norm)."""
    probe = torch.randint(10, model.config.vocab_size, (1, 32), device=model.device)
    with torch.inference_mode():
        reference = model(probe).logits.float()
    layers = quantize(model)
    with torch.inference_mode():
        return layers, ((model(probe).logits.float() - reference).norm() / reference.norm()).item()


def inference_memory(dev: Device, tiny: bool, model: LlamaForCausalLM) -> dict:
    """Peak memory of batch-16 greedy decoding."""
    dev.reset_peak()
    prompt = torch.randint(10, model.config.vocab_size, (16, 32), device=dev.torch)
    with torch.inference_mode():
        model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8 if tiny else 64, do_sample=False
        )
    return {"inference_batch16_peak_gib": dev.peak_gib()}


def finetune(dev: Device, tiny: bool) -> dict:
    """One step of `recipes/llama3med-8b/finetune_lora.yaml` at its batch and length, on the whole model
    (SigLIP-so400m at 384/768/1152 px, Llama-3-8B; random weights): with HF's causal-LM loss over every
    position's logits, with Llama3-Med's loss, and as QLoRA (the LM's linear layers in NF4) with ours.
    Each arm gets a fresh model, so that no arm's optimizer state counts in another's peak; the peak
    includes the weights, which is what must fit one 80 GB GPU."""
    recipe, qlora = load_recipe(train_memory.RECIPE), load_recipe(train_memory.RECIPE, ["lora.bits=4"])
    config = TINY_MODEL if tiny else train_memory.SIZES["8b"]
    batch, length = recipe.training["per_device_train_batch_size"], 128 if tiny else recipe.max_length
    inputs = train_memory.finetune_batch(config, batch, length, dev.torch)
    autocast = train_memory.recipe_autocast(recipe, dev.torch)
    arms = {"HF causal-LM loss (every position's logits)": (True, False), "Llama3-Med's loss": (False, False)}
    has_bitsandbytes = importlib.util.find_spec("bitsandbytes") is not None
    if has_bitsandbytes:
        arms["Llama3-Med's loss, QLoRA (NF4 LM)"] = (False, True)
    rows = {}
    for name, (reference, quantized) in arms.items():
        model = train_memory.random_model(config, train_memory.recipe_dtype(recipe, dev.torch), dev.torch)
        extra = {}
        if quantized:
            extra["nf4_logits_relative_diff"] = logits_moved(model.language_model, quantize_nf4)[1]
        model = train_memory.prepare_finetune(model, qlora if quantized else recipe)
        step = train_memory.finetune_step(model, inputs, reference, autocast)
        rows[name] = {
            "loss": step["loss"],
            "seconds": step["seconds"],
            "peak_gib": dev.peak_gib(),
            "grads": step["grads"],
            **extra,
        }
        del model, step
        dev.reset_peak()
    ours, reference = rows["Llama3-Med's loss"], rows["HF causal-LM loss (every position's logits)"]
    figures = {
        "recipe": train_memory.RECIPE.name,
        "batch": batch,
        "sequence_length": length,
        "lora": recipe.lora,
        **train_memory.agreement(ours, reference),
        "qlora": "ran" if has_bitsandbytes else "skipped: bitsandbytes is not installed",
    }
    for row in rows.values():
        row.pop("grads")
    return {**figures, "arms": rows}


def quantize_nf4(model: LlamaForCausalLM) -> int:
    """QLoRA's storage and `--load-4bit`'s, in place: the decoder's linear layers become bitsandbytes NF4
    ones (double quantization, computing in the model's dtype) holding the same weights; embeddings and
    the LM head stay as they are. Returns how many layers were converted."""
    import bitsandbytes as bnb

    converted = 0
    for layer in model.model.layers:
        for block in (layer.self_attn, layer.mlp):
            for name, linear in list(block.named_children()):
                if isinstance(linear, torch.nn.Linear):
                    quantized = bnb.nn.Linear4bit(
                        linear.in_features, linear.out_features, bias=False, compute_dtype=linear.weight.dtype
                    )
                    quantized.weight = bnb.nn.Params4bit(
                        linear.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True
                    )
                    setattr(block, name, quantized.to(linear.weight.device))
                    converted += 1
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the bf16 weights just dropped
    return converted


def bf16_decoder_rates(section: dict, dev: Device) -> dict[int, float]:
    """New tokens/s of the bf16 static-cache decoder as `quantized_decoding` runs its own (compiled on a GPU)."""
    name = "ours: static-cache decoder" + (", step compiled (CUDA graph)" if dev.cuda else "")
    rows = {batch: section.get("paths", {}).get(f"{name}, batch {batch}") for batch in (1, 16)}
    return {batch: row["new_tokens_per_s"] for batch, row in rows.items() if row is not None}


def table_lines(name: str, section: dict) -> list[str]:
    """One section of the table; a section that failed shows its error."""
    if "error" in section:
        return [f"{name}: failed: {section['error']}"]
    if name == "ceilings":
        return [
            f"matmul ceiling {section['matmul_tflops']:.1f} TFLOP/s, copy bandwidth {section['copy_tb_per_s']:.2f} TB/s"
        ]
    if name == "encoder":
        lines = [
            f"S2 encoder ({section['tflop_per_image']:.2f} TFLOP/image, max abs diff {section['max_abs_diff']:.2e})"
        ]
        reference = next(iter(section["paths"].values()))["images_per_s"]
        for path, row in section["paths"].items():
            share, ratio = 100 * row["ceiling_share"], row["images_per_s"] / reference
            lines.append(f"  {path:<55} {row['images_per_s']:9.2f} img/s {share:5.1f} % {ratio:5.2f}x")
        return lines
    if name == "decoding":
        floor = section["batch1_floor_tokens_per_s"]
        lines = [f"greedy decoding (new tokens/s, x HF generate, identical tokens?); batch-1 floor {floor:.0f}"]
        for path, row in section["paths"].items():
            reference = section["paths"][f"HF generate, dynamic cache, batch {path.rsplit(' ', 1)[1]}"]
            ratio = row["new_tokens_per_s"] / reference["new_tokens_per_s"]
            lines.append(
                f"  {path:<66} {row['new_tokens_per_s']:9.1f} {ratio:5.2f}x  {section['identical_tokens'][path]}"
            )
        return lines
    if name == "memory":
        peak = section["inference_batch16_peak_gib"]
        return [f"peak memory, decoding batch 16: {'n/a (CPU)' if peak is None else f'{peak:.1f} GiB'}"]
    if name == "finetune":
        lines = [
            f"finetune step ({section['recipe']}: LoRA r {section['lora']['r']}, batch {section['batch']} x "
            f"{section['sequence_length']} tokens, gradient checkpointing); loss relative diff "
            f"{section['loss_relative_diff']:.1e}, gradient norms {section['grad_norms_relative_diff']:.1e}; "
            f"QLoRA {section['qlora']}"
        ]
        for arm, row in section["arms"].items():
            peak = "n/a (CPU)" if row["peak_gib"] is None else f"{row['peak_gib']:.1f} GiB"
            lines.append(f"  {arm:<46} peak {peak:>10}  {row['seconds']:6.2f} s  loss {row['loss']:.3f}")
        return lines
    if name in ("fp8", "nf4"):
        weights = section["weights_gib"]
        lines = [
            f"{name} LM ({section['layers']} linear layers): weights "
            f"{weights['bf16']:.2f} -> {weights['quantized']:.2f} GiB, "
            f"batch-1 floor {section['batch1_floor_tokens_per_s']:.0f} tokens/s, probe logits relative diff "
            f"{section['logits_relative_diff']:.1e}; {'compiled' if section['compiled'] else 'eager'} decoder"
            + (f" (compile failed: {section['compile_error']})" if "compile_error" in section else "")
        ]
        for batch in (1, 16):
            row = section[f"batch {batch}"]
            lines.append(
                f"  batch {batch:<3} {row['new_tokens_per_s']:9.1f} new tokens/s {row['x_bf16']:5.2f}x bf16; "
                f"tokens before the first difference {row['tokens_before_first_difference']:.1f} of "
                f"{section['new_tokens']}, identical rows {row['identical_rows']}/{batch}"
            )
        return lines
    lines = [
        f"SLAKE-shaped evaluation, {section['questions']} questions: one at a time "
        f"{section['reference_questions_per_s']:.2f} q/s, llama3med eval {section['ours_questions_per_s']:.2f} q/s, "
        f"{section['speedup']:.2f}x, identical answers {section['identical_answers']}/{section['questions']}"
    ]
    extras = (  # measured beside the evaluation: what each is, how its figure reads
        ("heat_map", "heat map (ask --heatmap)", lambda row: f"{row['seconds']:.2f} s"),
        ("ranked", "eval --rank-options, 4 options each", lambda row: f"{row['questions_per_s']:.2f} q/s"),
    )
    for key, label, figure in extras:
        row = section.get(key, {})
        if "error" in row:
            lines.append(f"  {label}: failed: {row['error']}")
        elif row:
            peak = "n/a (CPU)" if row["peak_gib"] is None else f"{row['peak_gib']:.1f} GiB"
            lines.append(f"  {label}: {figure(row)}, peak {peak}")
    if "compiled_questions_per_s" in section:
        lines.append(
            f"  eval --compile: {section['compiled_questions_per_s']:.2f} q/s, {section['compiled_speedup']:.2f}x, "
            f"identical answers {section['compiled_identical_answers']}/{section['questions']} "
            f"(first pass, compiling: {section['compiling_pass_s']:.0f} s)"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes: checks the script on any device")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    dev = Device()
    figures = {"device": dev.name, "torch": torch.__version__, "tiny": args.tiny}

    def measure(name: str, fn: Callable[[], dict]) -> None:
        """One section; a failure is recorded and the run goes on, so one error costs no other figure.
        Its lines are printed and the JSON written as soon as it ends, so a run cut off at its time
        limit keeps every section it finished."""
        start = time.perf_counter()
        try:
            figures[name] = fn()
        except Exception as err:  # noqa: BLE001 - reported in the table and the JSON
            figures[name] = {"error": f"{type(err).__name__}: {err}"}
        figures[name]["section_seconds"] = time.perf_counter() - start
        print(f"[{name}: {figures[name]['section_seconds']:.0f} s]", *table_lines(name, figures[name]), sep="\n")
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(figures, handle, indent=1)

    measure("ceilings", lambda: ceilings(dev, args.tiny))
    ceiling = figures["ceilings"].get("matmul_tflops", float("nan"))
    measure("encoder", lambda: encoder(dev, args.tiny, ceiling))
    model = build_llama(dev, args.tiny)
    bandwidth = figures["ceilings"].get("copy_tb_per_s", float("nan"))
    measure("decoding", partial(decoding, dev, args.tiny, model, bandwidth))
    measure("memory", partial(inference_memory, dev, args.tiny, model))
    del model
    measure("finetune", lambda: finetune(dev, args.tiny))
    measure("evaluation", lambda: evaluation(dev, args.tiny, images=3 if args.tiny else 10))  # compiles most
    bf16_rates = bf16_decoder_rates(figures["decoding"], dev)
    measure("fp8", partial(quantized_decoding, dev, args.tiny, bandwidth, bf16_rates, quantize_language_model_fp8))
    if importlib.util.find_spec("bitsandbytes") is not None:
        measure("nf4", partial(quantized_decoding, dev, args.tiny, bandwidth, bf16_rates, quantize_nf4))
    else:
        figures["nf4"] = {"error": "skipped: bitsandbytes is not installed"}
    sections = ("ceilings", "encoder", "decoding", "evaluation", "memory", "finetune", "fp8", "nf4")
    print(
        "\n".join(
            [f"device: {dev.name}", *(line for name in sections for line in ["", *table_lines(name, figures[name])])]
        )
    )


if __name__ == "__main__":
    main()
