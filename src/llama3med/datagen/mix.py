"""`llama3med datagen mix`: one finetune set from several conversation sources (e.g. llava-med-instruct-60k,
the Claude set, the Llama-3 set) by ratio and seed, with a stats report."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ..data.conversations import domain_name, draw, read_records


def mix(sources: list[tuple[Path, float]], out: str | Path, seed: int = 0, licenses: Sequence[str] = ()) -> dict:
    """Write the mixture (JSON list, shuffled) and return its stats: records per source, teacher, domain,
    license and number of turns, and whitespace-token totals. With `licenses`, only records whose
    `license` contains one of them are drawn (e.g. `creativecommons.org/licenses/by/` keeps CC BY and
    not CC BY-NC); records that name no license are left out too."""
    rng = random.Random(seed)
    mixed, stats = (
        [],
        {
            "records": 0,
            "by_source": {},
            "by_teacher": Counter(),
            "by_domain": Counter(),
            "by_license": Counter(),
            "turns": Counter(),
        },
    )
    if licenses:
        stats["left_out_for_license"] = 0
    tokens = 0
    for path, ratio in sources:
        records = read_records(path)
        if licenses:
            allowed = [r for r in records if any(wanted in str(r.get("license") or "") for wanted in licenses)]
            stats["left_out_for_license"] += len(records) - len(allowed)
            records = allowed
        records = draw(records, ratio, rng)
        stats["by_source"][str(path)] = len(records)
        for record in records:
            turns = record.get("conversations") or []
            stats["by_teacher"][record.get("teacher", "unknown")] += 1
            stats["by_domain"][domain_name(record.get("domain")) or "unknown"] += 1
            stats["by_license"][record.get("license") or "unknown"] += 1
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
