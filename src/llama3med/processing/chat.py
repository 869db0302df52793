"""The Llama-3 chat format, and LLaVA's conversation records turned into chat messages."""

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
