"""`llama3med train`: both stages on a tiny model over phantom data, exact resume, two processes under
torchrun (DDP, FSDP, DeepSpeed ZeRO-3) equal to one, bad records skipped or fatal with --strict,
and recipes that load."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from conftest import TINY_SIGLIP, tiny_llama
from llama3med import Llama3MedForConditionalGeneration
from llama3med.checkpoints import load
from llama3med.cli import main
from llama3med.data.phantoms import write_phantom_set
from llama3med.inference import answer
from llama3med.processing import load_image
from llama3med.train import load_recipe
from llama3med.train.trainer import EpochSeededLengthSampler, apply_lora, prepare_model, training_arguments

ROOT = Path(__file__).resolve().parents[1]
# peft reading a transformers attribute deprecated in 5.25: a warning a LoRA user cannot act on
WARNS_NOTHING_THE_USER_CANNOT_ACT_ON = pytest.mark.filterwarnings("error:`is_gradient_checkpointing`:FutureWarning")
SCRATCH = {
    "vision": dict(TINY_SIGLIP, num_hidden_layers=2),
    "text": {k: v for k, v in tiny_llama(0).items() if k != "vocab_size"},
    "scales": [32, 64, 96],
    "vocab_size": 300,
}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    write_phantom_set(out, n=24, seed=1, size=96, image_format="png")
    return out


def write_recipe(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields))
    return path


def pretrain_recipe(tmp_path: Path, phantoms: Path, **training) -> Path:
    return write_recipe(
        tmp_path / "pretrain.yaml",
        stage="pretrain",
        model={"scratch": SCRATCH},
        data=[{"path": str(phantoms / "captions.json"), "image_root": str(phantoms / "images")}],
        output_dir=str(tmp_path / "pretrain"),
        max_length=512,
        train_language_model=True,  # a scratch LM has nothing to keep frozen
        training={
            "per_device_train_batch_size": 4,
            "max_steps": 12,
            "learning_rate": 3e-3,
            "lr_scheduler_type": "cosine",
            "warmup_steps": 0.03,
            "logging_steps": 1,
            "save_steps": 4,
            "disable_tqdm": True,
            **training,
        },
    )


def finetune_recipe(tmp_path: Path, phantoms: Path, name: str, **fields) -> Path:
    """A finetune stage (from the pretrain output unless `model` says otherwise) on the phantom
    conversations, into `tmp_path/name`."""
    return write_recipe(
        tmp_path / f"{name}.yaml",
        stage="finetune",
        data=[{"path": str(phantoms / "conversations.json"), "image_root": str(phantoms / "images")}],
        output_dir=str(tmp_path / name),
        max_length=512,
        **{"model": str(tmp_path / "pretrain"), **fields},
    )


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def summary(directory: Path) -> dict:
    return json.loads((directory / "train_summary.json").read_text())


def test_pretrain_then_finetune_lowers_the_loss_and_the_output_answers(tmp_path, phantoms):
    assert main(["train", str(pretrain_recipe(tmp_path, phantoms, max_steps=24))]) == 0
    finetune = finetune_recipe(
        tmp_path,
        phantoms,
        "finetune",
        training={"per_device_train_batch_size": 4, "max_steps": 24, "learning_rate": 3e-3, "disable_tqdm": True},
    )
    assert main(["train", str(finetune), "--set", "training.logging_steps=1"]) == 0

    for stage in ("pretrain", "finetune"):
        losses = [loss for _, loss in summary(tmp_path / stage)["losses"]]
        assert len(losses) == 24
        assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, (stage, losses)
        assert 0 < summary(tmp_path / stage)["peak_memory_gib"] < 64  # this process's peak, in GiB
    model, processor = load(tmp_path / "finetune")
    image = load_image(phantoms / "images" / "phantom-1-000000.png")
    assert answer(model, processor, image, "Is this a CT scan?", max_new_tokens=4).strip()

    # each stage's model card says where it started and holds the recipe it ran, overrides included
    card = (tmp_path / "finetune" / "README.md").read_text()
    front, body = card.removeprefix("---\n").split("---\n", 1)
    assert yaml.safe_load(front)["pipeline_tag"] == "image-text-to-text"
    assert "stage `finetune`: the paper's stage 2" in body and f"From `{tmp_path / 'pretrain'}`" in body
    assert "24 steps" in body and "must not be used for diagnosis" in body
    ran = yaml.safe_load(body.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert ran["stage"] == "finetune" and ran["training"]["logging_steps"] == 1


def test_vqa_eval_scores_the_model_as_eval_would_every_n_steps_without_changing_what_it_learns(
    tmp_path, phantoms, capsys
):
    assert main(["train", str(pretrain_recipe(tmp_path, phantoms, max_steps=2))]) == 0
    training = {
        "per_device_train_batch_size": 4,
        "max_steps": 8,
        "save_steps": 8,
        "logging_steps": 1,
        "disable_tqdm": True,
    }
    vqa_eval = {"data": str(phantoms / "test.json"), "limit": 12, "every": 4, "max_new_tokens": 4}
    plain = finetune_recipe(tmp_path, phantoms, "plain", training=training)
    scored = finetune_recipe(tmp_path, phantoms, "scored", training=training, vqa_eval=vqa_eval)
    assert main(["train", str(plain)]) == 0 and main(["train", str(scored)]) == 0
    assert max_difference(weights(tmp_path / "plain"), weights(tmp_path / "scored")) == 0.0

    rows = [json.loads(line) for line in (tmp_path / "scored" / "vqa_eval.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [4, 8]
    assert all(row["scores"]["n_closed"] + row["scores"]["n_open"] == 12 for row in rows)
    out = tmp_path / "eval"
    args = ["eval", "--model", str(tmp_path / "scored"), "--data", str(phantoms / "test.json"), "--out", str(out)]
    assert main([*args, "--limit", "12", "--max-new-tokens", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert rows[-1]["scores"] == report["scores"]["all"]
    ranked = report["closed_auroc"]
    assert (rows[-1]["vqa_closed_brier"], rows[-1]["vqa_closed_ece"]) == (ranked["brier"], ranked["ece"])
    logged = json.loads((tmp_path / "scored" / "checkpoint-8" / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in logged if "vqa_closed_accuracy" in entry] == [4, 8]
    assert all(0 <= entry["vqa_closed_auroc"] <= 1 for entry in logged if "vqa_closed_accuracy" in entry)
    assert [entry["step"] for entry in logged if "loss" in entry] == list(range(1, 9))  # no step's loss lost
    assert "vqa_closed_accuracy" in capsys.readouterr().out  # in the progress lines too

    with pytest.raises(ValueError, match="vqa_eval.every must be a whole number"):
        load_recipe(scored, ["vqa_eval.every=0"])
    with pytest.raises(ValueError, match="stage tower does not answer questions"):
        load_recipe(tower_recipe(tmp_path, phantoms), [f"vqa_eval={json.dumps(vqa_eval)}"])


def test_a_recipes_system_message_opens_its_conversations_and_vqa_eval_asks_with_it(tmp_path, phantoms):
    from llama3med.checkpoints import DEMO_MODEL_DIR
    from llama3med.train.recipe import load_recipe
    from llama3med.train.trainer import training_arguments, vqa_eval_callback

    system = "You are a radiologist."
    training = {"per_device_train_batch_size": 2, "max_steps": 1, "save_steps": 1, "disable_tqdm": True}
    vqa_eval = {"data": str(phantoms / "test.json"), "limit": 2, "every": 1, "max_new_tokens": 2}
    fields = dict(model=str(DEMO_MODEL_DIR), training=training, vqa_eval=vqa_eval, system=system)
    recipe_path = finetune_recipe(tmp_path, phantoms, "with-system", **fields)
    recipe = load_recipe(recipe_path)
    assert vqa_eval_callback(recipe, training_arguments(recipe)).system == system
    assert main(["train", str(recipe_path)]) == 0
    card = (tmp_path / "with-system" / "README.md").read_text()
    assert f"opened with the system message {system!r}: ask with `--system`" in card
    with pytest.raises(ValueError, match="recipe: system must be a text, got 3"):
        load_recipe(recipe_path, ["system=3"])


def test_a_converted_llava_med_given_the_pyramid_fine_tunes_with_lora(tmp_path, phantoms):
    """The paper's ablation on its baseline: a LLaVA-Med-shaped checkpoint (Mistral LM, CLIP tower,
    LLaVA's prompts and tokenization) converted, given 1x/2x/3x scales by `build --from`, then a LoRA
    finetune stage on the phantom conversations: the loss falls and the result answers."""
    from test_checkpoints import write_original_llava

    llava_dir, _ = write_original_llava(tmp_path, "mistral")
    assert main(["convert", "--llava", str(llava_dir), "--out", str(tmp_path / "llava-med")]) == 0
    assert main(["build", "--from", str(tmp_path / "llava-med"), "--out", str(tmp_path / "s2")]) == 0
    recipe = finetune_recipe(
        tmp_path,
        phantoms,
        "finetune",
        model=str(tmp_path / "s2"),
        lora={"r": 8, "alpha": 16},
        training={"per_device_train_batch_size": 4, "max_steps": 12, "learning_rate": 3e-3, "disable_tqdm": True},
        vqa_eval={"data": str(phantoms / "test.json"), "limit": 6, "every": 12, "max_new_tokens": 4},
    )
    assert main(["train", str(recipe), "--set", "training.logging_steps=1"]) == 0
    losses = [loss for _, loss in summary(tmp_path / "finetune")["losses"]]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    scored = json.loads((tmp_path / "finetune" / "vqa_eval.jsonl").read_text().splitlines()[-1])  # adapters on
    args = ["eval", "--model", str(tmp_path / "finetune"), "--data", str(phantoms / "test.json"), "--limit", "6"]
    assert main([*args, "--max-new-tokens", "4", "--out", str(tmp_path / "eval")]) == 0  # merged into the LM
    assert scored["scores"] == json.loads((tmp_path / "eval" / "report.json").read_text())["scores"]["all"]
    model, processor = load(tmp_path / "finetune")
    assert model.config.scales == [32, 64, 96] and processor.llava_tokenization
    image = load_image(phantoms / "images" / "phantom-1-000000.png")
    assert isinstance(answer(model, processor, image, "Is this a CT scan?", max_new_tokens=4), str)


def write_marked_images(folder: Path, n: int, seed: int) -> list[dict]:
    """Noisy grey PNGs, every other one with a bright square somewhere, and the question whether it has one."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    records = []
    for i in range(n):
        pixels = rng.normal(60, 8, (96, 96))
        marked = i % 2 == 0
        if marked:
            x, y = rng.integers(0, 96 - 20, 2)
            pixels[y : y + 20, x : x + 20] = 220
        name = f"{seed}-{i}.png"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / "images" / name)
        turns = [
            {"from": "human", "value": "<image>\nIs there a bright square?"},
            {"from": "gpt", "value": "yes" if marked else "no"},
        ]
        records.append({"id": name, "image": name, "conversations": turns})
    (folder / "data.json").write_text(json.dumps(records))
    return records


def test_a_trained_model_answers_from_the_image(tmp_path):
    """The question is the same for every image, so only the image can tell the answer: training must
    carry the pixels through tower, pyramid and projector into the LM, and generation must read them."""
    write_marked_images(tmp_path / "train", 64, seed=0)
    held_out = write_marked_images(tmp_path / "test", 16, seed=1)
    recipe = write_recipe(
        tmp_path / "squares.yaml",
        stage="finetune",
        model={"scratch": SCRATCH},
        data=[{"path": str(tmp_path / "train" / "data.json"), "image_root": str(tmp_path / "train" / "images")}],
        output_dir=str(tmp_path / "out"),
        max_length=512,
        train_vision_tower=True,
        training={"per_device_train_batch_size": 8, "max_steps": 300, "learning_rate": 3e-3, "disable_tqdm": True},
    )
    assert main(["train", str(recipe), "--set", "training.save_steps=1000"]) == 0

    model, processor = load(tmp_path / "out")
    answers = [
        answer(
            model, processor, tmp_path / "test" / "images" / r["image"], "Is there a bright square?", max_new_tokens=3
        )
        for r in held_out
    ]
    pairs = list(zip(answers, [r["conversations"][1]["value"] for r in held_out], strict=True))
    assert sum(a == truth for a, truth in pairs) >= 15, pairs


def tower_recipe(tmp_path: Path, phantoms: Path, **training) -> Path:
    return write_recipe(
        tmp_path / "tower.yaml",
        stage="tower",
        model={"scratch": SCRATCH},
        data=[{"path": str(phantoms / "captions.json"), "image_root": str(phantoms / "images")}],
        output_dir=str(tmp_path / "tower"),
        max_length=512,
        training={"per_device_train_batch_size": 8, "max_steps": 16, "learning_rate": 3e-3, "logging_steps": 1,
                  "save_steps": 8, "disable_tqdm": True, **training},
    )  # fmt: skip


def test_the_tower_stage_trains_the_tower_alone_on_finding_maps_and_pretrain_starts_from_it(tmp_path, phantoms):
    recipe = tower_recipe(tmp_path, phantoms)
    assert main(["train", str(recipe)]) == 0
    losses = [loss for _, loss in summary(tmp_path / "tower")["losses"]]
    assert len(losses) == 16 and sum(losses[-4:]) < 0.8 * sum(losses[:4]), losses

    scratch, _ = prepare_model(load_recipe(recipe), training_arguments(load_recipe(recipe)))  # same seed, untrained
    start, tower = scratch.state_dict(), weights(tmp_path / "tower")
    changed = {name.split(".")[0] for name in tower if not torch.equal(tower[name], start[name])}
    assert changed == {"vision_tower"}  # the finding head is not part of the saved model
    assert tower.keys() == start.keys()

    pretrain = pretrain_recipe(tmp_path, phantoms, max_steps=2)
    assert main(["train", str(pretrain), "--set", f"model={tmp_path / 'tower'}"]) == 0
    after = weights(tmp_path / "pretrain")
    assert all(torch.equal(after[name], tower[name]) for name in tower if name.startswith("vision_tower."))


def test_the_tower_stage_resumes_and_reruns_exactly_and_refuses_options_of_the_other_stages(tmp_path, phantoms):
    recipe = tower_recipe(tmp_path, phantoms, max_steps=12, save_steps=6)
    assert main(["train", str(recipe)]) == 0
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(tmp_path / "tower" / "checkpoint-6", interrupted / "checkpoint-6")
    assert main(["train", str(recipe), "--set", f"output_dir={interrupted}", "--resume"]) == 0
    assert max_difference(weights(tmp_path / "tower"), weights(interrupted)) == 0.0

    # From a model directory too, the finding head starts from the recipe's seed: two runs agree.
    for name in ("again", "once_more"):
        overrides = [f"model={tmp_path / 'tower'}", f"output_dir={tmp_path / name}", "training.max_steps=2"]
        assert main(["train", str(recipe), *[a for o in overrides for a in ("--set", o)]]) == 0
    assert max_difference(weights(tmp_path / "again"), weights(tmp_path / "once_more")) == 0.0
    for option in ("lora={r: 8}", "train_language_model=true"):
        with pytest.raises(ValueError, match="stage tower trains the vision tower alone"):
            load_recipe(recipe, [option])


def test_each_stage_trains_only_its_parameters(tiny_config):
    ids = torch.tensor([[1] + [tiny_config.image_token_id] * tiny_config.num_image_tokens + [100, 101, 102]])
    pixels = torch.randn(1, 3, 96, 96)

    def trained(model) -> set[str]:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, pixel_values=pixels, labels=ids).loss.backward()
        return {name for name, p in model.named_parameters() if p.grad is not None}

    def parts(names: set[str]) -> set[str]:
        return {name.split(".")[0] for name in names}

    torch.manual_seed(0)
    model = Llama3MedForConditionalGeneration(tiny_config)
    model.set_trainable("pretrain")
    assert parts(trained(model)) == {"multi_modal_projector"}
    model.set_trainable("finetune")
    assert parts(trained(model)) == {"multi_modal_projector", "language_model"}
    model.set_trainable("finetune", train_vision_tower=True)
    assert parts(trained(model)) == {"multi_modal_projector", "language_model", "vision_tower"}

    model.set_trainable("finetune")
    with_grad = trained(apply_lora(model, {"r": 4}, train_vision_tower=False))
    assert all("lora_" in name or "multi_modal_projector" in name for name in with_grad)
    assert any("language_model" in name and "lora_A" in name for name in with_grad)
    assert any("multi_modal_projector" in name for name in with_grad)


def test_a_part_given_its_own_learning_rate_trains_at_that_rate(tmp_path, phantoms, capsys):
    assert main(["train", str(pretrain_recipe(tmp_path, phantoms, max_steps=2))]) == 0
    start = weights(tmp_path / "pretrain")
    recipe = finetune_recipe(
        tmp_path,
        phantoms,
        "finetune",
        train_vision_tower=True,
        learning_rates={"vision_tower": 1e-12, "multi_modal_projector": 1e-2},
        training={"per_device_train_batch_size": 4, "max_steps": 3, "learning_rate": 1e-3, "disable_tqdm": True},
    )
    assert main(["train", str(recipe)]) == 0
    end = weights(tmp_path / "finetune")

    def moved(part: str) -> float:
        return max_difference(
            {k: v for k, v in start.items() if k.startswith(part)}, {k: v for k, v in end.items() if k.startswith(part)}
        )

    assert moved("vision_tower") < 1e-9  # Adam's steps are about lr in size
    assert moved("multi_modal_projector") > 5 * moved("language_model") > 0

    frozen_tower = finetune_recipe(tmp_path, phantoms, "frozen", learning_rates={"vision_tower": 1e-5})
    assert main(["train", str(frozen_tower), "--set", "training.max_steps=1"]) != 0
    assert "learning_rates names ['vision_tower'], which have no trainable parameter" in capsys.readouterr().err


def test_resume_after_an_interruption_gives_the_same_weights(tmp_path, phantoms):
    # 24 samples in batches of 4: 6 steps per epoch, so the resumed part crosses an epoch boundary,
    # and length grouping exercises the project's own sampler.
    recipe = pretrain_recipe(tmp_path, phantoms, max_steps=10, train_sampling_strategy="group_by_length")
    assert main(["train", str(recipe)]) == 0
    full = tmp_path / "pretrain"
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(full / "checkpoint-4", interrupted / "checkpoint-4")  # what a run killed at step 5 leaves
    assert main(["train", str(recipe), "--set", f"output_dir={interrupted}", "--resume"]) == 0
    assert summary(interrupted)["steps"] == 10
    assert max_difference(weights(full), weights(interrupted)) == 0.0


ENGINES = {
    "ddp": [],
    "fsdp": ["training.fsdp=full_shard auto_wrap", f"training.fsdp_config={ROOT / 'recipes/engines/fsdp.json'}"],
}


@pytest.mark.parametrize("engine", ENGINES)
def test_two_processes_under_torchrun_train_like_one_with_the_same_global_batch(tmp_path, phantoms, engine):
    recipe = pretrain_recipe(tmp_path, phantoms, max_steps=6)
    assert main(["train", str(recipe)]) == 0
    overrides = [f"output_dir={tmp_path / engine}", "training.per_device_train_batch_size=2", *ENGINES[engine]]
    if engine == "ddp":  # the first process answers while the other waits; the weights are untouched
        overrides.append(f"vqa_eval={{data: {phantoms / 'test.json'}, limit: 6, every: 3, max_new_tokens: 2}}")
    result = torchrun_train(recipe, overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary(tmp_path / engine)["steps"] == 6
    if engine == "ddp":
        rows = (tmp_path / engine / "vqa_eval.jsonl").read_text().splitlines()
        assert [json.loads(row)["step"] for row in rows] == [3, 6]
    assert max_difference(weights(tmp_path / "pretrain"), weights(tmp_path / engine)) < 1e-5
    assert result.stdout.count("step 6/6 | loss") == 1 and "{'loss'" not in result.stdout  # rank 0's lines only
    assert re.search(r"step 3/6 \| loss [\d.]+ \| lr \S+ \| [\d.]+ samples/s \| ETA \d+:\d\d:\d\d\n", result.stdout)


NATIVE_ABORT = "terminate called without an active exception"


def torchrun_train(recipe: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    """Two processes training `recipe` under torchrun (gloo). Rarely on 2 cores (once in a dozen runs of
    the DDP test on 2026-12-02, at the first backward pass), a process aborts inside torch's C++
    (`NATIVE_ABORT`) with no Python error: such a run is made once more, from an empty output folder."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
        *("-m", "llama3med.cli", "train", str(recipe)),
        *(arg for override in overrides for arg in ("--set", override)),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    if result.returncode != 0 and NATIVE_ABORT in result.stderr:
        output = next(o.removeprefix("output_dir=") for o in overrides if o.startswith("output_dir="))
        shutil.rmtree(output, ignore_errors=True)
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    return result


@pytest.mark.parametrize(
    "engine,lora",
    [("ds_zero3", None), ("ds_zero3", {"r": 4, "alpha": 8, "dropout": 0.0}), ("ds_zero2", None)],
    ids=["zero3-full", "zero3-lora", "zero2-full"],
)
def test_two_processes_under_deepspeed_finetune_like_one(tmp_path, phantoms, engine, lora):
    pytest.importorskip("deepspeed")
    assert main(["train", str(pretrain_recipe(tmp_path, phantoms, max_steps=2))]) == 0
    training = {"per_device_train_batch_size": 4, "max_steps": 4, "learning_rate": 1e-3, "disable_tqdm": True}
    recipe = finetune_recipe(tmp_path, phantoms, "finetune", lora=lora, training=training)
    assert main(["train", str(recipe)]) == 0
    overrides = [
        f"output_dir={tmp_path / engine}",
        "training.per_device_train_batch_size=2",
        f"training.deepspeed={ROOT / 'recipes/engines' / engine}.json",
    ]
    if engine == "ds_zero2":  # each process holds the whole weights: the first answers while the other waits
        overrides.append(f"vqa_eval={{data: {phantoms / 'test.json'}, limit: 6, every: 2, max_new_tokens: 2}}")
    result = torchrun_train(recipe, overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    if engine == "ds_zero2":
        rows = (tmp_path / engine / "vqa_eval.jsonl").read_text().splitlines()
        assert [json.loads(row)["step"] for row in rows] == [2, 4]
    one, two = summary(tmp_path / "finetune"), summary(tmp_path / engine)
    assert two["trainable_parameters"] == one["trainable_parameters"] > 0  # whole weights counted, not parts
    # logged every 10 steps, only the last step is logged: its loss, and the run's, are both processes'
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
    assert np.allclose([loss for _, loss in two["losses"]], [loss for _, loss in one["losses"]], rtol=1e-5)
    (alone, _), (sharded, _) = load(tmp_path / "finetune"), load(tmp_path / engine)
    sharded_weights = sharded.state_dict()
    assert max((w - sharded_weights[k]).abs().max().item() for k, w in alone.state_dict().items()) < 1e-5


def test_zero3_refuses_to_build_a_model_saying_why(tmp_path, phantoms):
    pytest.importorskip("deepspeed")
    from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

    recipe = load_recipe(pretrain_recipe(tmp_path, phantoms))
    zero3 = HfDeepSpeedConfig(json.loads((ROOT / "recipes/engines/ds_zero3.json").read_text()))  # as the Trainer sets
    try:
        with pytest.raises(ValueError, match="ZeRO-3 loads a saved Llama3-Med directory partitioned, but cannot build"):
            prepare_model(recipe, training_arguments(recipe))
    finally:
        unset_hf_deepspeed_config()
    del zero3


def test_bad_records_are_skipped_and_counted_and_strict_names_the_first(tmp_path, phantoms, capsys):
    good = json.loads((phantoms / "captions.json").read_text())[:8]
    bad = [
        {"id": "no-image-file", "image": "missing.png", "conversations": good[0]["conversations"]},
        {"id": "empty", "image": good[0]["image"], "conversations": []},
        {"id": "no-answer", "image": good[0]["image"], "conversations": [{"from": "human", "value": "<image>\nHi"}]},
        {"id": "too-long", "image": good[0]["image"], "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "liver " * 600}]},
    ]  # fmt: skip
    (tmp_path / "mixed.json").write_text(json.dumps(good + bad))
    recipe = pretrain_recipe(tmp_path, phantoms, max_steps=2)
    data = f"data=[{{path: {tmp_path / 'mixed.json'}, image_root: {phantoms / 'images'}}}]"
    assert main(["train", str(recipe), "--set", data]) == 0
    assert summary(tmp_path / "pretrain")["skipped"] == {"bad image": 1, "malformed": 2, "too long": 1}
    assert "skipped records: 1 bad image, 2 malformed, 1 too long" in capsys.readouterr().out

    assert main(["train", str(recipe), "--set", data, "--strict"]) == 1
    error = capsys.readouterr().err
    assert "record no-image-file" in error and "file not found" in error and len(error.strip().splitlines()) == 1


def test_recipes_take_overrides_and_refuse_unknown_keys(tmp_path, phantoms):
    recipe = load_recipe(
        pretrain_recipe(tmp_path, phantoms), ["training.learning_rate=1e-4", "data.0.ratio=2", "lora={r: 8}"]
    )
    assert recipe.training["learning_rate"] == 1e-4 and recipe.sources[0].ratio == 2.0 and recipe.lora == {"r": 8}
    with pytest.raises(ValueError, match="unknown keys \\['epochs'\\]"):
        load_recipe(pretrain_recipe(tmp_path, phantoms), ["epochs=3"])
    with pytest.raises(ValueError, match=r"model.scratch has unknown keys \['layers'\]; known: \[.*'scales'"):
        load_recipe(pretrain_recipe(tmp_path, phantoms), ["model={scratch: {vision: {}, text: {}, layers: 2}}"])
    with pytest.raises(ValueError, match=r"recipe: model lacks \['llm'\]: a model is a directory, \{vision, llm\}"):
        load_recipe(pretrain_recipe(tmp_path, phantoms), ["model={vision: siglip}"])
    with pytest.raises(ValueError, match=r"recipe: model.scratch lacks \['text'\]"):
        load_recipe(pretrain_recipe(tmp_path, phantoms), ["model={scratch: {vision: {}}}"])
    with pytest.raises(ValueError, match="vqa_eval.system must be a text, got 3"):
        load_recipe(pretrain_recipe(tmp_path, phantoms), ["vqa_eval={data: test.json, system: 3}"])
    with pytest.raises(ValueError, match="learning_rates has unknown parts \\['tower'\\]"):
        load_recipe(pretrain_recipe(tmp_path, phantoms), ["learning_rates={tower: 1e-5}"])
    bad_option = pretrain_recipe(tmp_path, phantoms, warmup_ratio=0.03)
    assert main(["train", str(bad_option)]) == 1


@pytest.mark.parametrize("name, gpus", [("pretrain", 8), ("finetune", 8), ("finetune_lora", 1)])
def test_the_shipped_8b_recipes_are_the_papers(name, gpus):
    recipe = load_recipe(ROOT / "recipes" / "llama3med-8b" / f"{name}.yaml")
    assert recipe.stage == name.split("_")[0]
    training = recipe.training
    assert training["lr_scheduler_type"] == "cosine" and training["warmup_steps"] == 0.03
    global_batch = training["per_device_train_batch_size"] * training["gradient_accumulation_steps"] * gpus
    if name == "pretrain":
        assert (global_batch, training["learning_rate"]) == (256, 1e-3)
        assert recipe.model["scales"] == [384, 768, 1152]
    else:
        assert global_batch == 128 and recipe.max_length == 4096
        assert training["gradient_checkpointing"] and training["bf16"]
        assert recipe.save_dtype == "bfloat16"  # the final model as it will answer, at half the disk
    if name == "finetune":
        assert training["learning_rate"] == 2e-5 and recipe.lora is None
    if name == "finetune_lora":  # LLaVA-1.5's LoRA numbers, over a frozen LM kept in bf16
        assert (recipe.lora["r"], recipe.lora["alpha"], training["learning_rate"]) == (128, 256, 2e-4)
        assert recipe.learning_rates == {"multi_modal_projector": 2e-5} and recipe.dtype == "bfloat16"


@pytest.mark.parametrize("name,stage", [("ds_zero2", 2), ("ds_zero3", 3)])
def test_the_shipped_deepspeed_configs_leave_batch_and_precision_to_the_recipe(name, stage):
    config = json.loads((ROOT / "recipes" / "engines" / f"{name}.json").read_text())
    assert config["zero_optimization"]["stage"] == stage
    assert config["train_micro_batch_size_per_gpu"] == config["bf16"]["enabled"] == "auto"


def test_length_grouping_is_deterministic_per_epoch_and_groups_similar_lengths():
    lengths = [10, 500, 12, 480, 11, 490, 13, 510] * 50
    sampler = EpochSeededLengthSampler(lengths, batch_size=4, seed=7)
    first, again = list(sampler), list(sampler)
    sampler.set_epoch(1)
    assert first == again and sorted(first) == list(range(400)) and list(sampler) != first
    batches = [[lengths[i] for i in first[k : k + 4]] for k in range(0, 400, 4)]
    assert sum(max(b) - min(b) < 100 for b in batches) >= 90  # batches hold one kind of length


@WARNS_NOTHING_THE_USER_CANNOT_ACT_ON
def test_lora_finetuning_saves_a_merged_model_and_its_adapter(tmp_path, phantoms):
    assert main(["train", str(pretrain_recipe(tmp_path, phantoms, max_steps=2))]) == 0
    finetune = finetune_recipe(
        tmp_path,
        phantoms,
        "lora",
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
        training={"per_device_train_batch_size": 4, "max_steps": 4, "learning_rate": 1e-2, "disable_tqdm": True},
    )
    assert main(["train", str(finetune)]) == 0
    before, after = weights(tmp_path / "pretrain"), weights(tmp_path / "lora")
    assert before.keys() == after.keys()  # a plain model again: no LoRA or wrapper names
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").is_file()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"language_model", "multi_modal_projector"}
    assert not torch.equal(
        before["language_model.model.layers.0.self_attn.q_proj.weight"],
        after["language_model.model.layers.0.self_attn.q_proj.weight"],
    )
    load(tmp_path / "lora")


def test_save_dtype_writes_the_final_model_in_that_precision_and_it_answers(tmp_path, phantoms):
    assert main(["train", str(pretrain_recipe(tmp_path, phantoms, max_steps=2))]) == 0
    trained = weights(tmp_path / "pretrain")
    finetune = finetune_recipe(
        tmp_path, phantoms, "bf16", save_dtype="bfloat16", training={"max_steps": 2, "disable_tqdm": True}
    )
    assert main(["train", str(finetune)]) == 0
    saved = weights(tmp_path / "bf16")
    assert all(t.dtype == torch.bfloat16 for t in saved.values()) and saved.keys() == trained.keys()
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert (tmp_path / "bf16" / "model.safetensors").stat().st_size < 0.6 * (
        tmp_path / "pretrain" / "model.safetensors"
    ).stat().st_size
    model, processor = load(tmp_path / "bf16")
    assert model.dtype == torch.bfloat16
    image = load_image(phantoms / "images" / "phantom-1-000000.png")
    assert answer(model, processor, image, "Is this a CT scan?", max_new_tokens=4).strip()
    with pytest.raises(ValueError, match="save_dtype must be bfloat16, float16 or float32"):
        load_recipe(finetune, ["save_dtype=bf16"])


@WARNS_NOTHING_THE_USER_CANNOT_ACT_ON
def test_qlora_trains_adapters_over_a_4_bit_lm_and_merges_them_at_full_precision(tmp_path, phantoms):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit

    assert main(["train", str(pretrain_recipe(tmp_path, phantoms, max_steps=2))]) == 0
    finetune = finetune_recipe(
        tmp_path,
        phantoms,
        "qlora",
        lora={"r": 4, "alpha": 8, "dropout": 0.0, "bits": 4},
        training={"per_device_train_batch_size": 4, "max_steps": 4, "learning_rate": 1e-2, "disable_tqdm": True},
    )
    recipe = load_recipe(finetune)
    model, _ = prepare_model(recipe, training_arguments(recipe))
    lm = model.language_model
    assert isinstance(lm.model.layers[0].self_attn.q_proj, Linear4bit)
    assert not isinstance(lm.lm_head, Linear4bit) and lm.lm_head.weight.dtype == torch.float32
    unquantized = [*model.vision_tower.modules(), *model.multi_modal_projector.modules()]
    assert not any(isinstance(module, Linear4bit) for module in unquantized)

    assert main(["train", str(finetune)]) == 0
    before, after = weights(tmp_path / "pretrain"), weights(tmp_path / "qlora")
    assert before.keys() == after.keys() and all(t.dtype == torch.float32 for t in after.values())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {k.split(".")[0] for k in changed} == {"language_model", "multi_modal_projector"}
    assert all(k.endswith("proj.weight") for k in changed if k.startswith("language_model"))
    # Folded into the full-precision base, each update is the adapter's rank-4 product B @ A; folded into
    # the 4-bit copies it would carry their rounding error, a full-rank matrix.
    key = "language_model.model.layers.0.self_attn.q_proj.weight"
    singular_values = torch.linalg.svdvals(after[key] - before[key])
    assert singular_values[0] > 0 and singular_values[4] < 1e-4 * singular_values[0]
    assert (tmp_path / "qlora" / "adapter" / "adapter_config.json").is_file()
    load(tmp_path / "qlora")


def test_qlora_is_refused_by_name_when_bits_or_the_start_are_wrong(tmp_path, phantoms):
    with pytest.raises(ValueError, match="lora.bits must be 4"):
        load_recipe(pretrain_recipe(tmp_path, phantoms), ["lora={r: 8, bits: 8}"])
    with pytest.raises(ValueError, match="lora has unknown keys \\['rank'\\]"):
        load_recipe(pretrain_recipe(tmp_path, phantoms), ["lora={rank: 8}"])
    recipe = load_recipe(pretrain_recipe(tmp_path, phantoms), ["lora={r: 8, bits: 4}"])
    with pytest.raises(ValueError, match="QLoRA .* starts from a Llama3-Med directory"):
        prepare_model(recipe, training_arguments(recipe))
