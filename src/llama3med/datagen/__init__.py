"""Instruction data from figure captions with teacher LLMs (Claude 3 Opus, Llama-3-70B), resumably."""

from .cleaning import BadReply, clean_conversation, parse_reply
from .mix import mix
from .pipeline import generate, load_prompt, read_captions
from .teachers import AnthropicTeacher, OpenAITeacher, RetryPolicy, make_teacher

__all__ = [
    "AnthropicTeacher",
    "BadReply",
    "OpenAITeacher",
    "RetryPolicy",
    "clean_conversation",
    "generate",
    "load_prompt",
    "make_teacher",
    "mix",
    "parse_reply",
    "read_captions",
]
