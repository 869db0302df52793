"""The Llama-3 chat format, the conversation formats of the original LLaVA code (for imported LLaVA and
LLaVA-Med checkpoints), and LLaVA's conversation records and transformers' multimodal messages turned
into chat messages."""

from __future__ import annotations

IMAGE_PLACEHOLDER = "<image>"

# Meta's Llama-3 Instruct template; used when a tokenizer carries no template of its own.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# The prompts of the original LLaVA code's conversation modes (`llava/conversation.py`), as Jinja chat
# templates, so that a checkpoint trained with that code is asked exactly as it was trained. Its `</s>`
# separator is written as the tokenizer's `eos_token`, which it is in Vicuna's and Mistral's tokenizers.
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_CHAT_TEMPLATES = {
    # "{system} USER: {question} ASSISTANT: {answer}</s>USER: ..." (LLaVA-1.5, Vicuna LMs)
    "vicuna_v1": (
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        '{% set turns = messages[1:] %}{% else %}{% set system = "' + VICUNA_V1_SYSTEM + '" %}'
        "{% set turns = messages %}{% endif %}"
        "{{ system + ' ' }}"
        "{% for message in turns %}"
        "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
        "{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    # "[INST] {question} [/INST] {answer} </s>[INST] ..." (LLaVA-Med v1.5, Mistral LMs); a system message
    # goes into the first instruction between <<SYS>> tags.
    "mistral_instruct": (
        "{{ bos_token }}"
        "{% set ns = namespace(system='') %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}"
        "{% if message['content'] %}"
        "{% set ns.system = '<<SYS>>\n' + message['content'] + '\n<</SYS>>\n\n' %}"
        "{% endif %}"
        "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
        "{% set ns.system = '' %}"
        "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
}

LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def llava_to_messages(conversations: list[dict], record: str = "conversation") -> list[dict[str, str]]:
    """`[{"from": "human"|"gpt", "value": ...}]` (LLaVA) -> `[{"role": ..., "content": ...}]`."""
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"{record}: 'conversations' must be a non-empty list")
    messages = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise ValueError(f"{record}: turn {i} is not an object")
        role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if role not in _ROLES:
            raise ValueError(f"{record}: turn {i} has unknown role {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"{record}: turn {i} has no text value")
        messages.append({"role": _ROLES[role], "content": content})
    return messages


def with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    """`messages` opened with the system message `system` when they hold none of their own."""
    if not system or any(message["role"] == "system" for message in messages):
        return messages
    return [{"role": "system", "content": system}, *messages]


def message_content(parts: list[str | None]) -> str:
    """A message's text from its parts in order, `None` standing for an image: the image placeholders
    first, then the texts, a line each (LLaVA-Med's layout, `"<image>\nquestion"`)."""
    placeholders = [IMAGE_PLACEHOLDER for part in parts if part is None]
    return "\n".join([*placeholders, *(part for part in parts if part is not None)])


def multimodal_to_messages(chat: list[dict]) -> tuple[list[dict[str, str]], list[dict]]:
    """transformers' multimodal chat (`content` a string, or a list of `{"type": "text", "text": ...}`
    and `{"type": "image", ...}` parts) -> text messages with an image placeholder per image, and the
    image parts in the order their placeholders appear."""
    if not isinstance(chat, (list, tuple)) or not chat:
        raise ValueError("a chat must be a non-empty list of messages")
    messages, images = [], []
    for i, message in enumerate(chat):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i}: needs 'role' and 'content'")
        role, content = message["role"], message["content"]
        if isinstance(content, str):
            if IMAGE_PLACEHOLDER in content:
                raise ValueError(
                    f"message {i}: put images in {{'type': 'image'}} parts, not as {IMAGE_PLACEHOLDER} in the text"
                )
            messages.append({"role": role, "content": content})
            continue
        parts: list[str | None] = []
        for j, part in enumerate(content if isinstance(content, (list, tuple)) else [content]):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif kind == "image" and role == "user":
                parts.append(None)
                images.append(part)
            elif kind == "image":
                raise ValueError(f"message {i}: images are only read in user messages, not in {role!r} ones")
            else:
                raise ValueError(f"message {i}, part {j}: expected a text part with 'text' or an image part")
        messages.append({"role": role, "content": message_content(parts)})
    return messages, images
