"""Llama3-Med: S2 multi-scale vision tower -> MLP projector -> causal LM (Llama-3-8B-Instruct).

Shapes for the paper's configuration (so400m at 384/768/1152 px, Llama-3-8B):
    pixel_values     (B, 3, 1152, 1152)
    tower tiles      (B * (1 + 4 + 9), 3, 384, 384) -> (B * 14, 729, 1152)
    image features   (B, 729, 1152 * 3)  after stitching, area pooling and channel concat
    projected        (B, 729, 4096)      scattered over the 729 `<image>` tokens of each prompt
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..config import Llama3MedConfig
from ..processing.processor import IGNORE_INDEX
from .multiscale import encode_multiscale
from .projector import MultiModalProjector
from .vision_tower import VisionTower

Stage = Literal["pretrain", "finetune"]

# Causal LM families whose logits are their head applied to the last hidden state, with no scaling or
# capping after it, so that the training loss may run the head on the labelled positions alone.
PLAIN_HEAD_LMS = ("llama", "mistral", "qwen2", "qwen3", "phi3")
LOSS_CHUNK = 1024  # labelled positions per head call in training: ~1.5 GB of logits and grads at 128k words


def summed_cross_entropy(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of `(N, D)` hidden states against `(N,)` targets, in float32."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


class Llama3MedPreTrainedModel(PreTrainedModel):
    config: Llama3MedConfig
    config_class = Llama3MedConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class Llama3MedForConditionalGeneration(Llama3MedPreTrainedModel, GenerationMixin):
    def __init__(self, config: Llama3MedConfig):
        super().__init__(config)
        self.vision_tower = VisionTower(config.vision_config, config.vision_feature_layer)
        self.multi_modal_projector = MultiModalProjector(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(B, 3, S_max, S_max)` -> `(B, num_image_tokens, text_hidden)`, ready to replace `<image>` tokens."""
        tower_dtype = self.vision_tower.vision_model.dtype
        features = encode_multiscale(
            self.vision_tower,
            pixel_values.to(tower_dtype),
            self.config.scales,
            self.config.base_image_size,
            self.config.image_grid,
            self.config.pyramid_resize,
        )
        return self.multi_modal_projector(features.to(self.multi_modal_projector.linear_1.weight.dtype))

    def embed_inputs(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the projected image features written over the `<image>` positions."""
        embeds = self.get_input_embeddings()(input_ids)
        image_mask = input_ids == self.config.image_token_id
        n_tokens = int(image_mask.sum())
        n_features = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        if n_tokens != n_features:
            raise ValueError(
                f"input_ids hold {n_tokens} <image> tokens but the images give {n_features} features "
                f"({self.config.num_image_tokens} per image)"
            )
        if image_features is None:
            return embeds
        mask = image_mask.unsqueeze(-1).expand_as(embeds)
        return embeds.masked_scatter(mask, image_features.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ):
        """Like HF LLaVA: images are encoded when `pixel_values` is given (the prefill); decode steps only
        carry new text tokens and the KV cache (`cache`/`past_key_values`, passed through to the LM).
        `logits_to_keep=N` computes the LM head on the last N positions only (0: all), as `generate` asks
        in the prefill: the image's hundreds of positions times a 128k vocabulary are never read.

        With `labels` (and no `logits_to_keep`), an LM whose logits are its head on its last hidden state
        (`PLAIN_HEAD_LMS`, Llama-3 among them) skips the head where no label is predicted: the image's
        729 positions and the prompt, most of a training sample, each of whose float32 logits and their
        gradient take about 1 MB at Llama-3's vocabulary. The loss is the LM's (mean next-token
        cross-entropy, or its sum over `num_items_in_batch` as the Trainer asks); the output carries
        no logits. Other LMs compute their own loss over every position's logits."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            image_features = self.encode_images(pixel_values) if pixel_values is not None else None
            inputs_embeds = self.embed_inputs(input_ids, image_features)
        plain_loss = isinstance(logits_to_keep, int) and logits_to_keep == 0
        if labels is None or not plain_loss or self.config.text_config.model_type not in PLAIN_HEAD_LMS:
            return self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                labels=labels,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
        return self.supervised_loss(inputs_embeds, attention_mask, position_ids, labels, **kwargs)

    def supervised_loss(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        labels: torch.LongTensor,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """The causal loss from the LM's last hidden state, with its head on the N labelled positions
        only, `LOSS_CHUNK` rows at a time and recomputed in the backward pass: a chunk's logits are the
        only ones alive at once."""
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).to(inputs_embeds.device)  # t predicts t + 1
        predicts = targets != IGNORE_INDEX  # (B, T)
        hidden = self.language_model.get_decoder()(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        ).last_hidden_state  # (B, T, D)
        head = self.language_model.get_output_embeddings()
        rows, wanted = hidden[predicts], targets[predicts]  # (N, D), (N,)
        total = hidden.new_zeros((), dtype=torch.float32)
        for chunk, chunk_targets in zip(rows.split(LOSS_CHUNK), wanted.split(LOSS_CHUNK), strict=True):
            total = total + checkpoint(summed_cross_entropy, head, chunk, chunk_targets, use_reentrant=False)
        return CausalLMOutputWithPast(loss=total / (len(wanted) if num_items_in_batch is None else num_items_in_batch))

    @classmethod
    def from_components(
        cls,
        config: Llama3MedConfig,
        vision_model: PreTrainedModel,
        language_model: PreTrainedModel,
    ) -> Llama3MedForConditionalGeneration:
        """Assemble a model around an existing vision model and LM without allocating them twice.

        The LM is used as is (not copied); the tower's kept layers are copied from `vision_model`; the
        projector is freshly initialised. This is how a run starts from SigLIP and Llama-3 checkpoints.
        """
        with torch.device("meta"):
            model = cls(config)
        model.language_model = language_model
        model.vision_tower = VisionTower(config.vision_config, config.vision_feature_layer)
        model.vision_tower.load_from_hf_tower(vision_model)
        model.multi_modal_projector = MultiModalProjector(config)
        model.multi_modal_projector.apply(model._init_weights)
        model.generation_config = language_model.generation_config
        return model.to(language_model.dtype)

    def set_trainable(
        self, stage: Stage, train_vision_tower: bool = False, train_language_model: bool | None = None
    ) -> None:
        """The paper's stages: `pretrain` trains the projector only; `finetune` the projector and the LM.
        The vision tower stays frozen unless `train_vision_tower`; `train_language_model` overrides the
        stage's choice for the LM (a model trained from scratch has no pretrained LM to keep frozen)."""
        if stage not in ("pretrain", "finetune"):
            raise ValueError(f"stage must be 'pretrain' or 'finetune', got {stage!r}")
        if train_language_model is None:
            train_language_model = stage == "finetune"
        self.multi_modal_projector.requires_grad_(True)
        self.language_model.requires_grad_(train_language_model)
        self.vision_tower.requires_grad_(train_vision_tower)
