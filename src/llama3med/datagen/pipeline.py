"""`llama3med datagen`: figure captions -> teacher LLM -> validated LLaVA conversations, resumably.

Records are answered concurrently (at most `concurrency` requests in flight) and appended to the output
JSONL one by one as they finish; rejected replies go to `<out>.rejected.jsonl` with their reason. A rerun
skips every id already in either file, so a killed run resumes without repeating paid work or writing
a record twice. Transient failures (429, 5xx, timeouts) are retried with exponential back-off and jitter,
waiting at least what `retry-after` asks, a bounded number of times.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml
from tqdm import tqdm

from ..data.conversations import domain_name, read_records, repair_appended_rows
from .cleaning import BadReply, clean_conversation, parse_reply
from .teachers import FatalError, PermanentError, RetryPolicy, complete_with_retries

PROMPTS = ("conversation", "vqa", "description")


@dataclass
class Prompt:
    name: str
    version: int
    system: str
    user: str
    examples: list[dict]
    max_tokens: int

    @property
    def id(self) -> str:
        return f"{self.name}_v{self.version}"

    def messages(self, record: dict) -> list[dict[str, str]]:
        """Few-shot examples as earlier turns, then this record."""
        messages = []
        for example in self.examples:
            messages += [
                {"role": "user", "content": self.render(example)},
                {"role": "assistant", "content": example["reply"].strip()},
            ]
        return [*messages, {"role": "user", "content": self.render(record)}]

    def render(self, record: dict) -> str:
        mentions = record.get("mentions") or "none"
        if isinstance(mentions, list):
            mentions = " ".join(mentions) or "none"
        return self.user.format(caption=record["caption"], mentions=mentions, domain=record.get("domain") or "unknown")


def load_prompt(name: str, version: int = 1) -> Prompt:
    if name not in PROMPTS:
        raise ValueError(f"prompt must be one of {', '.join(PROMPTS)}, got {name!r}")
    path = resources.files("llama3med.datagen") / "prompts" / f"{name}_v{version}.yaml"
    if not path.is_file():
        raise ValueError(f"no version {version} of the {name} prompt")
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    return Prompt(spec["name"], spec["version"], spec["system"], spec["user"], spec["examples"], spec["max_tokens"])


def read_captions(path: str | Path) -> list[dict]:
    """Caption records: PMC-15M / LLaVA-Med alignment JSONL (`id, image, caption, in_text_mention,
    domain`), LLaVA-Med's figure records as its own instruct generation reads them (`pair_id`,
    `fig_label`, `fig_caption`, the image `<pair_id>.jpg` unless named), or LLaVA caption JSON (the
    caption is the first gpt turn)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: input not found")
    records, seen = [], set()
    for position, raw in enumerate(read_records(path)):
        record_id = raw.get("id", raw.get("pair_id"))
        name = f"{path}: record {record_id if record_id is not None else f'#{position}'}"
        caption = raw.get("caption")
        if caption is None and raw.get("fig_caption"):
            caption = f"{raw['fig_label']}: {raw['fig_caption']}" if raw.get("fig_label") else raw["fig_caption"]
        if caption is None and isinstance(raw.get("conversations"), list):
            caption = next(
                (t.get("value") for t in raw["conversations"] if isinstance(t, dict) and t.get("from") == "gpt"), None
            )
        if not caption or not str(caption).strip():
            raise ValueError(f"{name}: no caption")
        image = raw.get("image") or (f"{raw['pair_id']}.jpg" if raw.get("pair_id") else None)
        if record_id is None or image is None:
            raise ValueError(f"{name}: needs 'id' (or 'pair_id') and 'image'")
        if str(record_id) in seen:
            raise ValueError(f"{name}: duplicate id")
        seen.add(str(record_id))
        mentions = raw.get("in_text_mention") or raw.get("mentions") or []
        if isinstance(mentions, str):
            mentions = [mentions]
        mentions = [m.get("tokens", m) if isinstance(m, dict) else m for m in mentions]
        records.append(
            {
                "id": str(record_id),
                "image": image,
                "caption": str(caption).strip(),
                "mentions": [str(m) for m in mentions],
                "domain": domain_name(raw.get("domain")),
                "license": raw.get("license"),
            }
        )
    return records


def input_hash(record: dict, prompt: Prompt) -> str:
    canonical = json.dumps(
        {k: record[k] for k in ("caption", "mentions", "domain")} | {"prompt": prompt.id}, sort_keys=True
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def rejects_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".jsonl") + ".rejected.jsonl")


def read_done(*paths: Path) -> set[str]:
    """Ids already in the output or rejects files; a line cut by a kill is dropped from its file."""
    return {str(row["id"]) for path in paths for row in repair_appended_rows(path)}


@dataclass
class Stats:
    written: int = 0
    rejected: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    retries: int = 0
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    in_flight: int = 0
    max_in_flight: int = 0


def choose_teacher(record_id: str, teachers: list[tuple[object, float]], seed: int):
    """A teacher per record by weight, fixed by the record id, so a resumed run asks the same one."""
    rng = random.Random(f"{seed}-{record_id}")
    return rng.choices([t for t, _ in teachers], weights=[w for _, w in teachers])[0]


async def generate(
    records: list[dict],
    out: str | Path,
    teachers: list[tuple[object, float]],
    prompt: Prompt,
    concurrency: int = 8,
    retry: RetryPolicy | None = None,
    max_requests: int | None = None,
    seed: int = 0,
    progress: bool = True,
    done: set[str] | None = None,
) -> Stats:
    """Generate conversations for every record not yet done (`done`: ids the caller already read from the
    output and rejects files, which are repaired then; read here when not given); returns what happened."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rejects = rejects_path(out)
    if done is None:
        done = read_done(out, rejects)
    pending = [r for r in records if r["id"] not in done]
    retry = retry or RetryPolicy()
    stats, rng = Stats(), random.Random(seed)
    fatal: list[str] = []  # why no record can be done: the first reason, then every task returns
    semaphore = asyncio.Semaphore(concurrency)
    bar = tqdm(
        total=len(records), initial=len(records) - len(pending), unit="rec", desc="datagen", disable=not progress
    )

    with out.open("a", encoding="utf-8") as good, rejects.open("a", encoding="utf-8") as bad:

        async def one(record):
            teacher = choose_teacher(record["id"], teachers, seed)
            async with semaphore:
                if fatal:
                    return
                stats.in_flight += 1
                stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
                try:
                    reply = await complete_with_retries(
                        teacher,
                        prompt.system,
                        prompt.messages(record),
                        prompt.max_tokens,
                        retry,
                        rng,
                        stats,
                        max_requests,
                    )
                except FatalError as err:
                    fatal.append(f"the {teacher.name} teacher ({teacher.model}) cannot be used: {err}")
                    return
                except PermanentError as err:
                    stats.failed[str(err).split(":")[0]] += 1  # not written: a rerun tries again
                    return
                finally:
                    stats.in_flight -= 1
            stats.input_tokens += reply.input_tokens
            stats.output_tokens += reply.output_tokens
            meta = {
                "teacher": teacher.name,
                "model": teacher.model,
                "prompt": prompt.id,
                "input_hash": input_hash(record, prompt),
            }
            source = " ".join([record["caption"], *record["mentions"]])
            try:
                conversations = clean_conversation(parse_reply(reply.text), source)
            except BadReply as err:
                stats.rejected[err.reason] += 1
                bad.write(json.dumps({"id": record["id"], "reason": str(err), **meta}) + "\n")
                bad.flush()
            else:
                row = {
                    "id": record["id"],
                    "image": record["image"],
                    "conversations": conversations,
                    "domain": record.get("domain"),
                    **({"license": record["license"]} if record.get("license") else {}),
                    **meta,
                }
                good.write(json.dumps(row) + "\n")
                good.flush()
                stats.written += 1
            bar.update()
            bar.set_postfix(
                written=stats.written, rejected=sum(stats.rejected.values()), failed=sum(stats.failed.values())
            )

        await asyncio.gather(*(one(record) for record in pending))
    bar.close()
    if fatal:
        raise ValueError(f"{fatal[0]}; {stats.written} conversations written so far are kept in {out}")
    return stats


def estimate_cost(records: list[dict], prompt: Prompt, model: str, prices: dict) -> tuple[int, float | None]:
    """Rough token count (4 characters a token) and dollars, before a paid run starts."""
    per_record = len(prompt.system) + sum(
        len(m["content"]) for m in prompt.messages({"caption": "", "mentions": [], "domain": ""})
    )
    input_tokens = sum((per_record + len(r["caption"]) + sum(map(len, r["mentions"]))) // 4 for r in records)
    output_tokens = prompt.max_tokens * len(records) // 2
    if model not in prices:
        return input_tokens + output_tokens, None
    price_in, price_out = prices[model]
    return input_tokens + output_tokens, (input_tokens * price_in + output_tokens * price_out) / 1e6
