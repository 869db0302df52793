"""`llama3med datagen mix`: one finetune set from several conversation sources (e.g. llava-med-instruct-60k,
the Claude set, the Llama-3 set) by ratio and seed, with a stats report."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from ..data.conversations import draw, read_records


def mix(sources: list[tuple[Path, float]], out: str | Path, seed: int = 0) -> dict:
    """Write the mixture (JSON list, shuffled) and return its stats: records per source, teacher, domain
    and number of turns, and whitespace-token totals."""
    rng = random.Random(seed)
    mixed, stats = (
        [],
        {"records": 0, "by_source": {}, "by_teacher": Counter(), "by_domain": Counter(), "turns": Counter()},
    )
    tokens = 0
    for path, ratio in sources:
        records = draw(read_records(path), ratio, rng)
        stats["by_source"][str(path)] = len(records)
        for record in records:
            turns = record.get("conversations") or []
            stats["by_teacher"][record.get("teacher", "unknown")] += 1
            stats["by_domain"][record.get("domain") or "unknown"] += 1
            stats["turns"][len(turns) // 2] += 1
            tokens += sum(len(str(t.get("value", "")).split()) for t in turns if isinstance(t, dict))
        mixed += records
    rng.shuffle(mixed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(mixed, indent=1), encoding="utf-8")
    stats["records"] = len(mixed)
    stats["words"] = tokens
    stats["turns"] = {f"{k} question(s)": v for k, v in sorted(stats["turns"].items())}
    stats = {k: dict(v) if isinstance(v, Counter) else v for k, v in stats.items()}
    out.with_suffix(".stats.json").write_text(json.dumps(stats, indent=1), encoding="utf-8")
    return stats
