"""Configuration of the Llama3-Med vision-language model.

Every shape the model and the processor need (tokens per image, projector width, the size the processor
resizes to) is derived here from the vision config and the scales, so it is written down exactly once.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

PROJECTOR_TYPES = ("mlp2x_gelu", "linear")
PYRAMID_RESIZES = ("bilinear_antialiased", "bicubic")

# SigLIP-so400m-patch14-384, the paper's vision tower.
SIGLIP_SO400M = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 384,
}
# Llama-3-8B-Instruct, the paper's language model; one extra row for the `<image>` token.
LLAMA3_8B = {
    "vocab_size": 128257,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "bos_token_id": 128000,
    "eos_token_id": 128009,
    "tie_word_embeddings": False,
}


def kept_vision_layers(num_hidden_layers: int, feature_layer: int) -> int:
    """How many tower layers produce `hidden_states[feature_layer]`; the rest are never built.

    `hidden_states` of a ViT has `num_hidden_layers + 1` entries (entry 0 is the embeddings), so layer
    -2 is the output of the second-to-last layer and needs `num_hidden_layers - 1` layers.
    """
    kept = feature_layer if feature_layer >= 0 else num_hidden_layers + 1 + feature_layer
    if not 1 <= kept <= num_hidden_layers:
        raise ValueError(f"vision_feature_layer={feature_layer} is outside a tower of {num_hidden_layers} layers")
    return kept


class Llama3MedConfig(PreTrainedConfig):
    r"""Llama3-Med: a ViT encoded at several scales (S2), an MLP projector and a causal LM.

    Args:
        vision_config: config of the vision tower (SigLIP or CLIP vision model).
        text_config: config of the causal language model (Llama-3-8B-Instruct in the paper).
        scales: image sizes of the pyramid, ascending; each a multiple of the tower's `image_size`.
            The processor resizes to the largest; the smaller ones are made on the device.
        vision_feature_layer: which hidden state of the tower is used (LLaVA's -2: second-to-last layer).
        projector_type: `mlp2x_gelu` (Linear-GELU-Linear, the paper's) or `linear`.
        pyramid_resize: how the smaller scales are made from the largest. `bilinear_antialiased` averages
            the pixels each output pixel covers; `bicubic` is S2's reference code (and so the paper's
            code): a bicubic resize without antialiasing, which shrinking by 3 turns into keeping every
            third pixel. A model computes what it was trained with: `bicubic` for checkpoints of S2 code.
        image_token_id: id of the `<image>` placeholder token in the LM's vocabulary.
    """

    model_type = "llama3med"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="siglip_vision_model", init_kwargs=SIGLIP_SO400M
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", init_kwargs=LLAMA3_8B),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    scales: list[int] | tuple[int, ...] = (384, 768, 1152)
    vision_feature_layer: int = -2
    projector_type: str = "mlp2x_gelu"
    pyramid_resize: str = "bilinear_antialiased"
    image_token_id: int = 128256
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.scales = [int(s) for s in self.scales]
        base = self.vision_config.image_size
        if not self.scales or sorted(set(self.scales)) != self.scales:
            raise ValueError(f"scales must be distinct and ascending, got {self.scales}")
        if any(s % base for s in self.scales):
            raise ValueError(f"every scale must be a multiple of the tower's image_size {base}, got {self.scales}")
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type must be one of {PROJECTOR_TYPES}, got {self.projector_type!r}")
        if self.pyramid_resize not in PYRAMID_RESIZES:
            raise ValueError(f"pyramid_resize must be one of {PYRAMID_RESIZES}, got {self.pyramid_resize!r}")
        kept_vision_layers(self.vision_config.num_hidden_layers, self.vision_feature_layer)

    @property
    def base_image_size(self) -> int:
        """Side of one tile: the resolution the vision tower was trained at."""
        return self.vision_config.image_size

    @property
    def max_image_size(self) -> int:
        """Side the processor resizes every image to; the pyramid is built down from it."""
        return self.scales[-1]

    @property
    def image_grid(self) -> int:
        """Side of the patch grid of one tile (27 for so400m at 384 px with 14 px patches)."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def num_image_tokens(self) -> int:
        """LM tokens per image: one tile's grid, whatever the number of scales (729 for so400m)."""
        return self.image_grid**2

    @property
    def image_feature_size(self) -> int:
        """Channels entering the projector: the tower's width times the number of scales."""
        return self.vision_config.hidden_size * len(self.scales)
