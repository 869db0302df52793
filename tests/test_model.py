"""The model: forward like HF LLaVA, generation with a KV cache, checkpoints, Auto classes, stages."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from llama3med import Llama3MedConfig, Llama3MedForConditionalGeneration
from llama3med.model import modeling_llama3med


def inputs_for(config, batch=2, text_before=3, text_after=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ordinary = (config.image_token_id + 1, config.text_config.vocab_size)  # the tokenizer's ordinary tokens
    before = torch.randint(*ordinary, (batch, text_before), generator=generator)
    after = torch.randint(*ordinary, (batch, text_after), generator=generator)
    image = torch.full((batch, config.num_image_tokens), config.image_token_id)
    input_ids = torch.cat([before, image, after], dim=1)
    side = config.max_image_size
    pixel_values = torch.randn(batch, 3, side, side, generator=generator)
    return input_ids, pixel_values


@pytest.fixture()
def model(tiny_config):
    torch.manual_seed(0)
    return Llama3MedForConditionalGeneration(tiny_config).eval()


def test_shapes_derive_from_the_config(tiny_config, model):
    assert tiny_config.num_image_tokens == 16  # (32 / 8)^2: one base tile, whatever the scales
    assert tiny_config.image_feature_size == 32 * 3
    input_ids, pixel_values = inputs_for(tiny_config)
    features = model.encode_images(pixel_values)
    assert features.shape == (2, 16, tiny_config.text_config.hidden_size)
    out = model(input_ids=input_ids, pixel_values=pixel_values)
    assert out.logits.shape == (*input_ids.shape, tiny_config.text_config.vocab_size)


def labelled_batch(config):
    """Three rows whose labels, as `encode_conversation` gives them, cover 5, 3 and 9 answer tokens."""
    input_ids, pixel_values = inputs_for(config, batch=3, text_before=4, text_after=9)
    labels = torch.full_like(input_ids, -100)
    labels[0, -9:-4], labels[1, -3:], labels[2, -9:] = input_ids[0, -9:-4], input_ids[1, -3:], input_ids[2, -9:]
    return input_ids, pixel_values, labels


def loss_and_grads(model, forward):
    loss = forward().loss
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return loss, grads


@pytest.mark.parametrize("num_items", [None, 40])
def test_the_training_loss_is_the_lms_with_its_head_run_on_labelled_positions_in_chunks(
    tiny_config, model, monkeypatch, num_items
):
    input_ids, pixel_values, labels = labelled_batch(tiny_config)
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    monkeypatch.setattr(modeling_llama3med, "LOSS_CHUNK", 5)
    rows = []
    model.language_model.lm_head.register_forward_hook(lambda m, x, y: rows.append(x[0].shape[:-1].numel()))
    model.train()
    inputs = dict(input_ids=input_ids, pixel_values=pixel_values, labels=labels, **kwargs)
    ours, ours_grads = loss_and_grads(model, lambda: model(**inputs))
    assert rows == [5, 5, 5, 2] + [2, 5, 5, 5]  # 17 labelled positions of 3 x 29 in chunks, again backwards

    def hf_loss():  # the LM's own loss, over every position's logits
        embeds = model.embed_inputs(input_ids, model.encode_images(pixel_values))
        return model.language_model(inputs_embeds=embeds, labels=labels, **kwargs)

    hf, hf_grads = loss_and_grads(model, hf_loss)
    torch.testing.assert_close(ours, hf)
    for ours_grad, hf_grad in zip(ours_grads, hf_grads, strict=True):
        torch.testing.assert_close(ours_grad, hf_grad)


def test_an_lm_with_capped_logits_keeps_its_own_loss(tiny_config):
    text = {**tiny_config.text_config.to_dict(), "model_type": "gemma2", "final_logit_softcapping": 3.0}
    config = Llama3MedConfig(**{**tiny_config.to_dict(), "text_config": text})
    torch.manual_seed(0)
    model = Llama3MedForConditionalGeneration(config).train()
    input_ids, pixel_values, labels = labelled_batch(config)
    ours = model(input_ids=input_ids, pixel_values=pixel_values, labels=labels)
    hf = model.language_model(
        inputs_embeds=model.embed_inputs(input_ids, model.encode_images(pixel_values)), labels=labels
    )
    torch.testing.assert_close(ours.loss, hf.loss)
    assert ours.logits.abs().max() <= 3.0  # capped: the head alone would not give these


def test_image_features_land_on_the_image_tokens(tiny_config, model):
    input_ids, pixel_values = inputs_for(tiny_config, batch=1)
    features = model.encode_images(pixel_values)
    embeds = model.embed_inputs(input_ids, features)
    image_positions = input_ids[0] == tiny_config.image_token_id
    torch.testing.assert_close(embeds[0, image_positions], features[0])
    text = model.get_input_embeddings()(input_ids)
    torch.testing.assert_close(embeds[0, ~image_positions], text[0, ~image_positions])


def test_image_tokens_without_matching_images_are_an_error(tiny_config, model):
    input_ids, pixel_values = inputs_for(tiny_config, batch=2)
    with pytest.raises(ValueError, match="hold 32 <image> tokens but the images give 16 features"):
        model(input_ids=input_ids, pixel_values=pixel_values[:1])
    with pytest.raises(ValueError, match="give 0 features"):
        model(input_ids=input_ids)


def test_generate_with_kv_cache_equals_full_recomputation_and_encodes_once(tiny_config, model):
    input_ids, pixel_values = inputs_for(tiny_config, batch=2)
    calls, head_positions = [], []
    model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    head = model.language_model.lm_head.register_forward_hook(lambda m, x, y: head_positions.append(x[0].shape[1]))
    kwargs = dict(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=6, do_sample=False)
    cached = model.generate(**kwargs, min_new_tokens=6)
    head.remove()
    assert len(calls) == 1  # the image is encoded in the prefill only
    assert head_positions == [1] * 6  # the prefill's logits are taken at its last position only
    uncached = model.generate(**kwargs, min_new_tokens=6, use_cache=False)
    assert cached.shape == (2, input_ids.shape[1] + 6)
    assert torch.equal(cached, uncached)
    # and greedy decoding is the argmax of the forward pass, step by step
    sequence = input_ids
    for _ in range(6):
        logits = model(input_ids=sequence, pixel_values=pixel_values).logits[:, -1]
        sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, sequence)


def test_save_and_load_round_trip_exactly_with_shards_and_auto_classes(tiny_config, model, tmp_path):
    input_ids, pixel_values = inputs_for(tiny_config)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert isinstance(AutoConfig.from_pretrained(tmp_path), Llama3MedConfig)
    for loaded in (
        Llama3MedForConditionalGeneration.from_pretrained(tmp_path),
        AutoModelForImageTextToText.from_pretrained(tmp_path),
    ):
        assert isinstance(loaded, Llama3MedForConditionalGeneration)
        with torch.no_grad():
            expected = model(input_ids=input_ids, pixel_values=pixel_values).logits
            got = loaded.eval()(input_ids=input_ids, pixel_values=pixel_values).logits
        assert torch.equal(expected, got)


def trainable(model, prefix):
    return {p.requires_grad for n, p in model.named_parameters() if n.startswith(prefix)}


def test_stages_set_what_trains(model):
    model.set_trainable("pretrain")
    assert trainable(model, "multi_modal_projector") == {True}
    assert trainable(model, "language_model") == {False}
    assert trainable(model, "vision_tower") == {False}
    model.set_trainable("finetune")
    assert trainable(model, "language_model") == {True}
    assert trainable(model, "vision_tower") == {False}
    model.set_trainable("finetune", train_vision_tower=True)
    assert trainable(model, "vision_tower") == {True}
    with pytest.raises(ValueError, match="stage must be"):
        model.set_trainable("sft")


def test_in_pretrain_only_the_projector_receives_gradients(tiny_config, model):
    model.set_trainable("pretrain")
    input_ids, pixel_values = inputs_for(tiny_config)
    model.train()
    model(input_ids=input_ids, pixel_values=pixel_values, labels=input_ids).loss.backward()
    with_grad = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"multi_modal_projector"}


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(scales=[32, 48]), "multiple of the tower's image_size 32"),
        (dict(scales=[64, 32]), "distinct and ascending"),
        (dict(projector_type="mlp3x"), "projector_type must be one of"),
        (dict(vision_feature_layer=-5), "outside a tower of 3 layers"),
        (dict(pyramid_resize="nearest"), "pyramid_resize must be one of"),
    ],
)
def test_invalid_configs_are_refused(tiny_config, change, message):
    kwargs = {**tiny_config.to_dict(), **change}
    with pytest.raises(ValueError, match=message):
        Llama3MedConfig(**kwargs)


def test_the_default_config_is_the_papers(tmp_path):
    config = Llama3MedConfig()
    assert config.scales == [384, 768, 1152]
    assert config.num_image_tokens == 729 and config.image_feature_size == 1152 * 3
    assert config.vision_config.model_type == "siglip_vision_model"
    assert config.text_config.hidden_size == 4096 and config.vision_feature_layer == -2
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.to_diff_dict() == config.to_diff_dict()
