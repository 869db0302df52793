"""Checkpoints: parity with HF LLaVA through `llama3med convert`, and `llama3med build` from local parts."""

import json
from pathlib import Path

import pytest
import torch
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


def test_build_defaults_to_one_two_and_three_times_the_towers_resolution(component_dirs, tmp_path):
    from llama3med.checkpoints import build

    model, processor = build(*component_dirs)
    assert model.config.scales == [32, 64, 96]


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
