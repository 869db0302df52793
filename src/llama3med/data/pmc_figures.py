"""Figures, their captions and the sentences that cite them, out of PubMed Central open-access articles:
the input `llama3med datagen` turns into conversations (the paper's data: figure captions of biomedical
papers, as in PMC-15M and LLaVA-Med).

An article is a JATS XML file (`.nxml`, or `.xml`) with its figures' image files beside it: a PMC
article package (`PMCID.tar.gz`) or a folder holding one article's files. Each `<fig>` gives one record,
its image the figure's `<graphic>` (whose `xlink:href` often names the file without its extension), its
caption the label and caption text, its mentions the sentences of the body whose `<xref>` cites it, and
the article's license as `<permissions>` states it, so a mix can keep to licenses that allow its use.
"""

from __future__ import annotations

import json
import re
import tarfile
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

from tqdm import tqdm

from .conversations import read_appended_rows
from .pmc import IMAGE_EXTENSIONS, is_image

FIGURES_FILE = "figures.jsonl"
DONE_FILE = "articles.done"
FAILED_FILE = "failed.jsonl"
XLINK_HREF = "{http://www.w3.org/1999/xlink}href"
FLOATS = ("fig", "fig-group", "table-wrap")  # placed in the text, but not part of it
JATS_NAMESPACES = ("{https://jats.nlm.nih.gov/ns/", "{http://jats.nlm.nih.gov/ns/")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\[])")
# What kind of image a caption says it is, by the words captions use for it (acronyms in capitals only, so
# that "Ct values" are not taken for a CT): the `domain` of a record, which the teachers are told and
# figures can be kept by. Not a classifier: a chart whose caption names a CT is taken for one, and a CT
# whose caption does not say so is not.
IMAGING_KINDS = {
    "ct": ("CT", r"(?-i:\bCTA?\b|\bHRCT\b)|computed tomograph"),
    "mri": (
        "MRI",
        r"(?-i:\bMRI?\b|\bMRA\b|\bFLAIR\b|\bDWI\b)|magnetic resonance|\bT[12][- ]weighted|diffusion[- ]weighted",
    ),
    "xray": ("X-ray", r"radiograph|\bx-?ray|(?-i:\bCXR\b)|chest film|plain film|mammogra|fluoroscop"),
    "ultrasound": ("ultrasound", r"ultrasound|ultrasonograph|sonograph|echocardiogra|doppler"),
    "nuclear": ("nuclear medicine", r"(?-i:\bPET\b|\bSPECT\b)|positron emission|scintigra"),
    "histology": (
        "histology",
        r"(?-i:\bH&E\b|\bIHC\b)|hae?matoxylin|immunohistochem|histolog|histopatholog|micrograph|"
        r"\bstain(?:ed|ing)?\b(?!-)|original magnification|magnification\s*[x×]",
    ),
    "gross": ("gross pathology", r"\bgross(?:ly)?\b|macroscop|cut surface|resected specimen|surgical specimen"),
    "endoscopy": ("endoscopy", r"endoscop|colonoscop|gastroscop|bronchoscop|cystoscop|laparoscop|arthroscop"),
    "ophthalmology": (
        "ophthalmology",
        r"fundus|fundoscop|(?-i:\bOCT\b)|optical coherence tomograph|fluorescein angiogra|slit[- ]lamp",
    ),
}
_KIND_PATTERNS = {key: (name, re.compile(pattern, re.IGNORECASE)) for key, (name, pattern) in IMAGING_KINDS.items()}


def article_sources(folder: str | Path) -> list[Path]:
    """The articles under `folder`: package files (`*.tar.gz`, `*.tgz`) and folders holding a JATS file;
    hidden entries (an article still being fetched) are not."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder of PMC article packages or article folders")
    entries = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
    found = [p for p in entries if p.name.endswith((".tar.gz", ".tgz")) and p.is_file()]
    found += [p for p in entries if p.is_dir() and jats_file(f.name for f in p.iterdir())]
    return found


def article_name(source: Path) -> str:
    return source.name.removesuffix(".tar.gz").removesuffix(".tgz")


def read_article(source: Path) -> tuple[bytes, dict[str, bytes]]:
    """An article's JATS XML and its image files (by file name, without folders)."""
    if source.is_dir():
        files = {p.name: p for p in source.iterdir() if p.is_file()}
        return files[jats_file(files)].read_bytes(), {
            name: path.read_bytes() for name, path in files.items() if name.lower().endswith(IMAGE_EXTENSIONS)
        }
    with tarfile.open(source, "r:*") as package:
        members = {m.name: m for m in package.getmembers() if m.isfile()}
        jats = jats_file(members)
        if jats is None:
            raise ValueError("no JATS XML (.nxml) in the package")
        images = {
            Path(name).name: package.extractfile(member).read()
            for name, member in members.items()
            if name.lower().endswith(IMAGE_EXTENSIONS)
        }
        return package.extractfile(members[jats]).read(), images


def parse_jats(jats: bytes) -> ET.Element:
    """The `<article>` of a JATS file, with JATS's own namespace taken off its tags: PMC's packages carry
    none, while its OAI-PMH XML (which its cloud now serves) may declare one, and may wrap the article."""
    root = ET.fromstring(jats)
    for element in root.iter():
        if element.tag.startswith(JATS_NAMESPACES):
            element.tag = element.tag.rsplit("}", 1)[1]
    article = root if root.tag == "article" else root.find(".//article")
    if article is None:
        raise ValueError("no <article> in the JATS XML")
    return article


def figure_graphics(article: ET.Element) -> list[str]:
    """The image each figure names (its first `<graphic>`'s `xlink:href`), in the figures' order."""
    return [href for figure in article.iter("fig") if (href := _graphic_href(figure))]


def imaging_kinds(caption: str) -> list[str]:
    """The keys of the kinds of image `caption` names (`IMAGING_KINDS`), in that table's order."""
    return [key for key, (_, pattern) in _KIND_PATTERNS.items() if pattern.search(caption)]


def domain_of(kinds: list[str]) -> str | None:
    return ", ".join(IMAGING_KINDS[key][0] for key in kinds) or None


def figure_records(
    jats: bytes, images: dict[str, bytes], article: str, kinds: Sequence[str] = ()
) -> tuple[list[tuple[dict, bytes]], int, int]:
    """`(record, image bytes)` for each figure of an article with a caption and an image among `images`
    that is one, and with `kinds` a caption naming one of those kinds of image; how many figures lacked a
    caption or an image, and how many were of other kinds."""
    root = parse_jats(jats)
    pmcid = _pmcid(root) or article
    license_text = _license(root)
    mentions = _mentions(root)
    found, lacking, other_kinds = [], 0, 0
    for number, figure in enumerate(root.iter("fig")):
        figure_id = figure.get("id") or f"fig{number + 1}"
        href = _graphic_href(figure)
        name = graphic_file(href, images) if href else None
        caption = _caption(figure)
        if name is None or not caption or not is_image(images[name]):
            lacking += 1
            continue
        named = imaging_kinds(caption)
        if kinds and not set(kinds) & set(named):
            other_kinds += 1
            continue
        record_id = f"{pmcid}_{re.sub(r'[^A-Za-z0-9_.-]', '_', figure_id)}"
        record = {
            "id": record_id,
            "image": record_id + Path(name).suffix.lower(),
            "caption": caption,
            "in_text_mention": mentions.get(figure_id, []),
            "domain": domain_of(named),
            "pmcid": pmcid,
            "license": license_text,
            "article": article,
        }
        found.append((record, images[name]))
    return found, lacking, other_kinds


def extract_pmc_figures(
    articles: str | Path, out: str | Path, *, kinds: Sequence[str] = (), progress: bool = True
) -> dict[str, int]:
    """Every figure of the articles in `articles` into `out/images/`, and its record into
    `out/figures.jsonl`; with `kinds` (keys of `IMAGING_KINDS`), only the figures whose caption names one
    of them. Resumable (an article is done once its name is in `out/articles.done`), with the articles
    that could not be read listed in `out/failed.jsonl`. Returns the counts."""
    unknown = sorted(set(kinds) - set(IMAGING_KINDS))
    if unknown:
        raise ValueError(f"unknown kind of image {', '.join(unknown)}; the kinds are {', '.join(IMAGING_KINDS)}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    done = set((out / DONE_FILE).read_text().split()) if (out / DONE_FILE).exists() else set()
    _drop_unfinished(out / FIGURES_FILE, done)
    sources = [s for s in article_sources(articles) if article_name(s) not in done]
    counts = {"articles": 0, "figures": 0, "without image or caption": 0, "failed": 0, "already done": len(done)}
    if kinds:
        counts["of other kinds"] = 0
    failures = []
    with (
        open(out / FIGURES_FILE, "a") as figures_file,
        open(out / DONE_FILE, "a") as done_file,
        tqdm(sources, unit="article", desc="pmc figures", disable=not progress) as bar,
    ):
        for source in bar:
            try:
                jats, images = read_article(source)
                found, lacking, other_kinds = figure_records(jats, images, article_name(source), kinds)
            except (ET.ParseError, tarfile.TarError, EOFError, zlib.error, OSError, ValueError) as err:
                failures.append({"article": source.name, "reason": " ".join(str(err).split())})
                counts["failed"] += 1
                continue
            if kinds:
                counts["of other kinds"] += other_kinds
            for record, data in found:
                (out / "images" / record["image"]).write_bytes(data)
                figures_file.write(json.dumps(record, ensure_ascii=False) + "\n")
            figures_file.flush()
            counts["figures"] += len(found)
            counts["without image or caption"] += lacking
            done_file.write(article_name(source) + "\n")
            done_file.flush()
            counts["articles"] += 1
            bar.set_postfix(figures=counts["figures"], failed=counts["failed"])
    (out / FAILED_FILE).write_text("".join(json.dumps(f) + "\n" for f in failures))
    return counts


def _drop_unfinished(path: Path, done: set[str]) -> None:
    """Records of an article a kill interrupted (not yet in the done list) are dropped; it is redone."""
    if path.exists():
        kept = [row for row in read_appended_rows(path) if row.get("article") in done]
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept))


def jats_file(names) -> str | None:
    """The article's JATS file among the file names: the packages' `.nxml`, else an `.xml` (the cloud's
    `PMC<id>.<version>.xml`)."""
    candidates = sorted((n for n in names if n.endswith((".nxml", ".xml"))), key=lambda n: not n.endswith(".nxml"))
    return candidates[0] if candidates else None


def _graphic_href(figure: ET.Element) -> str | None:
    graphic = figure.find(".//graphic")
    return graphic.get(XLINK_HREF) if graphic is not None else None


def _pmcid(root: ET.Element) -> str | None:
    for article_id in root.iter("article-id"):
        if article_id.get("pub-id-type") in ("pmc", "pmcid") and article_id.text and article_id.text.strip():
            value = article_id.text.strip()
            return value if value.startswith("PMC") else f"PMC{value}"
    return None


def _license(root: ET.Element) -> str | None:
    """The article's license: its link (`ali:license_ref`, else the license's `xlink:href`; a Creative
    Commons URL says which one), else its `license-type`, else its text."""
    license_element = root.find(".//permissions/license")
    if license_element is None:
        return None
    for element in license_element.iter():
        if element.tag.endswith("}license_ref") and element.text and element.text.strip():
            return element.text.strip()
    return license_element.get(XLINK_HREF) or license_element.get("license-type") or _text_of(license_element) or None


def _caption(figure: ET.Element) -> str:
    label = figure.find("label")
    caption = figure.find("caption")
    parts = [_text_of(label) if label is not None else "", _text_of(caption) if caption is not None else ""]
    return " ".join(part for part in parts if part)


def _text_of(element: ET.Element) -> str:
    return " ".join("".join(element.itertext()).split())


def _mentions(root: ET.Element) -> dict[str, list[str]]:
    """The body's sentences that cite each figure, by figure id, in the order they come."""
    body = root.find("body")
    found: dict[str, list[str]] = {}
    if body is None:
        return found
    for paragraph in _running_paragraphs(body):
        text, cited = _paragraph_with_citations(paragraph)
        for sentence_start, sentence in _sentences(text):
            sentence_end = sentence_start + len(sentence)
            for at, figure_id in cited:
                if sentence_start <= at < sentence_end:
                    clean = " ".join(sentence.split())
                    if clean not in found.setdefault(figure_id, []):
                        found[figure_id].append(clean)
    return found


def _running_paragraphs(element: ET.Element) -> Iterator[ET.Element]:
    """The paragraphs of the running text, in document order: not those of figure or table captions."""
    for child in element:
        if child.tag == "p":
            yield child
        if child.tag not in FLOATS:
            yield from _running_paragraphs(child)


def _paragraph_with_citations(paragraph: ET.Element) -> tuple[str, list[tuple[int, str]]]:
    """A paragraph's running text (nested paragraphs, as in a boxed text, left to their own turn; figures
    and tables placed inside it left out) and where in it each figure citation (`<xref ref-type="fig"
    rid=...>`, one or several ids) stands."""
    pieces: list[str] = []
    cited: list[tuple[int, str]] = []
    length = 0

    def walk(element: ET.Element) -> None:
        nonlocal length
        if element.tag == "xref" and element.get("ref-type") == "fig":
            cited.extend((length, rid) for rid in (element.get("rid") or "").split())
        if element.text:
            pieces.append(element.text)
            length += len(element.text)
        for child in element:
            if child.tag != "p" and child.tag not in FLOATS:
                walk(child)
            if child.tail:
                pieces.append(child.tail)
                length += len(child.tail)

    walk(paragraph)
    return "".join(pieces), cited


def _sentences(text: str) -> Iterator[tuple[int, str]]:
    start = 0
    for boundary in SENTENCE_END.finditer(text):
        yield start, text[start : boundary.start()]
        start = boundary.end()
    yield start, text[start:]


def graphic_file(href: str, names: Collection[str]) -> str | None:
    """The file among `names` a graphic's `xlink:href` names: itself, or (as PMC stores them) the name
    with an image extension added, JPEG first."""
    name = Path(href).name
    if name in names:
        return name
    for extension in IMAGE_EXTENSIONS:
        if name + extension in names:
            return name + extension
    return None
