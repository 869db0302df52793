"""Checkpoints: parity with HF LLaVA through `llama3med convert`, and `llama3med build` from local parts."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration

from conftest import TINY_CLIP, TINY_SIGLIP, tiny_llama
from llama3med.checkpoints import load
from llama3med.cli import main


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, tokenizer):
    """A tiny transformers LLaVA (SigLIP tower, Llama LM, one scale) saved with its tokenizer."""
    path = tmp_path_factory.mktemp("llava")
    config = LlavaConfig(
        vision_config=AutoConfig.for_model(**TINY_SIGLIP),
        text_config=AutoConfig.for_model(**tiny_llama(len(tokenizer))),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        vision_feature_select_strategy="full",
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    return path


def llava_inputs(token_id, seed=1):
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(10, 300, (2, 7), generator=generator)
    input_ids = torch.cat([text[:, :3], torch.full((2, 16), token_id), text[:, 3:]], dim=1)
    return input_ids, torch.randn(2, 3, 32, 32, generator=generator)


def test_converted_llava_gives_the_same_logits_and_greedy_tokens(llava_dir, tmp_path):
    assert main(["convert", "--llava", str(llava_dir), "--out", str(tmp_path / "ours")]) == 0
    original = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    ours, processor = load(tmp_path / "ours")
    assert ours.config.scales == [32] and processor.num_image_tokens == 16
    input_ids, pixel_values = llava_inputs(original.config.image_token_id)
    with torch.no_grad():
        expected = original(input_ids=input_ids, pixel_values=pixel_values).logits
        got = ours(input_ids=input_ids, pixel_values=pixel_values).logits
    assert (expected - got).abs().max() < 1e-5
    kwargs = dict(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(original.generate(**kwargs), ours.generate(**kwargs))


def test_convert_refuses_a_clip_tower_that_keeps_its_cls_token(tmp_path, tokenizer):
    config = LlavaConfig(
        vision_config=AutoConfig.for_model(**TINY_CLIP),
        text_config=AutoConfig.for_model(**tiny_llama(len(tokenizer))),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="full",
    )
    LlavaForConditionalGeneration(config).save_pretrained(tmp_path / "llava")
    tokenizer.save_pretrained(tmp_path / "llava")
    assert main(["convert", "--llava", str(tmp_path / "llava"), "--out", str(tmp_path / "x")]) == 1


def test_build_assembles_a_model_from_a_siglip_dir_and_a_llama_dir(component_dirs, tmp_path, capsys):
    vision, llm = component_dirs
    out = tmp_path / "built"
    assert main(["build", "--vision", str(vision), "--llm", str(llm), "--out", str(out), "--scales", "32,64,96"]) == 0
    assert "16 image tokens" in capsys.readouterr().out
    card = (out / "README.md").read_text()  # the model card: what it is, and that it is untrained yet
    assert "encodes each image at 32/64/96 px (S2, 16 image tokens)" in card and "freshly initialised" in card
    model, processor = load(out)
    assert model.config.scales == [32, 64, 96] and processor.image_size == 96
    # the tokenizer had no <image> token: it was added and the embeddings grew by one row
    assert model.config.image_token_id == processor.image_token_id == len(processor.tokenizer) - 1
    assert model.get_input_embeddings().weight.shape[0] == len(processor.tokenizer)
    # the tower's kept layers are the SigLIP checkpoint's own weights
    from transformers import AutoModel

    siglip = AutoModel.from_pretrained(vision)
    torch.testing.assert_close(
        model.vision_tower.vision_model.encoder.layers[1].mlp.fc1.weight, siglip.encoder.layers[1].mlp.fc1.weight
    )
    assert model.vision_tower.num_layers == TINY_SIGLIP["num_hidden_layers"] - 1


def test_build_from_a_converted_llava_med_gives_it_the_pyramid_with_a_fresh_projector(tmp_path):
    """The paper's S2 tried on the baseline: LLaVA-Med's CLIP tower and LM at 1x/2x/3x, its prompts kept."""
    llava_dir, _ = write_original_llava(tmp_path, "mistral")
    assert main(["convert", "--llava", str(llava_dir), "--out", str(tmp_path / "llava-med")]) == 0
    assert main(["build", "--from", str(tmp_path / "llava-med"), "--out", str(tmp_path / "s2")]) == 0
    source, source_processor = load(tmp_path / "llava-med")
    model, processor = load(tmp_path / "s2")
    assert model.config.scales == [32, 64, 96] and processor.image_size == 96 and processor.num_image_tokens == 16
    assert model.multi_modal_projector.linear_1.in_features == 3 * source.multi_modal_projector.linear_1.in_features
    for name, weight in [*source.vision_tower.state_dict().items(), *source.language_model.state_dict().items()]:
        kept = model.vision_tower if name in source.vision_tower.state_dict() else model.language_model
        assert torch.equal(kept.state_dict()[name], weight), name
    assert processor.tokenizer.chat_template == source_processor.tokenizer.chat_template  # mistral_instruct
    assert (processor.llava_tokenization, processor.image_fit) == (True, "pad")
    assert "freshly initialised" in (tmp_path / "s2" / "README.md").read_text()


def test_build_needs_a_tower_and_an_lm_or_a_model_to_start_from(tmp_path, capsys):
    assert main(["build", "--vision", "x", "--out", str(tmp_path / "out")]) == 1
    assert "--vision and --llm, or --from" in capsys.readouterr().err


def test_a_missing_local_directory_is_named_as_such_not_read_as_a_hub_id(component_dirs, tmp_path, capsys):
    vision, _ = component_dirs
    missing = tmp_path / "models" / "Meta-Llama-3-8B-Instruct"
    assert main(["build", "--vision", str(vision), "--llm", str(missing), "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == f"llama3med: error: {missing}: LM directory not found\n"
    assert main(["convert", "--llava", str(missing), "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == f"llama3med: error: {missing}: checkpoint directory not found\n"


def test_build_defaults_to_one_two_and_three_times_the_towers_resolution(component_dirs, tmp_path):
    from llama3med.checkpoints import build

    model, processor = build(*component_dirs)
    assert model.config.scales == [32, 64, 96] and model.config.pyramid_resize == "bilinear_antialiased"


def test_build_resizes_the_pyramid_as_s2s_code_does_when_asked_and_from_keeps_it(component_dirs, tmp_path):
    vision, llm = component_dirs
    command = ["build", "--vision", str(vision), "--llm", str(llm), "--out", str(tmp_path / "paper")]
    assert main([*command, "--pyramid-resize", "bicubic"]) == 0
    assert "resized bicubic as S2's code does" in (tmp_path / "paper" / "README.md").read_text()
    assert main(["build", "--from", str(tmp_path / "paper"), "--scales", "32,64", "--out", str(tmp_path / "two")]) == 0
    assert load(tmp_path / "two")[0].config.pyramid_resize == "bicubic"


def test_build_fits_images_as_asked_and_from_keeps_the_models_own_fit(component_dirs, tmp_path, capsys):
    vision, llm = component_dirs
    command = ["build", "--vision", str(vision), "--llm", str(llm), "--out", str(tmp_path / "stretched")]
    assert main([*command, "--image-fit", "resize"]) == 0
    assert load(tmp_path / "stretched")[1].image_fit == "resize"
    rescaled = ["build", "--from", str(tmp_path / "stretched"), "--scales", "32", "--out", str(tmp_path / "one")]
    assert main(rescaled) == 0 and load(tmp_path / "one")[1].image_fit == "resize"
    assert main([*rescaled, "--image-fit", "pad"]) == 1
    assert "--from takes the tower, the LM and the image fit from its model" in capsys.readouterr().err


def test_load_refuses_a_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(ValueError, match="not a model directory"):
        load(tmp_path)
    with pytest.raises(ValueError, match="model directory not found"):
        load(tmp_path / "missing")


def test_generation_never_picks_the_input_only_image_token(built_model_dir):
    model, processor = load(built_model_dir)
    prompt = processor.chat_prompt([{"role": "user", "content": "<image>\nWhat is it?"}])
    inputs = processor(prompt, images=Path(__file__).parents[1] / "examples" / "phantom_ct_lesion.dcm")
    image_id = model.config.image_token_id
    with torch.no_grad():  # make <image> the top-ranked next token by far
        hidden = model(**inputs, output_hidden_states=True).hidden_states[-1][0, -1]
        head = model.get_output_embeddings().weight
        head.zero_()
        head[image_id] = 100 * hidden / hidden.norm()
        output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert image_id not in output[0, inputs["input_ids"].shape[1] :].tolist()


# ---- checkpoints of the original LLaVA code (LLaVA-1.5, LLaVA-Med v1.5) ---------------------------------

ORIGINAL_LLAVA_FIELDS = dict(  # what the original LLaVA code writes beside the LM's own config fields
    mm_hidden_size=TINY_CLIP["hidden_size"],
    mm_projector_type="mlp2x_gelu",
    mm_vision_select_layer=-2,
    mm_vision_select_feature="patch",
    mm_patch_merge_type="flat",
    mm_use_im_start_end=False,
    mm_use_im_patch_token=False,
    image_aspect_ratio="pad",
    tokenizer_model_max_length=512,
    tokenizer_padding_side="right",
    tune_mm_mlp_adapter=False,
    use_mm_proj=True,
    use_cache=False,
)


def write_original_llava(
    root: Path, lm_type: str, with_tower: bool = True, s2_scales: list[int] | None = None, **fields
) -> tuple[Path, LlavaForConditionalGeneration]:
    """A tiny checkpoint in the original LLaVA code's layout (`LlavaLlamaForCausalLM` or
    `LlavaMistralForCausalLM`: its config fields and state-dict names, the text-only tokenizer, the CLIP
    tower in a directory of its own that `mm_vision_tower` names), and the transformers LLaVA holding the
    same weights, which computes what the original code computes. The layout was checked once against
    llava-torch 1.2.2's own classes: converted, identical logits and greedy tokens. With `s2_scales` the
    checkpoint is one of LLaVA's S2 tower (`s2`, `s2_scales`, a projector as wide as the scales' features)
    and the reference only holds its weights: `s2_reference_logits` computes with them."""
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionModel

    from conftest import CORPUS
    from llama3med.processing import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(CORPUS * 4, vocab_size=320, model_max_length=512, image_token=False)
    vocab = len(tokenizer)
    text = dict(tiny_llama(vocab + 1), model_type=lm_type, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    reference = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=AutoConfig.for_model(**TINY_CLIP),
            text_config=AutoConfig.for_model(**text),
            image_token_index=vocab,  # the id the conversion gives <image>
            image_seq_length=16,
            vision_feature_layer=-2,
        )
    ).eval()
    if s2_scales:
        width = TINY_CLIP["hidden_size"] * len(s2_scales)
        reference.model.multi_modal_projector.linear_1 = torch.nn.Linear(width, text["hidden_size"])
        fields.update(s2=True, s2_scales=",".join(map(str, s2_scales)), mm_hidden_size=width)

    tower_dir = root / "clip"
    tower = CLIPVisionModel(AutoConfig.for_model(**TINY_CLIP))
    tower_state = {
        k.removeprefix("model.vision_tower."): v
        for k, v in reference.state_dict().items()
        if k.startswith("model.vision_tower.")
    }
    tower.load_state_dict(tower_state)
    tower.save_pretrained(tower_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tower_dir)

    state = {}
    for key, value in reference.state_dict().items():
        if key.startswith("model.language_model."):
            key = "model." + key.removeprefix("model.language_model.")
        elif key.startswith("model.multi_modal_projector."):
            key = key.replace("multi_modal_projector.linear_1", "mm_projector.0")
            key = key.replace("multi_modal_projector.linear_2", "mm_projector.2")
        elif key.startswith("model.vision_tower."):
            if not with_tower:
                continue
            # transformers 4 (which wrote every published LLaVA) named CLIP's weights "vision_model.*"
            key = "model.vision_tower.vision_tower.vision_model." + key.removeprefix("model.vision_tower.")
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            value = value[:vocab]  # the original vocabulary has no <image> row
        state[key] = value.contiguous()
    llava_dir = root / "llava"
    llava_dir.mkdir()
    save_file(state, llava_dir / "model.safetensors")
    config = {**text, "vocab_size": vocab, "architectures": [f"Llava{lm_type.title()}ForCausalLM"]}
    config.update(ORIGINAL_LLAVA_FIELDS, model_type=f"llava_{lm_type}", mm_vision_tower=str(tower_dir))
    config.update(fields)
    (llava_dir / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(llava_dir)
    return llava_dir, reference


def assert_same_logits(reference: LlavaForConditionalGeneration, converted: Path):
    """The converted model's logits over the original vocabulary (its `<image>` row is new) are the
    reference's; returns the converted model and processor."""
    ours, processor = load(converted)
    input_ids, pixel_values = llava_inputs(processor.image_token_id)
    vocab = processor.image_token_id
    with torch.no_grad():
        expected = reference(input_ids=input_ids, pixel_values=pixel_values).logits[..., :vocab]
        got = ours(input_ids=input_ids, pixel_values=pixel_values).logits[..., :vocab]
    assert (expected - got).abs().max() < 1e-5
    return ours, processor


@pytest.mark.parametrize("lm_type", ["llama", "mistral"])
def test_an_original_llava_checkpoint_converts_to_the_same_logits_and_greedy_tokens(tmp_path, lm_type):
    llava_dir, reference = write_original_llava(tmp_path, lm_type)
    assert main(["convert", "--llava", str(llava_dir), "--out", str(tmp_path / "ours")]) == 0
    ours, processor = assert_same_logits(reference, tmp_path / "ours")
    assert ours.config.text_config.model_type == lm_type and processor.num_image_tokens == 16
    assert processor.llava_tokenization  # prompts tokenized as LLaVA's tokenizer_image_token does
    expected_mode = {"llama": "vicuna_v1", "mistral": "mistral_instruct"}[lm_type]
    assert f"prompted in LLaVA's `{expected_mode}` format" in (tmp_path / "ours" / "README.md").read_text()
    assert ours.config.image_token_id == processor.image_token_id == reference.config.image_token_id
    input_ids, pixel_values = llava_inputs(processor.image_token_id)
    kwargs = dict(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    image_row = processor.image_token_id  # never generated by ours; the reference's own row is random
    assert torch.equal(reference.generate(**kwargs, suppress_tokens=[image_row]), ours.generate(**kwargs))


def s2_reference_logits(reference, input_ids, pixel_values, scales: list[int]) -> torch.Tensor:
    """What LLaVA's S2 tower (Shi et al.'s s2wrapper) computes, written out scale by scale: a plain bicubic
    resize of the largest image, cut into a chessboard of tiles of the smallest scale (tile-major along
    the batch), the tiles through CLIP in a call per scale (`hidden_states[-2]`, CLS dropped), stitched
    back, area-resized to one tile's grid and concatenated along channels; then the projector and the LM."""
    tower, batch, tile = reference.model.vision_tower, pixel_values.shape[0], scales[0]
    maps = []
    for size in scales:
        image, n = F.interpolate(pixel_values, size=(size, size), mode="bicubic"), size // tile
        tiles = torch.cat(
            [image[..., i * tile : (i + 1) * tile, j * tile : (j + 1) * tile] for i in range(n) for j in range(n)]
        )
        features = tower(tiles, output_hidden_states=True).hidden_states[-2][:, 1:]
        grid = int(features.shape[1] ** 0.5)
        pieces = features.transpose(1, 2).reshape(n * n, batch, -1, grid, grid)
        stitched = torch.cat([torch.cat(list(pieces[i * n : (i + 1) * n]), dim=-1) for i in range(n)], dim=-2)
        maps.append(F.interpolate(stitched, size=(grid, grid), mode="area"))
    image_features = reference.model.multi_modal_projector(torch.cat(maps, dim=1).flatten(2).transpose(1, 2))
    embeds = reference.get_input_embeddings()(input_ids)
    embeds[input_ids == reference.config.image_token_id] = image_features.reshape(-1, embeds.shape[-1])
    return reference(inputs_embeds=embeds).logits


def test_an_original_llava_s2_checkpoint_converts_to_its_scales_and_the_same_logits(tmp_path):
    scales = [32, 64, 96]
    llava_dir, reference = write_original_llava(tmp_path, "llama", s2_scales=scales)
    assert main(["convert", "--llava", str(llava_dir), "--out", str(tmp_path / "ours")]) == 0
    ours, processor = load(tmp_path / "ours")
    assert ours.config.scales == scales and ours.config.pyramid_resize == "bicubic"
    assert processor.image_size == 96 and processor.num_image_tokens == 16
    assert "at the S2 scales 32/64/96 px" in (tmp_path / "ours" / "README.md").read_text()
    input_ids, _ = llava_inputs(processor.image_token_id)
    pixel_values = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    vocab = processor.image_token_id
    with torch.no_grad():
        expected = s2_reference_logits(reference, input_ids, pixel_values, scales)[..., :vocab]
        got = ours(input_ids=input_ids, pixel_values=pixel_values).logits[..., :vocab]
    assert (expected - got).abs().max() < 1e-5


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(s2_scales="32,48"), "s2_scales='32,48' cannot be converted"),
        (dict(s2_scales="64,128"), "s2_scales='64,128' cannot be converted"),
        (dict(s2_scales="32,x"), "s2_scales='32,x' is not a comma-separated list"),
        (dict(s2_scales="32,64", mm_hidden_size=32), "width 32 x 2 scales, but"),
    ],
)
def test_convert_refuses_s2_scales_that_do_not_cut_into_the_towers_tiles(tmp_path, capsys, fields, message):
    llava_dir, _ = write_original_llava(tmp_path, "llama")
    config = json.loads((llava_dir / "config.json").read_text())
    (llava_dir / "config.json").write_text(json.dumps({**config, "s2": True, "mm_hidden_size": 64, **fields}))
    assert main(["convert", "--llava", str(llava_dir), "--out", str(tmp_path / "ours")]) == 1
    assert message in capsys.readouterr().err and not (tmp_path / "ours").exists()


VICUNA_PROMPT = (  # what llava/conversation.py's conv_vicuna_v1 renders, behind the tokenizer's BOS
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: <image>\nIs there a lesion? ASSISTANT: yes"
    "</s>USER: Where? ASSISTANT:"
)
MISTRAL_PROMPT = "[INST] <image>\nIs there a lesion? [/INST] yes </s>[INST] Where? [/INST]"  # conv_mistral_instruct


@pytest.mark.parametrize(
    ("lm_type", "conv_mode", "expected"),
    [
        ("llama", None, VICUNA_PROMPT),
        ("mistral", None, MISTRAL_PROMPT),
        ("llama", "mistral_instruct", MISTRAL_PROMPT),
    ],
)
def test_a_converted_llava_is_prompted_in_its_conversation_mode(tmp_path, lm_type, conv_mode, expected):
    llava_dir, _ = write_original_llava(tmp_path, lm_type)
    mode = ["--conv-mode", conv_mode] if conv_mode else []
    assert main(["convert", "--llava", str(llava_dir), "--out", str(tmp_path / "ours"), *mode]) == 0
    _, processor = load(tmp_path / "ours")
    tokenizer = processor.tokenizer
    messages = [
        {"role": "user", "content": "<image>\nIs there a lesion?"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "Where?"},
    ]
    assert processor.chat_prompt(messages) == tokenizer.bos_token + expected.replace("</s>", tokenizer.eos_token)


def test_mistral_instruct_puts_a_system_message_in_the_first_instruction(tmp_path):
    llava_dir, _ = write_original_llava(tmp_path, "mistral")
    assert main(["convert", "--llava", str(llava_dir), "--out", str(tmp_path / "ours")]) == 0
    _, processor = load(tmp_path / "ours")
    prompt = processor.chat_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert prompt == processor.tokenizer.bos_token + "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"


def test_a_checkpoint_without_its_tower_takes_it_from_vision(tmp_path, capsys):
    trained_with = str(tmp_path / "elsewhere" / "clip-vit-large-patch14-336")  # the path it was trained with
    llava_dir, reference = write_original_llava(tmp_path, "llama", with_tower=False, mm_vision_tower=trained_with)
    command = ["convert", "--llava", str(llava_dir), "--out", str(tmp_path / "ours")]
    assert main(command) == 1
    assert f"its vision tower {trained_with} cannot be read" in capsys.readouterr().err
    assert main([*command, "--vision", str(tmp_path / "clip")]) == 0
    assert_same_logits(reference, tmp_path / "ours")


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("mm_use_im_start_end", True, "image start/end tokens"),
        ("image_aspect_ratio", "anyres_max_9", "any-resolution"),
        ("mm_patch_merge_type", "spatial_unpad", "any-resolution"),
        ("mm_vision_select_feature", "cls_patch", "CLS token"),
    ],
)
def test_convert_refuses_what_the_original_llava_computes_differently(tmp_path, capsys, field, value, reason):
    llava_dir, _ = write_original_llava(tmp_path, "llama", **{field: value})
    assert main(["convert", "--llava", str(llava_dir), "--out", str(tmp_path / "ours")]) == 1
    error = capsys.readouterr().err
    assert f"{field}=" in error and reason in error and not (tmp_path / "ours").exists()


def test_a_llava_1_5_layout_converts_too_model_type_llava_and_pytorch_shards(tmp_path):
    """LLaVA-1.5 as published: `model_type: llava` and the weights in `pytorch_model-*.bin` shards."""
    from safetensors.torch import load_file

    llava_dir, reference = write_original_llava(tmp_path, "llama", model_type="llava")
    state = load_file(llava_dir / "model.safetensors")
    (llava_dir / "model.safetensors").unlink()
    names = sorted(state)
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        torch.save({k: state[k] for k in part}, llava_dir / f"pytorch_model-0000{i + 1}-of-00002.bin")
    assert main(["convert", "--llava", str(llava_dir), "--out", str(tmp_path / "ours")]) == 0
    assert_same_logits(reference, tmp_path / "ours")


@pytest.mark.parametrize(("aspect_ratio", "fit"), [("pad", "pad"), ("square", "crop"), (None, "crop")])
def test_a_converted_llava_fits_images_as_the_original_code_does(tmp_path, aspect_ratio, fit):
    """LLaVA pads to a square only with image_aspect_ratio 'pad'; otherwise CLIP's processor crops."""
    llava_dir, _ = write_original_llava(tmp_path, "llama", image_aspect_ratio=aspect_ratio)
    assert main(["convert", "--llava", str(llava_dir), "--out", str(tmp_path / "ours")]) == 0
    assert load(tmp_path / "ours")[1].image_fit == fit


@pytest.mark.parametrize(
    ("settings", "fit"), [({"do_center_crop": True}, "crop"), ({"do_pad": True}, "pad"), ({}, "pad")]
)
def test_a_converted_transformers_llava_fits_images_as_its_image_processor_does(llava_dir, tmp_path, settings, fit):
    """llava-hf's ports of LLaVA-1.5 centre-crop (CLIP's processor); LlavaImageProcessor with do_pad pads."""
    source = tmp_path / "llava"
    shutil.copytree(llava_dir, source)
    stats = json.loads((source / "preprocessor_config.json").read_text())
    (source / "preprocessor_config.json").write_text(json.dumps({**stats, **settings}))
    assert main(["convert", "--llava", str(source), "--out", str(tmp_path / "ours")]) == 0
    assert load(tmp_path / "ours")[1].image_fit == fit


def test_asking_an_unconverted_llava_checkpoint_says_to_convert_it(tmp_path, capsys):
    llava_dir, _ = write_original_llava(tmp_path, "mistral")
    image = Path(__file__).parents[1] / "examples" / "phantom_ct_lesion.dcm"
    assert main(["ask", "--model", str(llava_dir), "--image", str(image), "Is there a lesion?"]) == 1
    assert "original LLaVA code; run `llama3med convert --llava` first" in capsys.readouterr().err


def test_convert_refuses_lora_adapters_that_are_not_merged(tmp_path, capsys):
    llava_dir, _ = write_original_llava(tmp_path, "llama")
    (llava_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert main(["convert", "--llava", str(llava_dir), "--out", str(tmp_path / "ours")]) == 1
    assert "merge them into their base first" in capsys.readouterr().err


def test_conv_mode_is_refused_for_a_transformers_llava(llava_dir, tmp_path, capsys):
    assert main(["convert", "--llava", str(llava_dir), "--out", str(tmp_path / "x"), "--conv-mode", "vicuna_v1"]) == 1
    assert "original LLaVA" in capsys.readouterr().err


def test_a_converted_llava_med_answers_a_questions_file_as_the_original_would(tmp_path):
    """The whole `answer` run (DICOM images, LLaVA's prompt and tokenization, batches, the image's prompt
    prefix cached) on a converted Mistral LLaVA gives, for every question, the greedy answer of the
    reference LLaVA on the same prompt and pixels."""
    from llama3med.inference import question_messages

    llava_dir, reference = write_original_llava(tmp_path, "mistral")
    assert main(["convert", "--llava", str(llava_dir), "--out", str(tmp_path / "ours")]) == 0
    questions = Path(__file__).parents[1] / "examples" / "questions.jsonl"
    command = ["answer", str(questions), "--model", str(tmp_path / "ours"), "--out", str(tmp_path / "answers")]
    assert main([*command, "--max-new-tokens", "6", "--batch-size", "4"]) == 0
    answers = [json.loads(line) for line in (tmp_path / "answers" / "answers.jsonl").read_text().splitlines()]
    model, processor = load(tmp_path / "ours")
    for record, answered in zip(map(json.loads, questions.read_text().splitlines()), answers, strict=True):
        prompt = processor.chat_prompt(question_messages(record["text"]))
        assert answered["prompt"] == prompt and prompt.startswith(processor.tokenizer.bos_token + "[INST] <image>\n")
        input_ids = torch.tensor([processor.encode_text(prompt, num_images=1)])
        pixel_values = processor.preprocess_image(questions.parent / record["image"])[None]
        output = reference.generate(
            input_ids=input_ids,
            pixel_values=pixel_values,
            max_new_tokens=6,
            do_sample=False,
            suppress_tokens=[processor.image_token_id],
            eos_token_id=model.generation_config.eos_token_id,
        )
        assert answered["text"] == processor.decode(output[0, input_ids.shape[1] :]).strip()


def test_a_model_card_names_hub_models_as_base_models_and_keeps_local_paths_out_of_its_metadata(tiny_config):
    import yaml

    from llama3med.model_card import model_card

    hub, local = "meta-llama/Meta-Llama-3-8B-Instruct", "/models/siglip-so400m-patch14-384"
    card = model_card(tiny_config, "runs/x", "Built for a test.", base_models=[hub, local, "examples"])
    metadata = yaml.safe_load(card.split("---\n")[1])
    assert metadata["base_model"] == [hub] and "llama3med" in metadata["tags"]
    assert "Built for a test." in card and "--model runs/x" in card
