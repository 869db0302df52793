"""`Llama3MedProcessor`: files and chats in, model tensors out.

Images are loaded (DICOM included), padded to a square with the tower's mean colour (LLaVA's
convention), resized to the largest S2 scale and normalised with the tower's mean and std. Text goes
through the tokenizer's chat template (Llama-3's); each `<image>` placeholder becomes the model's
`num_image_tokens` image tokens, and training labels keep only the assistant turns.
"""

from __future__ import annotations

import base64
import re
import urllib.parse
import urllib.request
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin

from .chat import IMAGE_PLACEHOLDER, LLAMA3_CHAT_TEMPLATE, multimodal_to_messages
from .images import DEFAULT_MAX_PIXELS, ImageSource, Window, load_image

IGNORE_INDEX = -100
IMAGE_FITS = ("pad", "resize", "crop")


class SampleTooLongError(ValueError):
    """A sample whose tokens (image tokens included) exceed the allowed length; never cut."""


class Llama3MedProcessor(ProcessorMixin):
    """Image loader + tokenizer for Llama3-Med.

    Args:
        tokenizer: the LM's tokenizer; must know `image_token` as one token.
        image_size: side the images are resized to (the config's largest scale).
        image_mean, image_std: the vision tower's normalisation.
        image_fit: `pad` (to a square with the mean colour, then resize), `resize` (stretch) or `crop`
            (the shorter side resized, then the centre square kept: CLIP's own preprocessing, which
            LLaVA checkpoints not trained on padded images saw).
        num_image_tokens: tokens per image in the LM (the config's `num_image_tokens`).
        image_token: the placeholder written in prompts and expanded here.
        max_pixels: images with more pixels are refused before decoding.
        llava_tokenization: tokenize the text before, between and after the BOS and `<image>` tokens
            separately, as the original LLaVA code does (`tokenizer_image_token`: each piece gets the
            tokenizer's leading-space marker anew). Set for converted LLaVA checkpoints, so that their
            prompts are the token ids they were trained on; it changes nothing for byte-level BPE
            tokenizers (Llama-3's), only for SentencePiece ones that mark the start of text only.
    """

    def __init__(
        self,
        tokenizer=None,
        image_size: int = 1152,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        image_fit: str = "pad",
        num_image_tokens: int = 729,
        image_token: str = IMAGE_PLACEHOLDER,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        llava_tokenization: bool = False,
        **kwargs,
    ):
        if image_fit not in IMAGE_FITS:
            raise ValueError(f"image_fit must be one of {IMAGE_FITS}, got {image_fit!r}")
        self.image_size = int(image_size)
        self.image_mean = [float(x) for x in image_mean]
        self.image_std = [float(x) for x in image_std]
        self.image_fit = image_fit
        self.num_image_tokens = int(num_image_tokens)
        self.image_token = image_token
        self.max_pixels = int(max_pixels)
        self.llava_tokenization = bool(llava_tokenization)
        super().__init__(tokenizer=tokenizer, **kwargs)
        if tokenizer.chat_template is None:
            tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {image_token!r} token (add it as a special token)")

    # ---- images -------------------------------------------------------------------------------

    def preprocess_image(self, image: ImageSource, window: Window = None, frame: int | None = None) -> torch.Tensor:
        """One image (`frame`: which slice of a volume or frame of a multi-frame DICOM, as `load_image`
        takes it) -> `(3, image_size, image_size)` normalised float tensor."""
        rgb = load_image(image, window=window, frame=frame, max_pixels=self.max_pixels)
        if self.image_fit == "pad":
            rgb = pad_to_square(rgb, tuple(int(m * 255) for m in self.image_mean))
        elif self.image_fit == "crop":
            rgb = centre_square(resize_shorter_side(rgb, self.image_size))
        rgb = rgb.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)  # a copy if already so
        pixels = torch.from_numpy(np.array(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        return (pixels - mean) / std

    # ---- text ---------------------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Messages (`role`, `content`) rendered with the tokenizer's chat template."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode_text(self, text: str, num_images: int, max_length: int | None = None) -> list[int]:
        """Token ids of a rendered prompt, with its `<image>` placeholder expanded."""
        ids, _ = self._tokenize(text)
        return self._expand_image_tokens(ids, None, num_images, max_length)[0]

    def _tokenize(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids of `text` and the character offset where each starts."""
        if not self.llava_tokenization:
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return encoded["input_ids"], [begin for begin, _ in encoded["offset_mapping"]]
        markers = {self.tokenizer.bos_token: self.tokenizer.bos_token_id, self.image_token: self.image_token_id}
        ids, starts, at = [], [], 0
        for piece in re.split("(" + "|".join(re.escape(m) for m in markers if m) + ")", text):
            if piece in markers:
                ids.append(markers[piece])
                starts.append(at)
            elif piece:
                encoded = self.tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
                ids.extend(encoded["input_ids"])
                starts.extend(at + begin for begin, _ in encoded["offset_mapping"])
            at += len(piece)
        return ids, starts

    def encode_conversation(
        self,
        messages: list[dict[str, str]],
        num_images: int = 1,
        max_length: int | None = None,
        add_generation_prompt: bool = False,
    ) -> dict[str, list[int]]:
        """`input_ids` and `labels` of a chat for training: labels supervise the assistant turns only
        (their text and end-of-turn token) and are `-100` elsewhere, image tokens included."""
        text = self.chat_prompt(messages, add_generation_prompt=add_generation_prompt)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(self.chat_prompt(messages[:i], add_generation_prompt=True))
            end = len(self.chat_prompt(messages[: i + 1], add_generation_prompt=False))
            spans.append((start, end))
        ids, starts = self._tokenize(text)
        labels = [
            token if any(s <= begin < e for s, e in spans) else IGNORE_INDEX
            for token, begin in zip(ids, starts, strict=True)
        ]
        input_ids, labels = self._expand_image_tokens(ids, labels, num_images, max_length)
        return {"input_ids": input_ids, "labels": labels}

    def _expand_image_tokens(
        self, ids: list[int], labels: list[int] | None, num_images: int, max_length: int | None
    ) -> tuple[list[int], list[int] | None]:
        found = ids.count(self.image_token_id)
        if found != num_images:
            raise ValueError(
                f"prompt has {found} {self.image_token!r} placeholders for {num_images} image(s); "
                f"write the placeholder exactly once per image"
            )
        out_ids: list[int] = []
        out_labels: list[int] = []
        for i, token in enumerate(ids):
            if token == self.image_token_id:
                out_ids.extend([token] * self.num_image_tokens)
                out_labels.extend([IGNORE_INDEX] * self.num_image_tokens)
            else:
                out_ids.append(token)
                out_labels.append(labels[i] if labels is not None else IGNORE_INDEX)
        limit = max_length if max_length is not None else self.tokenizer.model_max_length
        if len(out_ids) > limit:
            raise SampleTooLongError(
                f"sample has {len(out_ids)} tokens ({self.num_image_tokens} per image) but at most {limit} "
                f"are allowed; it is not truncated, since a cut could fall inside the image tokens"
            )
        return out_ids, (out_labels if labels is not None else None)

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str = "pt",
        processor_kwargs: dict | None = None,
        **template_kwargs,
    ) -> str | list[str] | torch.Tensor | BatchFeature:
        """One chat, or a batch of them, in transformers' multimodal message format rendered with the chat
        template; with `tokenize=True` encoded with their images as `__call__` encodes them (a
        `BatchFeature` with `return_dict=True`, else the `input_ids`). This is what transformers' own
        processors offer and what `pipeline("image-text-to-text")` calls.

        An image part names its image by `image` (a PIL image, a path or bytes), `path`, `url` (a path,
        `file://`, `data:` or http(s) URL) or `base64`; DICOM, NIfTI and series directories are read
        as `load_image` reads them, and the part may carry `window` and `frame` for them. One image per
        chat, at most."""
        batched = isinstance(conversation, (list, tuple)) and bool(conversation)
        batched = batched and isinstance(conversation[0], (list, tuple))
        chats = list(conversation) if batched else [conversation]
        prompts, image_parts = [], []
        for chat in chats:
            messages, parts = multimodal_to_messages(chat)
            prompts.append(
                self.tokenizer.apply_chat_template(
                    messages,
                    chat_template=chat_template,
                    tokenize=False,
                    add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message,
                    **template_kwargs,
                )
            )
            image_parts.append(parts)
        if not tokenize:
            return prompts if batched else prompts[0]
        counts = sorted({len(parts) for parts in image_parts})
        if counts not in ([0], [1]):
            raise ValueError(
                f"chats with {' and '.join(map(str, counts))} images: each chat of a batch needs one image, "
                f"or none of them"
            )
        images = [
            load_image(
                _image_of_part(part), window=part.get("window"), frame=part.get("frame"), max_pixels=self.max_pixels
            )
            for parts in image_parts
            for part in parts
        ]
        encoded = self(prompts, images=images or None, return_tensors=return_tensors, **(processor_kwargs or {}))
        return encoded if return_dict else encoded["input_ids"]

    # ---- batches ------------------------------------------------------------------------------

    def __call__(
        self,
        text: str | list[str],
        images: ImageSource | Sequence[ImageSource] | None = None,
        window: Window = None,
        padding_side: str = "left",
        max_length: int | None = None,
        return_tensors: str = "pt",
        padding: bool | str = True,
    ) -> BatchFeature:
        """Rendered prompts (one `<image>` each when `images` are given, one image per prompt) ->
        `input_ids`, `attention_mask` and `pixel_values`, padded to the longest prompt (the only padding
        there is: prompts are never cut, see `SampleTooLongError`). Left padding suits generation."""
        if return_tensors != "pt":
            raise ValueError(f"only PyTorch tensors are returned (return_tensors='pt'), got {return_tensors!r}")
        if padding not in (True, "longest"):
            raise ValueError(f"prompts are padded to the longest one (padding=True), got padding={padding!r}")
        texts = [text] if isinstance(text, str) else list(text)
        if images is None:
            image_list = []
        elif isinstance(images, (str, bytes, Image.Image)) or not isinstance(images, Sequence):
            image_list = [images]
        else:
            image_list = [_one_image(item) for item in images]  # transformers' batches nest: [[a], [b]]
        if image_list and len(image_list) != len(texts):
            raise ValueError(f"got {len(image_list)} images for {len(texts)} prompts; give one image per prompt")
        per_prompt = 1 if image_list else 0
        sequences = [self.encode_text(t, per_prompt, max_length) for t in texts]
        input_ids, attention_mask = pad_sequences(sequences, self.tokenizer.pad_token_id, padding_side)
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if image_list:
            data["pixel_values"] = torch.stack([self.preprocess_image(img, window) for img in image_list])
        return BatchFeature(data)

    def decode(self, token_ids, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode_so_far(self, token_ids: list[int]) -> str | None:
        """The text of an answer still being generated, or None while its last token is half of a
        multi-byte character (the next token completes it): what a stream may show yet."""
        text = self.decode(token_ids)
        return None if text.endswith("\ufffd") else text

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one generated token adds to the answer's text (OpenAI's logprobs `bytes`, which join
        into the answer even where a token holds part of a character): exact for byte-level BPE
        vocabularies (Llama-3's), the token's decoded text otherwise; none for a special token, which
        `decode` leaves out."""
        tokenizer = self.tokenizer
        if token_id in tokenizer.all_special_ids:
            return b""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if (
            type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"
            and token_id not in tokenizer.added_tokens_decoder
        ):
            return bytes(BYTE_OF_SYMBOL[symbol] for symbol in tokenizer.convert_ids_to_tokens(token_id))
        return self.decode([token_id]).encode()


def _byte_symbols() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's, Llama-3's): each byte is written as one printable character,
    itself for printable ASCII and Latin-1, a character from U+0100 on for the others, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {chr(byte): byte for byte in printable} | {chr(256 + i): byte for i, byte in enumerate(others)}


BYTE_OF_SYMBOL = _byte_symbols()


def _one_image(item):
    """A prompt's image, given alone or as the one-image list transformers' processors take per prompt."""
    if isinstance(item, (list, tuple)):
        if len(item) != 1:
            raise ValueError(f"got {len(item)} images for one prompt; give one image per prompt")
        return item[0]
    return item


def _image_of_part(part: dict) -> ImageSource:
    """The image an image part of a chat message names, as `load_image` takes it."""
    if "image" in part:
        return part["image"]
    if "path" in part:
        return part["path"]
    if "base64" in part:
        return base64.b64decode(part["base64"], validate=True)
    url = part.get("url")
    if not isinstance(url, str):
        raise ValueError("an image part needs 'image', 'path', 'url' or 'base64'")
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise ValueError("an image data URL must be base64-encoded")
        return base64.b64decode(payload, validate=True)
    if url.startswith("file://"):
        return urllib.request.url2pathname(urllib.parse.urlparse(url).path)
    if url.startswith(("http://", "https://")):
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read()
    return url


def resize_shorter_side(image: Image.Image, side: int) -> Image.Image:
    """Bicubic resize to a shorter side of `side` px, the longer one in proportion (rounded down, as
    CLIP's image processor does)."""
    width, height = image.size
    longer = int(side * max(width, height) / min(width, height))
    size = (side, longer) if width <= height else (longer, side)
    return image.resize(size, Image.Resampling.BICUBIC)


def centre_square(image: Image.Image) -> Image.Image:
    """The centred square of the shorter side's length."""
    width, height = image.size
    side = min(width, height)
    left, top = int((width - side) / 2), int((height - side) / 2)
    return image.crop((left, top, left + side, top + side))


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre the image on a square canvas of its longer side (LLaVA's `expand2square`)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def pad_sequences(sequences: list[list[int]], pad_value: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists to one length: `(B, L)` ids and the matching attention mask."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(length - len(seq), length) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask
