"""Does the multi-scale pyramid help fine detail? Train the demo recipes twice on the same phantoms with the
same budget, once with one scale (128 px) and once with the demo's pyramid (128/256/384 px, the paper's
1x/2x/3x), and score both on a fresh-seed test set split by the size of the largest lesion.

    python benchmarks/scale_ablation.py   # from the repository root; on 2 CPU cores about 20 minutes
                                          # when the demo's run exists, 50 from nothing
    python benchmarks/scale_ablation.py --pyramid-model src/llama3med/demo_model   # 35: one arm to train

Each arm's run directory is reused when it is complete, so an interrupted ablation picks up where it
stopped; the multi-scale arm is the demo model's own run (`runs/demo`), or with `--pyramid-model` a model
already trained so (`src/llama3med/demo_model` is that run's result). Besides each arm's scores, the
pyramid's gain over the single view comes with paired 95 % intervals (both arms' answers on the same
resampled test images, `llama3med.eval.paired_difference`). The table goes to docs/scale_ablation.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"single scale (128)": ("runs/ablation/single", [128]), "pyramid (128/256/384)": ("runs/demo", None)}
SIZES = ("none", "small", "medium", "large")


def llama3med(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "llama3med.cli", *args], check=True, cwd=ROOT)


def train_arm(runs: str, scales: list[int] | None, data: str) -> Path:
    previous = None
    for stage in ("tower", "pretrain", "finetune"):
        out = f"{runs}/{stage}"
        if not (ROOT / out / "train_summary.json").is_file():
            source = "conversations" if stage == "finetune" else "captions"
            overrides = [f"output_dir={out}", f"data.0.path={data}/{source}.json", f"data.0.image_root={data}/images"]
            if stage == "tower" and scales:
                overrides.append(f"model.scratch.scales={scales}")
            if previous:
                overrides.append(f"model={runs}/{previous}")
            resume = ["--resume"] if any((ROOT / out).glob("checkpoint-*")) else []
            llama3med("train", f"recipes/demo/{stage}.yaml", *[a for o in overrides for a in ("--set", o)], *resume)
        previous = stage
    return ROOT / runs / "finetune"


def scores_by_size(model_dir: Path, test: Path, out: Path) -> tuple[dict[str, dict], dict[str, str]]:
    from llama3med.checkpoints import load
    from llama3med.data.benchmarks import load_llava_med
    from llama3med.eval import closed_hit, run, score
    from llama3med.inference import best_device

    records = load_llava_med(test)
    sizes = {row["id"]: row["lesion_size"] for row in json.loads(test.read_text())}
    model, processor = load(model_dir, device=best_device())
    answers = run(model, processor, records, out / "answers.jsonl", model_id=model_dir.parent.name, max_new_tokens=8)
    table = {}
    for group in ("all", *SIZES):
        subset = [r for r in records if group in ("all", sizes[r.id])]
        table[group] = score(subset, {r.id: answers[r.id] for r in subset})
        presence = [r for r in subset if r.question_type == "presence"]
        table[group]["says_yes"] = sum(closed_hit(answers[r.id], "yes") for r in presence) / len(presence)
    return table, answers


def paired_gains(
    test: Path, pyramid: dict[str, str], single: dict[str, str]
) -> tuple[list[str], list[str], dict[tuple[str, str], list[float]]]:
    """Table rows: the pyramid's gain in closed accuracy and in presence accuracy, by largest lesion, each
    with its paired 95 % interval; a line for each gain whose interval leaves out 0; and the intervals."""
    from llama3med.data.benchmarks import load_llava_med
    from llama3med.eval import paired_difference

    records = load_llava_med(test)
    sizes = {row["id"]: row["lesion_size"] for row in json.loads(test.read_text())}
    rows, beyond, intervals = [], [], {}
    metrics = {"closed": lambda r: r.answer_type == "CLOSED", "presence": lambda r: r.question_type == "presence"}
    for group in ("all", *SIZES):
        cells = []
        for metric, keep in metrics.items():
            subset = [r for r in records if group in ("all", sizes[r.id]) and keep(r)]
            gain = paired_difference(subset, pyramid, single)["closed_accuracy"]
            low, high = intervals[group, metric] = gain["interval"]
            cells.append(f"{gain['difference']:+.3f} ({low:+.3f} to {high:+.3f})")
            if not low <= 0 <= high:
                beyond.append(f"- {metric.capitalize()}, {group} largest lesion: {cells[-1]}, beyond the test images.")
        rows.append(f"| {group} | {' | '.join(cells)} |")
    return rows, beyond, intervals


def cell(scores: dict, group: str, metric: str) -> str:
    value = scores.get(group, {}).get(metric)
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test-n", type=int, default=300, help="test phantoms (seed 1000)")
    parser.add_argument("--pyramid-model", default=None, help="the multi-scale arm's model, already trained")
    args = parser.parse_args()
    data, test = "runs/demo/data/train", ROOT / "runs/demo/data/test"
    if not (ROOT / data / "captions.json").is_file():
        llama3med("data", "phantoms", "--out", data, "--n", "3000", "--seed", "0", "--size", "384", "--format", "png")
    if not (test / "test.json").is_file():
        llama3med("data", "phantoms", "--out", str(test), "--n", str(args.test_n), "--seed", "1000", "--size", "384")

    results, answers = {}, {}
    for name, (runs, scales) in ARMS.items():
        given = args.pyramid_model if scales is None else None
        model_dir = Path(given) if given else train_arm(runs, scales, data)
        out = ROOT / "runs/ablation/eval" / Path(runs).name
        results[name], answers[name] = scores_by_size(model_dir, test / "test.json", out)

    lines = [
        "# Scale ablation: one 128 px view against the 128/256/384 px pyramid",
        "",
        "Same recipes (`recipes/demo/`: tower, pretrain, finetune), data (3000 phantoms, seed 0), seed and steps;",
        "only `scales` differs.",
        f"Test: {args.test_n} fresh phantoms (seed 1000), grouped by the size of the largest lesion",
        "(small lesions are 0.8-1.5 px in radius at 384 px, under half a pixel at 128 px).",
        "Closed = LLaVA-Med closed accuracy; presence = accuracy on 'Is there a lesion in this image?';",
        "count = open recall on 'How many lesions are visible?'; size = open recall on the largest lesion's",
        "size class; says yes = share of 'yes' answers to the presence question (a model that sees lesions",
        "says yes more often as lesions grow, and never for 'none').",
        "",
        "| largest lesion | arm | closed | presence | says yes | count | size |",
        "|---|---|---|---|---|---|---|",
    ]
    for group in ("all", *SIZES):
        for name, table in results.items():
            scores = table[group]
            lines.append(
                f"| {group} | {name} | {cell(scores, 'all', 'closed_accuracy')} "
                f"| {cell(scores, 'question_type=presence', 'closed_accuracy')} | {scores['says_yes']:.3f} "
                f"| {cell(scores, 'question_type=count', 'open_recall')} "
                f"| {cell(scores, 'question_type=size', 'open_recall')} |"
            )
    single_name, pyramid_name = results
    gain_rows, beyond, intervals = paired_gains(test / "test.json", answers[pyramid_name], answers[single_name])
    lines += [
        "",
        "The pyramid's gain (pyramid minus single scale), with paired 95 % intervals: both arms' answers on",
        "the same test images, resampled 1,000 times (an interval that excludes 0 is more than the choice of",
        "test images explains):",
        "",
        "| largest lesion | closed | presence |",
        "|---|---|---|",
        *gain_rows,
    ]
    lines += ["", "Reading:", ""]
    for name, table in results.items():
        gap = table["large"]["says_yes"] - table["none"]["says_yes"]
        verdict = "finds lesions" if gap > 0.2 else "does not find lesions: its yes/no answer does not depend on them"
        lines.append(f"- {name}: says yes {gap:+.2f} more often with a large lesion than with none, so it {verdict}.")
    (single, single_table), (pyramid, pyramid_table) = results.items()
    gain = {}
    for group in ("small", "medium", "large"):
        with_pyramid, with_single = (
            t[group]["question_type=presence"]["closed_accuracy"] for t in (pyramid_table, single_table)
        )
        gain[group] = with_pyramid - with_single
        lines.append(
            f"- Presence, {group} largest lesion: {with_pyramid:.3f} ({pyramid}), {with_single:.3f} ({single})."
        )
    lines += beyond
    if gain["medium"] >= 0.1 and abs(gain["large"]) <= 0.05:
        lines += [
            "",
            "The pyramid finds lesions that one 128 px view loses (a medium lesion is 2-4 px across there) and",
            "is level on large ones: it helps fine detail, as the paper claims. Neither arm finds most small",
            "lesions, too small for the demo tower's 16 px patches even at 384 px.",
        ]
    if intervals["none", "presence"][1] < 0:
        lines += [
            "",
            "On lesion-free slices the pyramid says yes more often than the single view, by more than the test",
            "images explain: it pays for the lesions it finds with some false alarms.",
        ]
    if all(t["large"]["says_yes"] - t["none"]["says_yes"] <= 0.2 for t in results.values()):
        lines += [
            "",
            "Neither arm sees lesions at this budget, so the table cannot show whether the pyramid helps:",
            "both answer about lesions from the training set's priors. A tower that finds lesions (pretrained,",
            "or trained far longer) is needed before the pyramid's effect on small lesions can be measured.",
        ]
    lines += [
        "",
        "Reproduce: `python benchmarks/scale_ablation.py` (see its docstring; `--pyramid-model "
        "src/llama3med/demo_model` takes the shipped demo as the pyramid arm and trains only the other).",
    ]
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "scale_ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
