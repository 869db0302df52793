"""Reports of an evaluation run: a table for the terminal, `report.md` and `report.json`; `answer`'s
`answers.csv`."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from ..data.benchmarks import OPTION_LETTERS, VQARecord
from ..processing import dicom_identifiers
from ..processing.images import DICOM_IDENTIFIERS, shown_frame
from .scoring import chosen_option, first_yes_or_no, option_probabilities, picked_option, question_score

COLUMNS = (
    ("closed", "closed_accuracy"),
    ("open (recall)", "open_recall"),
    ("open F1", "open_f1"),
    ("open exact", "open_exact_match"),
    ("open cand.", "open_candidate_accuracy"),
    ("BLEU-1", "open_bleu1"),
)


CHOICE_COLUMNS = (("choice", "choice_accuracy"), ("choice unread", "choice_unread"))


def score_table(scores: dict) -> tuple[list[str], list[list[str]]]:
    """The header and a row per group of a run's scores (percentages, then question counts): the
    LLaVA-Med protocol's columns where there are closed or open questions, the multiple-choice ones
    where there are such."""
    overall = scores["all"]
    vqa, choice = bool(overall["n_closed"] or overall["n_open"]), bool(overall.get("n_choice"))
    columns = (*(COLUMNS if vqa else ()), *(CHOICE_COLUMNS if choice else ()))
    counts = (*(("n_closed", "n_open") if vqa else ()), *(("n_choice",) if choice else ()))
    header = ["group", *(name for name, _ in columns), *(count.replace("_", " ") for count in counts)]
    rows = []
    for group, values in scores.items():
        cells = [f"{100 * values[key]:.2f}" if key in values else "-" for _, key in columns]
        rows.append([group, *cells, *(str(values.get(count, 0)) for count in counts)])
    return header, rows


HEADLINE_LABELS = {"closed_accuracy": "closed", "open_recall": "open (recall)", "choice_accuracy": "choice"}


def interval_line(intervals: dict) -> str:
    """One sentence giving the whole set's intervals, in percent."""
    parts = [
        f"{label} {100 * intervals[key][0]:.2f}-{100 * intervals[key][1]:.2f}"
        for key, label in HEADLINE_LABELS.items()
        if key in intervals
    ]
    return (
        f"{100 * intervals['level']:.0f} % intervals, all questions (bootstrap over images, "
        f"{intervals['resamples']} resamples): {', '.join(parts)}"
    )


def difference_lines(difference: dict) -> list[str]:
    """One line per headline metric of a paired difference, in percentage points."""
    lines = []
    for key, label in HEADLINE_LABELS.items():
        if key in difference:
            low, high = (100 * bound for bound in difference[key]["interval"])
            verdict = "" if low <= 0 <= high else ", more than the test images explain"
            lines.append(
                f"  {label}: {100 * difference[key]['difference']:+.2f} points "
                f"({100 * difference['level']:.0f} % interval {low:+.2f} to {high:+.2f}{verdict})"
            )
    return lines


def choice_calibration_line(result: dict) -> str:
    """One sentence giving how sure ranked multiple-choice answers were against how often right."""
    return (
        f"ranked options ({result['n']} questions): picked with a mean probability {result['mean_confidence']:.3f}, "
        f"right {100 * result['accuracy']:.2f} %; calibration: Brier {result['brier']:.3f}, "
        f"ECE {result['ece']:.3f} ({result['ece_bins']} bins)"
    )


def auroc_line(result: dict) -> str:
    """One sentence giving the closed yes/no questions' AUROC by P(yes)."""
    low, high = result["interval"]
    line = (
        f"closed yes/no questions ranked by P(yes): AUROC {result['auroc']:.3f} "
        f"({100 * result['level']:.0f} % interval {low:.3f}-{high:.3f}; {result['n_yes']} yes, {result['n_no']} no)"
    )
    if "brier" in result:  # reports written before calibration was measured have none
        line += f"; calibration: Brier {result['brier']:.3f}, ECE {result['ece']:.3f} ({result['ece_bins']} bins)"
    return line


def format_table(
    scores: dict,
    baseline: float | None = None,
    intervals: dict | None = None,
    closed_auroc: dict | None = None,
    chance: float | None = None,
    choice_calibration: dict | None = None,
) -> str:
    """A plain-text table (percentages) of every group's scores, with the closed questions' majority
    baseline and the multiple-choice questions' chance accuracy where given."""
    header, rows = score_table(scores)
    rows = [header, *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    if intervals is not None:
        lines.append(interval_line(intervals))
    if closed_auroc is not None:
        lines.append(auroc_line(closed_auroc))
    if baseline is not None:
        lines.append(f"majority-answer baseline, closed: {100 * baseline:.2f}")
    if chance is not None:
        lines.append(f"chance, multiple choice: {100 * chance:.2f}")
    if choice_calibration is not None:
        lines.append(choice_calibration_line(choice_calibration))
    return "\n".join(lines)


PUBLISHED_FIGURES = {"open": "open_recall", "closed": "closed_accuracy", "choice": "choice_accuracy"}


def load_published(path: str | Path) -> dict:
    """Published results to print beside ours: YAML or JSON with a `source` and `rows` of `model`,
    `benchmark`, and `open` (recall, percent) and `closed` (accuracy, percent), or for a multiple-choice
    benchmark `choice` (accuracy, percent); see docs/evaluation.md."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: published results file not found")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("source"), str) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path}: expected a mapping with 'source' (text) and 'rows' (a list)")
    for number, row in enumerate(data["rows"]):
        figures = ("choice",) if isinstance(row, dict) and "choice" in row else ("open", "closed")
        for key, kind in (("model", str), ("benchmark", str), *((figure, (int, float)) for figure in figures)):
            if not isinstance(row, dict) or not isinstance(row.get(key), kind) or isinstance(row.get(key), bool):
                expected = "text" if kind is str else "number (percent)"
                raise ValueError(f"{path}: row {number}: '{key}' is missing or not a {expected}")
    return data


def comparison_columns(report: dict) -> list[str]:
    """The published figures a run is compared on: choice where it has multiple-choice questions, open
    and closed unless it has only those."""
    ours = report["scores"]["all"]
    choice = bool(ours.get("n_choice"))
    vqa = ["open", "closed"] if not choice or ours.get("n_open") or ours.get("n_closed") else []
    return vqa + (["choice"] if choice else [])


def comparison_rows(report: dict, published: dict) -> list[list[str]]:
    """`[model, figure, ...]` rows in percent, a figure per `comparison_columns`: this run first, then
    the published rows of its benchmark. A published figure outside this run's interval is marked `*`:
    it differs from ours by more than resampling the test images would explain."""
    ours, intervals = report["scores"]["all"], report.get("intervals", {})
    keys = [PUBLISHED_FIGURES[column] for column in comparison_columns(report)]
    cells = [f"{100 * ours[k]:.2f}" if k in ours else "-" for k in keys]
    rows = [[f"this run ({report['model']})", *cells]]
    for row in published["rows"]:
        if row["benchmark"] == report["benchmark"]:
            figures = []
            for column in comparison_columns(report):
                if (value := row.get(column)) is None:
                    figures.append("-")
                    continue
                low, high = intervals.get(PUBLISHED_FIGURES[column], (0.0, 1.0))
                figures.append(f"{value:.2f}" + ("" if 100 * low <= value <= 100 * high else " *"))
            rows.append([row["model"], *figures])
    return rows


def decoding_words(sampling: dict | None) -> str:
    """How the answers were decoded, for a report: greedy, or the sampling settings."""
    if sampling is None:
        return "greedy decoding"
    return f"sampled at temperature {sampling['temperature']:g}, top-p {sampling['top_p']:g}, seed {sampling['seed']}"


def _shortened(text: str, limit: int = 40) -> str:
    """`text` quoted, cut to `limit` characters with an ellipsis, to name a run in a table's row."""
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def write_report(out: Path, report: dict) -> None:
    """`report.json` (everything) and `report.md` (the table, with what was run)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    header, rows = score_table(report["scores"])
    lines = [
        f"# {report['benchmark']}: {report['model']}",
        "",
        f"Prompt `{report['prompt']}`"
        + (f" after the system message {report['system']!r}" if report.get("system") else "")
        + f", {decoding_words(report.get('sampling'))}"
        + (", multiple-choice options ranked by the model's likelihood" if report.get("rank_options") else "")
        + (", multiple-choice questions asked without their options" if report.get("without_options") else "")
        + ", LLaVA-Med scoring (percent).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    if report.get("intervals"):
        lines += ["", interval_line(report["intervals"]) + "."]
    if report.get("closed_auroc"):
        lines += ["", auroc_line(report["closed_auroc"]) + "."]
    if report.get("majority_closed_baseline") is not None:
        lines += ["", f"Majority-answer baseline on closed questions: {100 * report['majority_closed_baseline']:.2f}"]
    if report.get("choice_chance") is not None:
        lines += ["", f"Chance on multiple-choice questions: {100 * report['choice_chance']:.2f}"]
    if report.get("choice_calibration"):
        lines += ["", choice_calibration_line(report["choice_calibration"]) + "."]
    if report.get("candidates"):
        lines += ["", f"Candidate accuracy maps answers onto {report['candidates']}."]
    if published := report.get("published"):
        lines += ["", "## Beside published results", "", f"Source: {published['source']}", ""]
        columns = [{"open": "open (recall)"}.get(column, column) for column in comparison_columns(report)]
        lines += ["| " + " | ".join(["model", *columns]) + " |", "|---|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(row) + " |" for row in comparison_rows(report, published)]
        if report.get("intervals"):
            lines += [
                "",
                "`*`: outside this run's interval, a difference resampling the test images would not explain.",
            ]
    (out / "report.md").write_text("\n".join(lines) + "\n")


TABLE_FORMATS = ("markdown", "latex", "csv")
BENCHMARK_NAMES = {
    "vqa-rad": "VQA-RAD",
    "slake": "SLAKE",
    "pathvqa": "PathVQA",
    "pmc-vqa": "PMC-VQA",
    "omnimedvqa": "OmniMedVQA",
    "llava-med": "LLaVA-Med format",
}


def read_reports(runs: list[str | Path]) -> list[dict]:
    """The `report.json` of each run (its folder or the file), with `run` set to where it was read."""
    reports = []
    for run in runs:
        path = Path(run) / "report.json" if Path(run).is_dir() else Path(run)
        if not path.is_file():
            raise ValueError(f"{run}: no report.json (is it the --out of a finished eval?)")
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not JSON ({err})") from None
        if not isinstance(report, dict) or not isinstance(report.get("scores", {}).get("all"), dict):
            raise ValueError(f"{path}: not an eval report (no scores.all)")
        reports.append({**report, "run": str(run)})
    return reports


def results_table(
    reports: list[dict], published: dict | None = None, intervals: bool = False, auroc: bool = False
) -> tuple[list[str], list[list[str]]]:
    """The papers' results table: a row per model (and prompt, where not plain), an open-recall and a
    closed-accuracy column per benchmark, in percent, and with `auroc` the closed yes/no AUROC by P(yes);
    a multiple-choice accuracy column for a benchmark with such questions (PMC-VQA's only column); then
    the published rows, if any. A cell without a figure is "-"; with `intervals`, ours carry their
    95 % interval."""
    from ..data.benchmarks import BENCHMARKS

    present = {r["benchmark"] for r in [*reports, *(published or {}).get("rows", [])]}
    benchmarks = [b for b in BENCHMARKS if b in present]
    cells: dict[str, dict[tuple[str, str], str]] = {}
    runs: dict[tuple[str, str], str] = {}
    has_vqa, has_choice = set(), set()
    for report in reports:
        label = report["model"] + ("" if report.get("prompt", "plain") == "plain" else f" ({report['prompt']} prompt)")
        label += f" (system {_shortened(report['system'])})" if report.get("system") else ""
        label += " (options ranked)" if report.get("rank_options") else ""
        label += " (without options)" if report.get("without_options") else ""
        benchmark = report["benchmark"]
        if (label, benchmark) in runs:
            raise ValueError(f"{report['run']} and {runs[label, benchmark]}: two runs of {label} on {benchmark}")
        runs[label, benchmark] = report["run"]
        scores, bounds = report["scores"]["all"], report.get("intervals", {})
        if scores.get("n_open") or scores.get("n_closed"):
            has_vqa.add(benchmark)
        if scores.get("n_choice"):
            has_choice.add(benchmark)
        row = cells.setdefault(label, {})
        for column, key in (("open", "open_recall"), ("closed", "closed_accuracy"), ("choice", "choice_accuracy")):
            row[benchmark, column] = _percent(scores.get(key), bounds.get(key) if intervals else None)
        row[benchmark, "AUROC"] = _auroc_cell(report.get("closed_auroc"), intervals)
    for entry in (published or {}).get("rows", []):
        figures = {column: f"{entry[column]:.2f}" for column in PUBLISHED_FIGURES if column in entry}
        (has_choice if "choice" in figures else has_vqa).add(entry["benchmark"])
        cells.setdefault(f"{entry['model']} (published)", {}).update(
            {(entry["benchmark"], column): figure for column, figure in figures.items()}
        )
    vqa_columns = ("open", "closed", "AUROC") if auroc else ("open", "closed")
    columns = [
        (b, column)
        for b in benchmarks
        for column in (*(vqa_columns if b in has_vqa else ()), *(("choice",) if b in has_choice else ()))
    ]
    header = ["model", *(f"{BENCHMARK_NAMES[b]} {column}" for b, column in columns)]
    rows = [[label, *(row.get(column, "-") for column in columns)] for label, row in cells.items()]
    return header, rows


def _auroc_cell(result: dict | None, interval: bool) -> str:
    if result is None:
        return "-"
    text = f"{result['auroc']:.3f}"
    return f"{text} ({result['interval'][0]:.3f}-{result['interval'][1]:.3f})" if interval else text


def _percent(value: float | None, interval: list[float] | None) -> str:
    if value is None:
        return "-"
    text = f"{100 * value:.2f}"
    return text if interval is None else f"{text} ({100 * interval[0]:.1f}-{100 * interval[1]:.1f})"


def render_table(header: list[str], rows: list[list[str]], style: str = "markdown") -> str:
    """The table as Markdown, LaTeX (a `tabular`, for a paper) or CSV."""
    if style == "csv":
        import csv
        import io

        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows([header, *rows])
        return buffer.getvalue().rstrip("\n")
    if style == "latex":

        def escape(cell: str) -> str:
            return cell.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("&", r"\&").replace("%", r"\%")

        lines = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule"]
        lines += [" & ".join(map(escape, header)) + r" \\", r"\midrule"]
        lines += [" & ".join(map(escape, row)) + r" \\" for row in rows]
        return "\n".join([*lines, r"\bottomrule", r"\end{tabular}"])
    if style != "markdown":
        raise ValueError(f"table format must be one of {', '.join(TABLE_FORMATS)}, got {style!r}")
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


ANSWER_TABLE_COLUMNS = (
    "question_id",
    "image",
    "frame",
    "window",
    "question",
    "answer",
    "p_yes",
    "option",
    "option_probabilities",
    *DICOM_IDENTIFIERS,
)
SLICE_SUMMARY_COLUMNS = (
    "image",
    "question",
    "slices",
    "answered_yes",
    "answered_no",
    "max_p_yes",
    "frame_of_max_p_yes",
    *DICOM_IDENTIFIERS,
)


REFERENCE_COLUMNS = ("reference", "answer_type", "question_type", "score")  # `eval`'s, after the answer


def write_answer_tables(records: Sequence[VQARecord], answers: Mapping[str, dict], out: Path) -> list[Path]:
    """`answers.csv` in `out`: each question answered in `answers` (the rows of `answers.jsonl`, by id) in
    the records' order, with its image and, for DICOM, the modality and UIDs of the image shown
    (`dicom_identifiers`), for a spreadsheet or a join with the RIS. Records with references (a
    benchmark's) also get `REFERENCE_COLUMNS`: the reference, the kinds of question, and the answer's
    `question_score` (1 or 0, or an open answer's recall), so that a filter finds the errors a score
    hides. Where a question was asked about several slices of an image (`answer --slice-step`), also
    `answers_by_image.csv`: per image and question, how many slices were answered yes and no, and the
    slice of the highest P(yes) with its UIDs, the one to open first. Made again from all the answers at
    the end of every run; returns the files written."""
    identifiers: dict[str, list[dict[str, str]]] = {}  # by image, for each of its slices
    rows, by_image = [], {}
    for record in records:
        if (answer := answers.get(record.id)) is None:
            continue
        image = "" if isinstance(record.image, bytes) else str(record.image)
        if image not in identifiers:
            identifiers[image] = dicom_identifiers(record.image) if image else []
        slices = identifiers[image]
        if len(slices) > 1:  # a series: the slice shown
            shown = slices[shown_frame(len(slices), record.frame)]
        else:  # one file, whichever its frame
            shown = slices[0] if slices else {}
        p_yes = (answer.get("metadata") or {}).get("p_yes")
        option, probabilities = _option_cells(record, answer)
        row = {
            "question_id": record.id,
            "image": image,
            "frame": "" if record.frame is None else record.frame,
            "window": "" if record.window is None else record.window,
            "question": record.question,
            "answer": answer["text"],
            "p_yes": "" if p_yes is None else p_yes,
            "option": option,
            "option_probabilities": probabilities,
            **shown,
        }
        if record.answer_type:  # a reference to score against
            row |= {"reference": record.answer, "answer_type": record.answer_type}
            row |= {"question_type": record.question_type or "", "score": question_score(record, answer["text"])}
        rows.append(row)
        by_image.setdefault((image, record.question), []).append(row)
    written = [out / "answers.csv"]
    columns = list(ANSWER_TABLE_COLUMNS)
    if any(record.answer_type for record in records):
        columns[columns.index("answer") + 1 : columns.index("answer") + 1] = REFERENCE_COLUMNS
    _write_csv(written[0], columns, rows)
    if any(len({row["frame"] for row in group}) > 1 for group in by_image.values()):  # asked about slices
        written.append(out / "answers_by_image.csv")
        _write_csv(written[1], SLICE_SUMMARY_COLUMNS, [_slice_summary(group) for group in by_image.values()])
    return written


def _option_cells(record: VQARecord, answer: dict) -> tuple[str, str]:
    """A multiple-choice answer's option (its text; "" if it picked none) and, where the options were
    ranked, each one's probability among them as JSON (`{"liver": 0.91, ...}`), for a spreadsheet."""
    if not record.options:
        return "", ""
    scores = (answer.get("metadata") or {}).get("option_log_probs")
    if not scores:
        letter = chosen_option(answer["text"], record.options)
        return ("" if letter is None else record.options[OPTION_LETTERS.index(letter)]), ""
    probabilities = dict(zip(record.options, option_probabilities(scores), strict=True))
    return picked_option(record, scores), json.dumps(probabilities)


def _slice_summary(group: list[dict]) -> dict:
    """One image's answers to one question over its slices, as `answers_by_image.csv` has them."""
    verdicts = [first_yes_or_no(row["answer"]) for row in group]
    ranked = [row for row in group if row["p_yes"] != ""]
    top = max(ranked, key=lambda row: row["p_yes"]) if ranked else {}
    return {
        "image": group[0]["image"],
        "question": group[0]["question"],
        "slices": len(group),
        "answered_yes": verdicts.count("yes"),
        "answered_no": verdicts.count("no"),
        "max_p_yes": top.get("p_yes", ""),
        "frame_of_max_p_yes": top.get("frame", ""),
        **{name: (top or group[0]).get(name, "") for name in DICOM_IDENTIFIERS},
    }


def _write_csv(path: Path, columns: Sequence[str], rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8")
