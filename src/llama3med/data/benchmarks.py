"""Benchmark loaders: each yields `VQARecord`s, one record type for every dataset and layout.

Closed questions are yes/no questions (LLaVA-Med's `answer_type` CLOSED); multiple-choice questions
(CHOICE: PMC-VQA's and OmniMedVQA's, or a record with `options`) have lettered options and the right one's letter as
their answer; open questions are the rest.
Malformed input is refused with the file and record named, never silently dropped: a benchmark number
over a silently shrunken test set would not be comparable.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import pickle
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ..model_card import looks_like_hub_id
from ..processing import IMAGE_PLACEHOLDER, find_images, frame_count
from ..processing.images import Window
from .conversations import read_records, record_frame, record_window, write_atomically

ANSWER_TYPES = ("OPEN", "CLOSED", "CHOICE")
BENCHMARKS = ("vqa-rad", "slake", "pathvqa", "pmc-vqa", "omnimedvqa", "llava-med")
OPTION_LETTERS = "ABCDEFGH"  # a multiple-choice question's options, in order


@dataclass(frozen=True)
class VQARecord:
    id: str
    image: Path | bytes  # a file, or the encoded bytes embedded in a parquet file
    question: str
    answer: str  # the reference (CHOICE: the right option's letter); "" for a question asked without one
    answer_type: str  # OPEN, CLOSED or CHOICE; "" without a reference
    dataset: str
    split: str = "test"
    question_type: str | None = None
    frame: int | None = None  # a volume's or series' slice, a multi-frame DICOM's frame; None: the middle
    window: Window = None  # DICOM/NIfTI: (centre, width) or a CT preset; None: the file's own display
    options: tuple[str, ...] = ()  # CHOICE: the options' texts, lettered A, B, ... in this order
    strata: tuple[tuple[str, str], ...] = ()  # the release's other groupings: SLAKE's modality, VQA-RAD's organ
    image_key: str = field(default="", compare=False)  # identifies the image as shown, for encoding it once

    def __post_init__(self) -> None:
        if not self.image_key:
            key = hashlib.sha1(self.image).hexdigest() if isinstance(self.image, bytes) else str(self.image)
            key += "" if self.frame is None else f"#frame={self.frame}"
            object.__setattr__(self, "image_key", key + ("" if self.window is None else f"#window={self.window}"))


PROMPT_STYLES = {  # how a question is put to the model, in `eval` and in the conversations made to tune on
    "plain": "{question}",
    "short": "{question}\nAnswer the question using a single word or phrase.",
}


CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def prompt_text(record: VQARecord, style: str, options: bool = True) -> str:
    """The question as the model is asked it. A multiple-choice question is asked as LLaVA-1.5 asks
    ScienceQA's and MMBench's, whatever the style: the question, a line per option ("A. liver"), and
    `CHOICE_INSTRUCTION`; with `options=False` as an open question (to rank its options' texts)."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {sorted(PROMPT_STYLES)}, got {style!r}")
    if record.options and options:
        lines = [f"{OPTION_LETTERS[i]}. {text}" for i, text in enumerate(record.options)]
        return "\n".join([record.question, *lines, CHOICE_INSTRUCTION])
    return PROMPT_STYLES[style].format(question=record.question)


def without_options(records: Sequence[VQARecord]) -> list[VQARecord]:
    """Multiple-choice records as open questions: asked without their options, the right option's text
    their reference (PMC-VQA's "blank" setting, beside its "choice" one); other records unchanged."""
    return [
        replace(r, answer=r.options[OPTION_LETTERS.index(r.answer)], answer_type="OPEN", options=())
        if r.answer_type == "CHOICE"
        else r
        for r in records
    ]


def answer_type_of(answer: str) -> str:
    """Where a dataset gives no type: yes/no answers are closed, everything else open."""
    return "CLOSED" if answer.strip().lower() in ("yes", "no") else "OPEN"


def _text(value, name: str, what: str) -> str:
    text = "" if value is None else str(value).strip()
    if not text:
        raise ValueError(f"{name}: empty {what}")
    return text


def _answer_type(value, answer: str, name: str) -> str:
    answer_type = str(value).upper() if value else answer_type_of(answer)
    if answer_type == "CHOICE":
        raise ValueError(f"{name}: answer_type CHOICE needs the question's 'options'")
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"{name}: answer_type must be OPEN or CLOSED, got {value!r}")
    return answer_type


def option_texts(values: Sequence, name: str) -> tuple[str, ...]:
    """A multiple-choice record's option texts, each stripped of a leading copy of its own letter
    ("A:liver", "B. kidney", as PMC-VQA writes them); empty ones at the end (a question with fewer
    options than the table has columns) are dropped, an empty one before another refused."""
    if len(values) > len(OPTION_LETTERS):
        raise ValueError(f"{name}: a multiple-choice question has at most {len(OPTION_LETTERS)} options")
    options = [
        re.sub(rf"^\(?{letter}\s*[:.)]", "", "" if value is None else str(value).strip()).strip()
        for letter, value in zip(OPTION_LETTERS, values, strict=False)
    ]
    while options and not options[-1]:
        options.pop()
    if len(options) < 2:
        raise ValueError(f"{name}: a multiple-choice question needs 2 to {len(OPTION_LETTERS)} options")
    if empty := [letter for letter, option in zip(OPTION_LETTERS, options, strict=False) if not option]:
        raise ValueError(f"{name}: empty option {empty[0]}")
    if repeated := sorted({option for option in options if options.count(option) > 1}):
        raise ValueError(f"{name}: option {repeated[0]!r} is given twice")
    return tuple(options)


def _choice_answer(answer, options: tuple[str, ...], name: str) -> str:
    """The right option's letter, given as the letter ("B", "(B)", "B.", "B:kidney") or as the option's text."""
    text = _text(answer, name, "answer")
    lettered = re.match(rf"^\(?([{OPTION_LETTERS[: len(options)]}])(?:[.:)]|\s*$)", text)
    if lettered:
        return lettered.group(1)
    matches = [i for i, option in enumerate(options) if option.casefold() == text.casefold()]
    if len(matches) != 1:
        raise ValueError(f"{name}: answer {text!r} is neither an option's letter nor exactly one option's text")
    return OPTION_LETTERS[matches[0]]


def _strata(raw: dict, fields: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """`(name, value)` of each of a record's `fields` (name -> the release's key) that it fills."""
    return tuple((name, str(raw[key]).strip()) for name, key in fields.items() if str(raw.get(key) or "").strip())


def _image_file(root: Path, relative, name: str, check: bool) -> Path:
    image = root / _text(relative, name, "image name")
    if check and not image.exists():  # a file, or a directory of one DICOM series
        raise ValueError(f"{name}: image {image} not found")
    return image


def _unique(records: list[VQARecord], source: Path) -> list[VQARecord]:
    seen = set()
    for record in records:
        if record.id in seen:
            raise ValueError(f"{source}: record {record.id}: duplicate id")
        seen.add(record.id)
    if not records:
        raise ValueError(f"{source}: no records")
    return records


def _default_image_root(path: Path, image_root: str | Path | None) -> Path:
    """`image_root`, else the file's `images/` folder when it exists, else the file's own folder."""
    if image_root is not None:
        return Path(image_root)
    return path.parent / "images" if (path.parent / "images").is_dir() else path.parent


def load_llava_med(
    path: str | Path, image_root: str | Path | None = None, dataset: str = "llava-med", check_images: bool = True
) -> list[VQARecord]:
    """LLaVA-Med's evaluation format: `[{id, image, conversations: [human, gpt], answer_type}]`. A record
    with `options` (a list of texts) is a multiple-choice question: its answer is the right option's
    letter or text, and the options are put to the model as `prompt_text` words them.

    Images are looked up under `image_root`, by default the file's `images/` folder when it exists, else
    the file's own folder.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: benchmark file not found")
    image_root = _default_image_root(path, image_root)
    records = []
    for position, raw in enumerate(read_records(path)):
        name = f"{path}: record {raw.get('id', f'#{position}')}"
        turns = raw.get("conversations") or raw.get("conversatons")  # a typo some released files carry
        if not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, dict) for t in turns[:2]):
            raise ValueError(f"{name}: needs conversations with a question and an answer")
        question = _text(str(turns[0].get("value", "")).replace(IMAGE_PLACEHOLDER, ""), name, "question")
        answer = _text(turns[1].get("value"), name, "answer")
        if "id" not in raw:
            raise ValueError(f"{name}: needs an 'id'")
        question_type = str(raw["question_type"]) if raw.get("question_type") else None
        options = raw.get("options")
        if options is not None:
            if not isinstance(options, list):
                raise ValueError(f"{name}: options must be a list of texts")
            options = option_texts(options, name)
            answer = _choice_answer(answer, options, name)
            if raw.get("answer_type") and str(raw["answer_type"]).upper() != "CHOICE":
                raise ValueError(f"{name}: a record with options has answer_type CHOICE, got {raw['answer_type']!r}")
        records.append(
            VQARecord(
                str(raw["id"]),
                _image_file(image_root, raw.get("image"), name, check_images),
                question,
                answer,
                "CHOICE" if options else _answer_type(raw.get("answer_type"), answer, name),
                dataset,
                "test",
                question_type,
                record_frame(raw, name),
                record_window(raw, name),
                options or (),
            )
        )
    return _unique(records, path)


def load_questions(path: str | Path, image_root: str | Path | None = None, window: Window = None) -> list[VQARecord]:
    """Questions to answer without references, in LLaVA-Med's `model_vqa` question format (JSON or
    JSONL): `{question_id, image, text}` per record (`id` and `question` are read too), with an optional
    `frame` and `window` (else `window`), and `options` (a list of texts) for a multiple-choice question;
    images are looked up as `load_llava_med` looks them up."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: questions file not found")
    root = _default_image_root(path, image_root)
    records = []
    for position, raw in enumerate(read_records(path)):
        qid = raw.get("question_id", raw.get("id"))
        name = f"{path}: record {qid if qid is not None else f'#{position}'}"
        if qid is None:
            raise ValueError(f"{name}: needs a 'question_id'")
        text = raw.get("text", raw.get("question"))
        question = _text(None if text is None else str(text).replace(IMAGE_PLACEHOLDER, ""), name, "question")
        image = _image_file(root, raw.get("image"), name, check=True)
        shown = {"frame": record_frame(raw, name), "window": record_window(raw, name) or window}
        options = raw.get("options")
        if options is not None and not isinstance(options, list):
            raise ValueError(f"{name}: options must be a list of texts")
        shown["options"] = option_texts(options, name) if options else ()
        records.append(VQARecord(str(qid), image, question, "", "", "questions", **shown))
    return _unique(records, path)


def folder_questions(
    root: str | Path,
    questions: Sequence[str],
    window: Window = None,
    slice_step: int | None = None,
    options: Sequence[str] = (),
) -> list[VQARecord]:
    """Each question about every image in the folder tree `root` (a series folder, a DICOM, NIfTI, PNG or
    JPEG file: see `find_images`), image by image, DICOM and NIfTI shown through `window`. A series or a
    volume is asked about at its middle slice, or with `slice_step` at every that many slices from the
    feet (a multi-frame DICOM at its frames). A question's id is its image's path within `root`, with
    `@K` after it for slice K and `#N` for the Nth of several questions. With `options`, each question
    is a multiple-choice one among them (a zero-shot classification of the folder)."""
    root = Path(root)
    images = find_images(root, progress=True)
    if not images:
        raise ValueError(f"{root}: no images in the folder (DICOM, NIfTI, PNG, JPEG, TIFF)")
    texts = [_text(q.replace(IMAGE_PLACEHOLDER, ""), f"--question {q!r}", "question") for q in questions]
    choices = option_texts(options, "--option") if options else ()
    records = []
    for image in tqdm(images, desc="counting slices", unit="image", disable=slice_step is None, leave=False):
        name = image.relative_to(root).as_posix() if image != root else root.name
        count = 1 if slice_step is None else frame_count(image)
        for frame in [None] if count == 1 else range(0, count, slice_step):
            shown = name if frame is None else f"{name}@{frame}"
            for number, text in enumerate(texts, start=1):
                qid = shown if len(texts) == 1 else f"{shown}#{number}"
                asked = {"frame": frame, "window": window, "options": choices}
                records.append(VQARecord(qid, image, text, "", "", "questions", **asked))
    return records


def load_vqa_rad(
    path: str | Path, split: str = "test", image_root: str | Path | None = None, check_images: bool = True
) -> list[VQARecord]:
    """VQA-RAD: the official `VQA_RAD Dataset Public.json` (test = rows whose `phrase_type` starts with
    "test"; images in `VQA_RAD Image Folder/` beside it), or the Hugging Face parquet layout."""
    path = Path(path)
    if path.is_dir() and (path / "data").is_dir():
        return _load_parquet(path, split, "vqa-rad")
    if path.is_dir():
        path = path / "VQA_RAD Dataset Public.json"
    if not path.is_file():
        raise ValueError(f"{path}: VQA-RAD file not found (the official JSON or a parquet folder with data/)")
    image_root = Path(image_root) if image_root else path.parent / "VQA_RAD Image Folder"
    rows = json.loads(path.read_text(encoding="utf-8"))
    records = []
    for position, raw in enumerate(rows):
        name = f"{path}: record {raw.get('qid', f'#{position}')}"
        is_test = str(raw.get("phrase_type", "")).startswith("test")
        if is_test != (split == "test"):
            continue
        answer = _text(raw.get("answer"), name, "answer")
        records.append(
            VQARecord(
                str(raw.get("qid", position)),
                _image_file(image_root, raw.get("image_name"), name, check_images),
                _text(raw.get("question"), name, "question"),
                answer,
                _answer_type(raw.get("answer_type"), answer, name),
                "vqa-rad",
                split,
                raw.get("question_type") and str(raw["question_type"]),
                strata=_strata(raw, {"organ": "image_organ"}),
            )
        )
    return _unique(records, path)


def load_slake(
    path: str | Path, split: str = "test", language: str | None = "en", check_images: bool = True
) -> list[VQARecord]:
    """SLAKE 1.0 (`train.json`/`validate.json`/`test.json` and `imgs/`); English questions by default
    (`language=None` keeps both)."""
    root = Path(path)
    file = root / f"{split}.json" if root.is_dir() else root
    root = file.parent
    if not file.is_file():
        raise ValueError(f"{file}: SLAKE split file not found")
    image_of = _slake_images(root, check_images)
    records = []
    for position, raw in enumerate(json.loads(file.read_text(encoding="utf-8"))):
        name = f"{file}: record {raw.get('qid', f'#{position}')}"
        if language is not None and raw.get("q_lang") != language:
            continue
        answer = _text(raw.get("answer"), name, "answer")
        records.append(
            VQARecord(
                str(raw.get("qid", position)),
                image_of(raw.get("img_name"), name),
                _text(raw.get("question"), name, "question"),
                answer,
                _answer_type(raw.get("answer_type"), answer, name),
                "slake",
                split,
                raw.get("content_type") and str(raw["content_type"]),
                strata=_strata(raw, {"modality": "modality", "location": "location"}),
            )
        )
    return _unique(records, file)


def _slake_images(root: Path, check: bool):
    """SLAKE's image lookup: files under `imgs/`, or, where the release is still zipped as the Hugging
    Face copy keeps it, the images inside `imgs.zip`, read once each."""
    archive = root / "imgs.zip"
    if (root / "imgs").is_dir() or not archive.is_file():
        return lambda relative, name: _image_file(root / "imgs", relative, name, check)
    with zipfile.ZipFile(archive) as images:
        members = set(images.namelist())
    read: dict[str, bytes] = {}

    def image_of(relative, name: str) -> Path | bytes:
        member = f"imgs/{_text(relative, name, 'image name')}"
        if member not in members:
            if check:
                raise ValueError(f"{name}: image {member} not found in {archive}")
            return archive / member
        if member not in read:
            with zipfile.ZipFile(archive) as images:  # opened per image, so no handle outlives the load
                read[member] = images.read(member)
        return read[member]

    return image_of


PMC_VQA_IMAGE_FOLDERS = ("images", "figures", "images_2")  # where PMC-VQA's image archives unpack


def load_pmc_vqa(
    path: str | Path, split: str = "test", image_root: str | Path | None = None, check_images: bool = True
) -> list[VQARecord]:
    """PMC-VQA's multiple-choice questions: a release CSV (`Figure_path`, `Question`, `Choice A` to
    `Choice D`, and the right option as `Answer_label` or `Answer`, a letter or the option's text), or
    the release folder, whose `SPLIT.csv` is read (`--split test_2` reads `test_2.csv`). Images are
    under `image_root`, by default the CSV's first folder of `PMC_VQA_IMAGE_FOLDERS` that exists.
    Records are numbered by row, as the release gives no question ids."""
    path = Path(path)
    file = path / f"{split}.csv" if path.is_dir() else path
    if not file.is_file():
        found = sorted(p.name for p in path.glob("*.csv")) if path.is_dir() else []
        raise ValueError(f"{file}: PMC-VQA CSV not found" + (f" (the folder has {', '.join(found)})" if found else ""))
    with file.open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = set(rows[0]) if rows else set()
    option_columns = [f"Choice {letter}" for letter in OPTION_LETTERS if f"Choice {letter}" in columns]
    missing = {"Figure_path", "Question", "Choice A", "Choice B"} - columns
    if missing or not {"Answer_label", "Answer"} & columns:
        raise ValueError(f"{file}: not a PMC-VQA CSV (missing columns {sorted(missing) or ['Answer_label or Answer']})")
    if image_root is None:
        folders = [file.parent / name for name in PMC_VQA_IMAGE_FOLDERS if (file.parent / name).is_dir()]
        archives = sorted(p.name for p in file.parent.glob("*.zip"))
        if not folders and archives and check_images:
            raise ValueError(
                f"{file.parent}: no image folder ({', '.join(PMC_VQA_IMAGE_FOLDERS)}) but {', '.join(archives)}: "
                "unzip the release's images there, or give --image-root"
            )
        image_root = folders[0] if folders else file.parent
    stem = file.stem
    records = []
    for position, raw in enumerate(rows):
        name = f"{file}: row {position + 2}"  # as a spreadsheet numbers it, after the header
        options = option_texts([raw[column] for column in option_columns], name)
        label = raw.get("Answer_label") or raw.get("Answer")
        records.append(
            VQARecord(
                f"{stem}-{position:06d}",
                _image_file(Path(image_root), raw["Figure_path"], name, check_images),
                _text(raw["Question"], name, "question"),
                _choice_answer(label, options, name),
                "CHOICE",
                "pmc-vqa",
                stem,
                options=options,
            )
        )
    return _unique(records, file)


OMNIMEDVQA_SPLITS = {"test": "Open-access", "open-access": "Open-access", "restricted-access": "Restricted-access"}


def load_omnimedvqa(
    path: str | Path, split: str = "test", image_root: str | Path | None = None, check_images: bool = True
) -> list[VQARecord]:
    """OmniMedVQA's multiple-choice questions: the release folder (the one holding `QA_information/`)
    or its `QA_information/`, whose `Open-access/*.json` are read (`--split restricted-access` reads
    `Restricted-access/`, whose images come from each source dataset), a folder of those JSON files,
    or one of them (one source dataset). Each record gives `question`, `option_A`.. and the right
    option's text as `gt_answer`; `image_path` is relative to the release folder (`image_root`, by
    default found above the JSON files). The report groups by `question_type`, by `modality_type` and
    by the source `dataset`."""
    path = Path(path)
    if split not in OMNIMEDVQA_SPLITS:
        raise ValueError(f"OmniMedVQA has no split {split!r}; choose from {', '.join(OMNIMEDVQA_SPLITS)}")
    folder = path / "QA_information" if (path / "QA_information").is_dir() else path
    if folder.name == "QA_information":
        folder = folder / OMNIMEDVQA_SPLITS[split]
    files = sorted(folder.glob("*.json")) if folder.is_dir() else [folder]
    if not files or not files[0].is_file():
        raise ValueError(f"{folder}: no OmniMedVQA question files (QA_information/Open-access/*.json)")
    if image_root is None:
        above = [p for p in files[0].parents if p.name == "QA_information"]
        image_root = above[0].parent if above else files[0].parent
    records = []
    for file in files:
        try:
            rows = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}: not JSON ({err})") from None
        if not isinstance(rows, list) or not all(isinstance(raw, dict) for raw in rows):
            raise ValueError(f"{file}: expected a JSON list of questions, each an object")
        for position, raw in enumerate(rows):
            name = f"{file}: record {raw.get('question_id', f'#{position}')}"
            options = option_texts([raw.get(f"option_{letter}") for letter in OPTION_LETTERS], name)
            records.append(
                VQARecord(
                    str(raw.get("question_id") or f"{file.stem}-{position:06d}"),
                    _omnimedvqa_image(Path(image_root), raw.get("image_path"), name, check_images, split),
                    _text(raw.get("question"), name, "question"),
                    _choice_text(raw.get("gt_answer"), options, name),
                    "CHOICE",
                    "omnimedvqa",
                    split,
                    raw.get("question_type") and str(raw["question_type"]),
                    options=options,
                    strata=_strata(
                        {**raw, "modality": raw.get("modality_type") or raw.get("modality")},
                        {"modality": "modality", "source": "dataset"},
                    ),
                )
            )
    return _unique(records, folder)


def _choice_text(answer, options: tuple[str, ...], name: str) -> str:
    """The letter of the option whose text `answer` is (OmniMedVQA's `gt_answer`), ignoring case and a
    full stop at the end; `_choice_answer`'s letter forms only where no option's text matches."""
    text = _text(answer, name, "answer")

    def plain(value: str) -> str:
        return value.casefold().rstrip(".").strip()

    matches = [i for i, option in enumerate(options) if plain(option) == plain(text)]
    return OPTION_LETTERS[matches[0]] if len(matches) == 1 else _choice_answer(text, options, name)


def _omnimedvqa_image(root: Path, relative, name: str, check: bool, split: str) -> Path:
    try:
        return _image_file(root, relative, name, check)
    except ValueError as err:
        if split == "restricted-access":
            raise ValueError(
                f"{err} (restricted-access images are not in the release: get them from the "
                "source dataset and place them where image_path says, or give --image-root)"
            ) from None
        raise


class _PlainDataUnpickler(pickle.Unpickler):
    """Question pickles hold lists of dicts of strings; refusing every class keeps a tampered file from
    running code."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data is expected")


def load_pathvqa(
    path: str | Path, split: str = "test", image_root: str | Path | None = None, check_images: bool = True
) -> list[VQARecord]:
    """PathVQA: the Hugging Face parquet layout (a folder with `data/`), or the original release's question
    pickle (`qas/test/test_qa.pkl`, records `{image, question, answer}`, images `images/test/<image>.jpg`)."""
    path = Path(path)
    if path.is_dir() and (path / "data").is_dir():
        return _load_parquet(path, split, "pathvqa")
    if path.is_dir():
        path = path / "qas" / split / f"{split}_qa.pkl"
    if not path.is_file():
        raise ValueError(f"{path}: PathVQA file not found (a question pickle or a parquet folder with data/)")
    try:
        rows = _PlainDataUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ValueError(f"{path}: not a PathVQA question pickle: {err}") from None
    if image_root is None:
        image_root = path.parents[2] / "images" / split if len(path.parents) > 2 else path.parent
    records = []
    for position, raw in enumerate(rows):
        name = f"{path}: record #{position}"
        if not isinstance(raw, dict):
            raise ValueError(f"{name}: expected a dict with image, question, answer")
        image = _text(raw.get("image"), name, "image name")
        answer = _text(raw.get("answer"), name, "answer")
        records.append(
            VQARecord(
                f"{split}-{position:06d}",
                _image_file(Path(image_root), image if Path(image).suffix else f"{image}.jpg", name, check_images),
                _text(raw.get("question"), name, "question"),
                answer,
                answer_type_of(answer),
                "pathvqa",
                split,
            )
        )
    return _unique(records, path)


def _load_parquet(root: Path, split: str, dataset: str) -> list[VQARecord]:
    """The Hugging Face layout: `data/<split>-*.parquet` with `image` ({bytes, path}), `question`, `answer`."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RuntimeError("reading parquet needs pyarrow: pip install 'llama3med[eval]'") from None
    files = sorted((root / "data").glob(f"{split}-*.parquet"))
    if not files:
        raise ValueError(f"{root}: no data/{split}-*.parquet files")
    records = []
    for file in files:
        table = pq.read_table(file)
        missing = {"image", "question", "answer"} - set(table.column_names)
        if missing:
            raise ValueError(f"{file}: missing columns {sorted(missing)}")
        for position, row in enumerate(table.to_pylist()):
            name = f"{file}: row {position}"
            image = row["image"]
            data = image.get("bytes") if isinstance(image, dict) else image
            if not data:
                raise ValueError(f"{name}: no image bytes")
            answer = _text(row["answer"], name, "answer")
            question = _text(row["question"], name, "question")
            record_id = f"{split}-{len(records):06d}"
            records.append(VQARecord(record_id, bytes(data), question, answer, answer_type_of(answer), dataset, split))
    return _unique(records, root)


def local_dataset(path: str | Path) -> Path:
    """Where a benchmark's files are: `path` itself, or for a Hugging Face dataset id (`owner/name`, such
    as `flaviagiammarino/vqa-rad`) that is no local path, the Hub's copy of that dataset, downloaded on
    first use and read from the Hub's cache after that (also offline, `HF_HUB_OFFLINE=1`)."""
    if Path(path).exists() or not looks_like_hub_id(path):
        return Path(path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=str(path), repo_type="dataset"))
    except Exception as err:  # the Hub client's many kinds: no network, no such repo, gated, offline cache miss
        raise ValueError(
            f"{path}: no such file or folder, and no Hugging Face dataset of that id could be had "
            f"({type(err).__name__}: {' '.join(str(err).split())[:300]})"
        ) from None


def load_benchmark(
    name: str, path: str | Path, split: str = "test", image_root: str | Path | None = None, check_images: bool = True
) -> list[VQARecord]:
    """Records of benchmark `name` (one of `BENCHMARKS`) from `path`, a local file or
    folder or a Hugging Face dataset id (`local_dataset`). Scoring needs no images, so
    `check_images=False` reads the questions and answers alone."""
    path = local_dataset(path)
    if name == "llava-med":
        return load_llava_med(path, image_root, check_images=check_images)
    if name == "slake":
        return load_slake(path, split, check_images=check_images)
    if name == "vqa-rad":
        return load_vqa_rad(path, split, image_root, check_images=check_images)
    if name == "pathvqa":
        return load_pathvqa(path, split, image_root, check_images=check_images)
    if name == "pmc-vqa":
        return load_pmc_vqa(path, split, image_root, check_images=check_images)
    if name == "omnimedvqa":
        return load_omnimedvqa(path, split, image_root, check_images=check_images)
    raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")


def load_candidate_answers(path: str | Path) -> list[str]:
    """The open-answer set of the candidate "accuracy": LLaVA-Med's `train_open_answers.json`
    (`{"0": [answers]}`) or a plain JSON list, in the file's order."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: candidate answers file not found")
    data = json.loads(path.read_text(encoding="utf-8"))
    answers = data.get("0") if isinstance(data, dict) else data
    if not isinstance(answers, list) or not answers:
        raise ValueError(f'{path}: expected a JSON list of answers or {{"0": [answers]}}')
    return [str(answer) for answer in answers]


def train_open_answers(
    name: str, path: str | Path, test_records: list[VQARecord], image_root: str | Path | None = None
) -> list[str] | None:
    """The open answers of the benchmark's train split (LLaVA-Med's candidate set), when the release
    at `path` holds one; None for the LLaVA-Med format, the multiple-choice sets (no open questions) or a
    lone test file."""
    one_split = Path(path).is_file() and name != "vqa-rad"  # one file, one split (but VQA-RAD's)
    if name in ("llava-med", "pmc-vqa", "omnimedvqa") or one_split:
        return None
    try:
        train = load_benchmark(name, path, "train", image_root, check_images=False)
    except ValueError:
        return None
    test_ids = {r.id for r in test_records}
    answers = [r.answer for r in train if r.answer_type == "OPEN" and r.id not in test_ids]
    return answers or None


CONVERSATIONS_FILE = "conversations.json"


def write_benchmark_conversations(
    records: list[VQARecord], out: str | Path, prompt_style: str = "plain", system: str | None = None
) -> dict:
    """A benchmark split as LLaVA conversations to tune on, as LLaVA-Med's fine-tuned rows were made:
    `out/conversations.json`, a one-turn conversation per question, worded as `eval --prompt` words it
    (after `system`, as `eval --system` asks) and answered with the reference. Images the release embeds
    are written once each to `out/images/`; image files are named by their absolute path. A recipe takes
    it with `image_root: out`."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    conversations = []
    for record in records:
        if isinstance(record.image, bytes):
            if record.image_key not in written:
                name = f"images/{record.image_key[:20]}{_image_suffix(record.image)}"
                (out / name).write_bytes(record.image)
                written[record.image_key] = name
            image = written[record.image_key]
        else:
            image = str(Path(record.image).resolve())
        conversation = {
            "id": f"{record.dataset}-{record.split}-{record.id}",
            "image": image,
            "answer_type": record.answer_type,
            "conversations": [
                *([{"from": "system", "value": system}] if system else []),
                {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{prompt_text(record, prompt_style)}"},
                {"from": "gpt", "value": record.answer},
            ],
        }
        if record.frame is not None:
            conversation["frame"] = record.frame
        if record.window is not None:
            conversation["window"] = record.window
        conversations.append(conversation)
    write_atomically(out / CONVERSATIONS_FILE, json.dumps(conversations, indent=1, ensure_ascii=False))
    return {"conversations": len(conversations), "images written": len(written)}


def _image_suffix(data: bytes) -> str:
    """The file extension of embedded image bytes, by their content."""
    if data[128:132] == b"DICM":
        return ".dcm"
    try:
        with Image.open(io.BytesIO(data)) as image:
            return {"JPEG": ".jpg", "TIFF": ".tif"}.get(image.format, f".{image.format.lower()}")
    except Exception:  # Pillow raises many kinds for bytes it cannot read; training names the record then
        return ".bin"
