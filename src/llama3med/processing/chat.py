"""The Llama-3 chat format, the conversation formats of the original LLaVA code (for imported LLaVA and
LLaVA-Med checkpoints), and LLaVA's conversation records turned into chat messages."""

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
