"""The processor: chat template, image-token expansion, assistant-only labels, pixels, round trip."""

import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from conftest import write_dicom
from llama3med import Llama3MedProcessor
from llama3med.processing import IGNORE_INDEX, SampleTooLongError, llava_to_messages

CHAT = [
    {"from": "human", "value": "<image>\nIs there a lesion in the liver?"},
    {"from": "gpt", "value": "Yes, there is one small lesion."},
    {"from": "human", "value": "Which side is the lesion on?"},
    {"from": "gpt", "value": "The left side."},
]


@pytest.fixture()
def processor(tokenizer):
    return Llama3MedProcessor(tokenizer=tokenizer, image_size=96, num_image_tokens=16)


def test_labels_supervise_exactly_the_assistant_turns_and_their_end_tokens(processor, tokenizer):
    encoded = processor.encode_conversation(llava_to_messages(CHAT))
    supervised = [t for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True) if label != IGNORE_INDEX]
    expected = tokenizer("Yes, there is one small lesion.<|eot_id|>The left side.<|eot_id|>", add_special_tokens=False)
    assert tokenizer.decode(supervised) == tokenizer.decode(expected["input_ids"])
    for token, label in zip(encoded["input_ids"], encoded["labels"], strict=True):
        assert label in (IGNORE_INDEX, token)


def test_the_image_placeholder_becomes_num_image_tokens_image_tokens(processor):
    encoded = processor.encode_conversation(llava_to_messages(CHAT))
    image_positions = [i for i, t in enumerate(encoded["input_ids"]) if t == processor.image_token_id]
    assert len(image_positions) == 16
    assert image_positions == list(range(image_positions[0], image_positions[0] + 16))  # contiguous
    assert all(encoded["labels"][i] == IGNORE_INDEX for i in image_positions)


def test_the_prompt_uses_the_llama3_chat_template(processor):
    prompt = processor.chat_prompt([{"role": "user", "content": "<image>\nWhat is shown?"}])
    assert prompt == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is shown?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


@pytest.mark.parametrize("text, found", [("What is shown?", 0), ("<image><image>\nWhat is shown?", 2)])
def test_a_prompt_needs_exactly_one_placeholder_per_image(processor, text, found):
    messages = [{"role": "user", "content": text}, {"role": "assistant", "content": "A CT."}]
    with pytest.raises(ValueError, match=f"prompt has {found} '<image>' placeholders for 1 image"):
        processor.encode_conversation(messages)


def test_a_sample_too_long_is_refused_not_cut(processor):
    with pytest.raises(SampleTooLongError, match="not truncated"):
        processor.encode_conversation(llava_to_messages(CHAT), max_length=20)


def test_malformed_llava_records_name_the_turn():
    with pytest.raises(ValueError, match="rec-7: turn 1 has unknown role 'bot'"):
        llava_to_messages([{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}], record="rec-7")
    with pytest.raises(ValueError, match="non-empty list"):
        llava_to_messages([], record="rec-8")


def test_non_square_images_are_padded_with_the_mean_colour_then_resized(tokenizer):
    processor = Llama3MedProcessor(
        tokenizer=tokenizer, image_size=32, image_mean=(0.2, 0.4, 0.6), image_std=(0.5, 0.5, 0.5)
    )
    wide = Image.new("RGB", (64, 16), (255, 255, 255))
    pixels = processor.preprocess_image(wide)
    assert pixels.shape == (3, 32, 32)
    white = (1.0 - torch.tensor([0.2, 0.4, 0.6])) / 0.5
    padding = (torch.tensor([51, 102, 153]) / 255.0 - torch.tensor([0.2, 0.4, 0.6])) / 0.5
    torch.testing.assert_close(pixels[:, 16, 16], white, atol=1e-5, rtol=0)
    torch.testing.assert_close(pixels[:, 1, 16], padding, atol=1e-5, rtol=0)
    stretched = Llama3MedProcessor(tokenizer=tokenizer, image_size=32, image_fit="resize").preprocess_image(wide)
    assert torch.allclose(stretched, torch.ones_like(stretched))


def test_a_batch_is_left_padded_with_one_image_per_prompt(processor, tmp_path):
    dicom = write_dicom(tmp_path / "ct.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8))
    prompts = [
        processor.chat_prompt([{"role": "user", "content": "<image>\nIs there a lesion?"}]),
        processor.chat_prompt([{"role": "user", "content": "<image>\nWhich side is the lesion on, left or right?"}]),
    ]
    batch = processor(prompts, images=[dicom, Image.new("RGB", (20, 30))])
    assert batch["pixel_values"].shape == (2, 3, 96, 96)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][1].all()
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    with pytest.raises(ValueError, match="got 1 images for 2 prompts"):
        processor(prompts, images=[dicom])
    nested = processor(prompts, images=[[dicom], [Image.new("RGB", (20, 30))]])  # as transformers batches them
    assert all(torch.equal(nested[key], batch[key]) for key in batch)
    with pytest.raises(ValueError, match="got 2 images for one prompt"):
        processor(prompts, images=[[dicom, dicom], [dicom]])


def test_save_and_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    for loaded in (Llama3MedProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert isinstance(loaded, Llama3MedProcessor)
        assert (loaded.image_size, loaded.num_image_tokens, loaded.image_mean) == (96, 16, [0.5] * 3)
        assert loaded.encode_conversation(llava_to_messages(CHAT)) == processor.encode_conversation(
            llava_to_messages(CHAT)
        )


def test_a_tokenizer_without_the_image_token_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    bare = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="a")
    with pytest.raises(ValueError, match="no '<image>' token"):
        Llama3MedProcessor(tokenizer=bare)


@pytest.fixture(scope="module")
def sentencepiece_style_tokenizer():
    """A tokenizer that marks only the start of a text with "▁", as transformers 5 builds Llama-2's,
    Vicuna's and Mistral's (`legacy=False`): the start of text after a special token gets no mark."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import CORPUS

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    special = ["<unk>", "<s>", "</s>", "<image>"]
    backend.train_from_iterator(
        [*CORPUS, "[INST] USER: ASSISTANT:\n"] * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=special)
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_llava_tokenization_tokenizes_each_piece_around_the_image_on_its_own(sentencepiece_style_tokenizer):
    """As the original LLaVA code's `tokenizer_image_token`: BOS, then the text before `<image>` and the
    text after it, each tokenized as a text of its own."""
    tokenizer = sentencepiece_style_tokenizer
    prompt = "<s>[INST] <image>\nIs there a lesion in the liver? [/INST]"
    llava = Llama3MedProcessor(tokenizer=tokenizer, image_size=32, num_image_tokens=1, llava_tokenization=True)
    image = tokenizer.convert_tokens_to_ids("<image>")
    pieces = [
        tokenizer(text, add_special_tokens=False)["input_ids"]
        for text in ("[INST] ", "\nIs there a lesion in the liver? [/INST]")
    ]
    assert llava.encode_text(prompt, num_images=1) == [tokenizer.bos_token_id, *pieces[0], image, *pieces[1]]
    joint = Llama3MedProcessor(tokenizer=tokenizer, image_size=32, num_image_tokens=1)
    assert joint.encode_text(prompt, num_images=1) != llava.encode_text(prompt, num_images=1)  # the "▁" marks


def test_llava_tokenization_labels_the_same_assistant_text(sentencepiece_style_tokenizer):
    from llama3med.processing.chat import LLAVA_CHAT_TEMPLATES

    tokenizer = sentencepiece_style_tokenizer
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATES["mistral_instruct"]
    processor = Llama3MedProcessor(tokenizer=tokenizer, image_size=32, num_image_tokens=4, llava_tokenization=True)
    encoded = processor.encode_conversation(llava_to_messages(CHAT))
    supervised = [t for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(supervised).replace(" ", "") == "Yes,thereisonesmalllesion.</s>Theleftside.</s>"
    assert encoded["input_ids"].count(processor.image_token_id) == 4


@pytest.mark.parametrize("shape", [(24, 40), (61, 23), (100, 37), (17, 17)])
def test_the_crop_fit_is_clips_own_preprocessing(tokenizer, shape):
    """`crop`: the shorter side resized, the centre square kept, pixel for pixel as transformers'
    CLIPImageProcessor gives them (what LLaVA checkpoints trained without padding saw)."""
    from transformers import CLIPImageProcessor

    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    ours = Llama3MedProcessor(tokenizer=tokenizer, image_size=32, image_mean=mean, image_std=std, image_fit="crop")
    clip = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=mean, image_std=std
    )
    image = Image.fromarray((np.random.default_rng(0).random((*shape, 3)) * 255).astype(np.uint8))
    expected = clip(image, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(ours.preprocess_image(image), expected)


# ---- transformers' multimodal chat messages (what `pipeline("image-text-to-text")` sends) -------------


def image_chat(image_part: dict, question: str = "Is there a lesion?") -> list[dict]:
    return [{"role": "user", "content": [image_part, {"type": "text", "text": question}]}]


def test_a_multimodal_chat_renders_as_the_question_with_its_image_placeholder_first(processor):
    expected = processor.chat_prompt([{"role": "user", "content": "<image>\nIs there a lesion?"}])
    image_first = image_chat({"type": "image", "path": "scan.dcm"})
    text_first = [{"role": "user", "content": image_first[0]["content"][::-1]}]
    for chat in (image_first, text_first):
        assert processor.apply_chat_template(chat, add_generation_prompt=True) == expected


def test_a_tokenized_multimodal_chat_is_what_the_processor_gives_for_its_prompt_and_image(processor, tmp_path):
    dicom = write_dicom(tmp_path / "ct.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8) * 30, intercept=-1024)
    chat = image_chat({"type": "image", "path": str(dicom), "window": "lung"})
    encoded = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
    prompt = processor.chat_prompt([{"role": "user", "content": "<image>\nIs there a lesion?"}])
    reference = processor(prompt, images=dicom, window="lung")
    assert set(encoded) == {"input_ids", "attention_mask", "pixel_values"}
    for key in encoded:
        assert torch.equal(encoded[key], reference[key]), key
    assert not torch.equal(encoded["pixel_values"], processor(prompt, images=dicom)["pixel_values"])  # windowed
    ids = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    assert torch.equal(ids, reference["input_ids"])


def test_an_image_part_may_name_its_image_by_path_url_data_url_base64_or_object(processor, tmp_path):
    import base64
    import http.server
    import threading

    png = tmp_path / "slice.png"
    Image.fromarray(np.arange(30 * 20 * 3, dtype=np.uint8).reshape(30, 20, 3)).save(png)
    encoded = base64.b64encode(png.read_bytes()).decode()
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        parts = [
            {"type": "image", "image": Image.open(png)},
            {"type": "image", "image": png.read_bytes()},
            {"type": "image", "path": str(png)},
            {"type": "image", "url": str(png)},
            {"type": "image", "url": png.as_uri()},
            {"type": "image", "url": f"data:image/png;base64,{encoded}"},
            {"type": "image", "base64": encoded},
            {"type": "image", "url": f"http://127.0.0.1:{server.server_port}/slice.png"},
        ]
        pixels = [
            processor.apply_chat_template(image_chat(part), tokenize=True, return_dict=True)["pixel_values"]
            for part in parts
        ]
    finally:
        server.shutdown()
    for part, got in zip(parts, pixels, strict=True):
        assert torch.equal(got, pixels[0]), part


def test_a_batch_of_multimodal_chats_is_left_padded_with_one_image_each(processor):
    chats = [
        image_chat({"type": "image", "image": Image.new("RGB", (20, 30))}),
        image_chat(
            {"type": "image", "image": Image.new("RGB", (30, 20))}, "Which side is the lesion on, left or right?"
        ),
    ]
    batch = processor.apply_chat_template(chats, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert batch["pixel_values"].shape == (2, 3, 96, 96)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][1].all()
    text_only = [[{"role": "user", "content": "Hello"}]]
    with pytest.raises(ValueError, match="chats with 0 and 1 images"):
        processor.apply_chat_template([*chats, *text_only], tokenize=True)


@pytest.mark.parametrize(
    "chat, message",
    [
        ([{"role": "user", "content": "<image>\nWhat is shown?"}], "put images in {'type': 'image'} parts"),
        (
            [
                {"role": "user", "content": "What is shown?"},
                {"role": "assistant", "content": [{"type": "image", "path": "x.png"}]},
            ],
            "images are only read in user messages, not in 'assistant' ones",
        ),
        ([{"role": "user", "content": [{"type": "video", "path": "x.mp4"}]}], "message 0, part 0: expected a text"),
        ([{"content": "What is shown?"}], "message 0: needs 'role' and 'content'"),
    ],
)
def test_malformed_multimodal_chats_are_refused_naming_the_message(processor, chat, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        processor.apply_chat_template(chat)


def test_an_image_part_without_an_image_is_refused(processor):
    with pytest.raises(ValueError, match="an image part needs 'image', 'path', 'url' or 'base64'"):
        processor.apply_chat_template(image_chat({"type": "image"}), tokenize=True)
