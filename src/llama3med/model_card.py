"""The model card (`README.md`) that `build`, `convert` and `train` write beside the model they save.

It has the Hub's layout, YAML metadata (library, task, tags, base models) and then prose, so a directory
pushed to the Hub or handed to a colleague says what the model is, where it came from and how to ask it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

from .config import Llama3MedConfig


def looks_like_hub_id(name: str | Path) -> bool:
    """`owner/name`, as the Hub names models, and not a local path."""
    text = str(name)
    return text.count("/") == 1 and not text.startswith((".", "/")) and not Path(text).exists()


def describe_architecture(config: Llama3MedConfig) -> str:
    """One sentence of the shapes that matter, read off the config."""
    vision, text = config.vision_config, config.text_config
    scales = "/".join(str(s) for s in config.scales)
    return (
        f"A `{vision.model_type}` vision tower ({vision.image_size} px tiles of {vision.patch_size} px patches, read "
        f"at layer {config.vision_feature_layer}) encodes each image at {scales} px "
        f"({_pyramid(config)}{config.num_image_tokens} image tokens); a "
        f"`{config.projector_type}` projector maps its {config.image_feature_size} channels into a "
        f"`{text.model_type}` LM ({text.num_hidden_layers} layers, hidden size {text.hidden_size}, "
        f"vocabulary {text.vocab_size})."
    )


def _pyramid(config: Llama3MedConfig) -> str:
    """How the smaller scales are made, for a model that has them."""
    if len(config.scales) == 1:
        return ""
    return "S2, resized bicubic as S2's code does, " if config.pyramid_resize == "bicubic" else "S2, "


def model_card(
    config: Llama3MedConfig,
    model_dir: str | Path,
    origin: str,
    base_models: Sequence[str | Path] = (),
    sections: dict[str, str] | None = None,
) -> str:
    """The card's text. `origin` says how the model was made; `base_models` that are hub ids go into the
    metadata (local paths stay in the prose); `sections` are further `## title: body` parts."""
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "tags": ["llama3med", "medical", "biomedical", "vision-language"],
    }
    hub_models = [str(m) for m in base_models if looks_like_hub_id(m)]
    if hub_models:
        metadata["base_model"] = hub_models
    parts = [
        f"---\n{yaml.safe_dump(metadata, sort_keys=False)}---",
        f"# {Path(model_dir).name}",
        "A Llama3-Med vision-language model (Chen, Pekis, Brown 2024, arXiv:2406.09454), saved by llama3med. "
        + describe_architecture(config),
        origin,
        "**Research software. It is not a medical device and must not be used for diagnosis.** Evaluate it "
        "with `llama3med eval` on data like yours before relying on any answer.",
        "## Use\n\n"
        "```bash\n"
        f'llama3med ask --model {model_dir} --image scan.dcm "Is there a lesion in the liver?"\n'
        f"llama3med serve --model {model_dir}   # OpenAI-compatible API and a web page\n"
        "```\n\n"
        "```python\n"
        "import llama3med  # registers the Auto classes\n"
        "from transformers import pipeline\n\n"
        f'ask = pipeline("image-text-to-text", model="{model_dir}")\n'
        'chat = [{"role": "user", "content": [{"type": "image", "path": "scan.dcm", "window": "soft_tissue"},\n'
        '                                     {"type": "text", "text": "Which organ is shown?"}]}]\n'
        'print(ask(text=chat, max_new_tokens=64, return_full_text=False)[0]["generated_text"])\n'
        "```",
    ]
    parts += [f"## {title}\n\n{body}" for title, body in (sections or {}).items()]
    return "\n\n".join(parts) + "\n"


def write_model_card(
    out: str | Path,
    config: Llama3MedConfig,
    origin: str,
    base_models: Sequence[str | Path] = (),
    sections: dict[str, str] | None = None,
) -> None:
    """The card of the model saved in `out`, written to `out/README.md`."""
    (Path(out) / "README.md").write_text(model_card(config, out, origin, base_models, sections))
