"""Turning a teacher's reply into a clean LLaVA conversation, or rejecting it with a reason.

Accepted forms: a JSON list of `{"from": "human"|"gpt", "value"}` (or `role`/`content` with
user/assistant), possibly inside a code fence, or plain `User:` / `Assistant:` lines. Rejected: empty
replies, wrong roles, refusals, answers that give away their source ("according to the caption"),
numbers the source does not contain, and conversations with no question left after de-duplication.
"""

from __future__ import annotations

import json
import re

from ..processing import IMAGE_PLACEHOLDER

ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
REFUSALS = ("i'm sorry", "i am sorry", "i cannot", "i can't", "i am unable", "i'm unable", "as an ai")
LEAKS = re.compile(
    r"\b(caption|legend|the text|the paper|the article|the authors|according to|figure \d|fig\. ?\d|as described)\b",
    re.IGNORECASE,
)
TURN_LINE = re.compile(r"^\s*\**(user|human|assistant|gpt)\**\s*:\s*(.*)$", re.IGNORECASE)
NUMBER = re.compile(r"\d+(?:\.\d+)?")


class BadReply(ValueError):
    """A reply that cannot become training data; `reason` is the counter's key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def parse_reply(text: str) -> list[dict[str, str]]:
    """The turns of a reply, in either accepted form."""
    text = (text or "").strip()
    if not text:
        raise BadReply("empty")
    start, end = text.find("["), text.rfind("]")
    if start != -1 and end > start:
        try:
            raw = json.loads(text[start : end + 1])
        except json.JSONDecodeError:
            raw = None
        if isinstance(raw, list):
            turns = []
            for item in raw:
                if not isinstance(item, dict):
                    raise BadReply("wrong roles", "a turn is not an object")
                role = ROLES.get(str(item.get("from", item.get("role", ""))).lower())
                if role is None:
                    raise BadReply("wrong roles", f"unknown speaker {item.get('from', item.get('role'))!r}")
                turns.append({"from": role, "value": str(item.get("value", item.get("content", ""))).strip()})
            return turns
    turns: list[dict[str, str]] = []
    for line in text.splitlines():
        match = TURN_LINE.match(line)
        if match:
            turns.append({"from": ROLES[match.group(1).lower()], "value": match.group(2).strip()})
        elif turns and line.strip():
            turns[-1]["value"] = f"{turns[-1]['value']}\n{line.strip()}".strip()
    if not turns:
        raise BadReply("refusal" if any(r in text.lower() for r in REFUSALS) else "unparseable")
    return turns


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def clean_conversation(turns: list[dict[str, str]], source: str, similarity: float = 0.8) -> list[dict[str, str]]:
    """Validated turns with `<image>` once at the start of the first question.

    `source` is the caption plus mentions the teacher read: every number in an answer must occur there.
    A question whose words overlap an earlier one's by `similarity` (Jaccard) or more is dropped with
    its answer.
    """
    if len(turns) < 2 or len(turns) % 2:
        raise BadReply("wrong roles", f"{len(turns)} turns; expected question-answer pairs")
    for i, turn in enumerate(turns):
        if turn["from"] != ("human" if i % 2 == 0 else "gpt"):
            raise BadReply("wrong roles", f"turn {i} is {turn['from']!r}")
        if not turn["value"].replace(IMAGE_PLACEHOLDER, "").strip():
            raise BadReply("empty", f"turn {i}")
    text = " ".join(t["value"] for t in turns).lower()
    if any(refusal in text for refusal in REFUSALS):
        raise BadReply("refusal")
    if leak := LEAKS.search(text):
        raise BadReply("leak", leak.group(0))
    source_numbers = set(NUMBER.findall(source))
    for turn in turns[1::2]:
        invented = set(NUMBER.findall(turn["value"])) - source_numbers
        if invented:
            raise BadReply("ungrounded", f"numbers {sorted(invented)} are not in the source")

    kept: list[dict[str, str]] = []
    seen: list[set[str]] = []
    for question, answer in zip(turns[::2], turns[1::2], strict=True):
        words = _words(question["value"].replace(IMAGE_PLACEHOLDER, ""))
        if any(len(words & other) / max(len(words | other), 1) >= similarity for other in seen):
            continue
        seen.append(words)
        kept += [{"from": "human", "value": question["value"].replace(IMAGE_PLACEHOLDER, "").strip()}, answer]
    kept[0]["value"] = f"{IMAGE_PLACEHOLDER}\n{kept[0]['value']}"
    return kept
