"""`llama3med convert` against the original LLaVA code itself, run by hand (not part of the suite).

The original code is not a dependency (it pins transformers 4.37); its pure-Python wheel imports beside
transformers 5 well enough to build, save and run a model:

    pip install --no-deps llava-torch==1.2.2.post1
    python tests/manual/llava_torch_parity.py             # byte-level BPE tokenizer
    pip install sentencepiece protobuf
    python tests/manual/llava_torch_parity.py --sentencepiece

For a Llama LM (vicuna_v1) and a Mistral LM (mistral_instruct) it writes a tiny checkpoint with
llava-torch's own classes and `save_pretrained`, asks it about a non-square image as LLaVA's
`model_vqa.py` does (`process_images`, `tokenizer_image_token`, greedy), converts the checkpoint and
asks the converted model through llama3med's processor. It prints whether the prompt ids, the pixels,
the logits and 8 greedy tokens agree.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoTokenizer, CLIPImageProcessor, CLIPVisionModel

from llama3med.checkpoints import load
from llama3med.cli import main
from llama3med.inference import question_messages
from llama3med.processing import train_bpe_tokenizer

sys.path.insert(0, str(Path(__file__).parents[1]))
from test_checkpoints import ORIGINAL_LLAVA_FIELDS  # noqa: E402

from conftest import CORPUS, TINY_CLIP, tiny_llama  # noqa: E402

QUESTION = "Is there a lesion in the liver?"


def sentencepiece_tokenizer(folder: Path):
    """A Llama-style SentencePiece tokenizer (`tokenizer.model`, legacy=False), as published LLaVAs ship."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",'
        ' "add_bos_token": true, "legacy": false}'
    )
    return AutoTokenizer.from_pretrained(folder)


def run(root: Path, lm_type: str, tokenizer) -> bool:
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token
    from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
    from llava.model.language_model.llava_mistral import LlavaMistralConfig, LlavaMistralForCausalLM

    torch.manual_seed(0)
    clip = CLIPVisionModel(AutoConfig.for_model(**TINY_CLIP))
    clip.save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    text = {k: v for k, v in tiny_llama(len(tokenizer)).items() if k != "model_type"}
    mm = dict(
        ORIGINAL_LLAVA_FIELDS,
        mm_vision_tower=str(root / "clip"),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if lm_type == "llama":
        model, conv = LlavaLlamaForCausalLM(LlavaConfig(**text, **mm)), "vicuna_v1"
    else:
        model, conv = LlavaMistralForCausalLM(LlavaMistralConfig(**text, **mm)), "mistral_instruct"
    model.eval().get_vision_tower().load_model()
    model.get_model().vision_tower.vision_tower.load_state_dict(clip.state_dict())
    model.save_pretrained(root / "llava")
    tokenizer.save_pretrained(root / "llava")

    image = Image.fromarray((np.random.default_rng(0).random((24, 40, 3)) * 255).astype(np.uint8))
    pixels = process_images([image], CLIPImageProcessor.from_pretrained(root / "clip"), model.config)
    chat = conv_templates[conv].copy()
    chat.append_message(chat.roles[0], "<image>\n" + QUESTION)
    chat.append_message(chat.roles[1], None)
    ids = tokenizer_image_token(chat.get_prompt(), tokenizer)
    ids = torch.tensor([ids if ids[0] == tokenizer.bos_token_id else [tokenizer.bos_token_id, *ids]])
    with torch.no_grad():
        logits = model(input_ids=ids, images=pixels).logits
        tokens = ids
        for _ in range(8):  # llava-torch's generate() predates transformers 5; greedy by hand
            next_token = model(input_ids=tokens, images=pixels).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)

    assert main(["convert", "--llava", str(root / "llava"), "--out", str(root / "ours")]) == 0
    ours, processor = load(root / "ours")
    inputs = processor(processor.chat_prompt(question_messages(QUESTION)), images=image)
    ours_ids = inputs["input_ids"][0].tolist()
    image_id = processor.image_token_id
    collapsed = [
        -200 if t == image_id else t for i, t in enumerate(ours_ids) if t != image_id or ours_ids[i - 1] != image_id
    ]
    with torch.no_grad():
        ours_logits = ours(**inputs).logits[..., : logits.shape[-1]]  # the <image> row is new
    ours_tokens = ours.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    checks = {
        "prompt ids": collapsed == ids[0].tolist(),
        "pixels": torch.equal(inputs["pixel_values"], pixels),
        "logits max abs diff": float((ours_logits - logits).abs().max()),
        "greedy tokens": ours_tokens[0, len(ours_ids) :].tolist() == tokens[0, ids.shape[1] :].tolist(),
    }
    print(f"{lm_type} ({conv}): {checks}")
    return (
        checks["prompt ids"] and checks["pixels"] and checks["logits max abs diff"] < 1e-5 and checks["greedy tokens"]
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentencepiece", action="store_true", help="a SentencePiece tokenizer, as published LLaVAs")
    options = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for lm_type in ("llama", "mistral"):
            root = Path(tmp) / lm_type
            if options.sentencepiece:
                tokenizer = sentencepiece_tokenizer(root / "tokenizer")
            else:
                tokenizer = train_bpe_tokenizer(CORPUS * 4, vocab_size=320, model_max_length=512, image_token=False)
            results.append(run(root, lm_type, tokenizer))
    print("all agree" if all(results) else "DIFFERENCES FOUND")
    sys.exit(0 if all(results) else 1)
