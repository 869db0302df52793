"""A small byte-level BPE tokenizer trained in-process, shaped like Llama-3's.

Weights cannot be downloaded here, so tests and the demo model train their own tokenizer on the text they
use. It has Llama-3's special tokens, its chat template and an `<image>` token, so every code path that
handles the real Llama-3 tokenizer handles this one the same way.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .chat import IMAGE_PLACEHOLDER, LLAMA3_CHAT_TEMPLATE, LLAMA3_SPECIAL_TOKENS


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, model_max_length: int = 4096, image_token: bool = True
) -> PreTrainedTokenizerFast:
    """Train a Llama-3-style tokenizer on `texts`; `image_token=False` gives a text-only one, like
    Meta's, to which `llama3med build` adds `<image>`."""
    special = [*LLAMA3_SPECIAL_TOKENS, *([IMAGE_PLACEHOLDER] if image_token else [])]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
        extra_special_tokens={"image_token": IMAGE_PLACEHOLDER} if image_token else None,
        chat_template=LLAMA3_CHAT_TEMPLATE,
        model_max_length=model_max_length,
    )
