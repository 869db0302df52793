"""LLaVA-Med's figure images, out of PubMed Central's open-access articles.

LLaVA-Med publishes no images, only where they were: `llava_med_image_urls.jsonl` has a record per
figure, its `pair_id` (LLaVA-Med's conversation files name the image `<pair_id>.jpg`), `pmc_tar_url` (the
article's package, a `.tar.gz`) and `image_file_path` (the figure inside it). PMC removed those packages
in August 2026 and now serves each article's files one by one from its Cloud Service, so by default each
figure is fetched from there (`pmc_cloud`), found by its file name in the article's newest version that
has it. A package is read instead when `archives` holds a copy, or downloaded from a mirror of PMC's old
layout when `url_prefix` rewrites the URLs' start (http(s) or `file://`); then one download serves all
its figures, and only the named figures are read out of it, as bytes: nothing is extracted to disk by
the archive's own paths. Each figure is checked to be an image and written atomically, so a rerun skips
what is done and retries only what is not; what could not be had is listed in `failed.jsonl` with its
reason.
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
import urllib.parse
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from . import web
from .conversations import write_atomically
from .pmc_cloud import CLOUD_URL, article_versions, object_url, parse_pmcid
from .web import download, fetch, run_concurrently

FAILED_FILE = "failed.jsonl"
DOWNLOAD_FAILED = "download failed"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".tif", ".tiff")  # as figures' files are named in PMC


@dataclass(frozen=True)
class Figure:
    """One figure of LLaVA-Med's image list: where its package is, where it is inside, what to call it."""

    pair_id: str
    package_url: str
    member: str

    @property
    def file_name(self) -> str:
        return f"{self.pair_id}.jpg"


def read_image_list(path: str | Path) -> list[Figure]:
    """The figures of a `llava_med_image_urls.jsonl`; a bad line stops the read, named by line and field."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: image list not found")
    figures, seen = [], set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: not a JSON object")
        for field in ("pair_id", "pmc_tar_url", "image_file_path"):
            if not isinstance(record.get(field), str) or not record[field].strip():
                raise ValueError(f"{where}: '{field}' must be a non-empty string")
        pair_id = record["pair_id"]
        if "/" in pair_id or "\\" in pair_id or pair_id.startswith("."):
            raise ValueError(f"{where}: 'pair_id' {pair_id!r} is not a plain file name")
        if pair_id in seen:
            continue
        seen.add(pair_id)
        figures.append(Figure(pair_id, record["pmc_tar_url"], record["image_file_path"]))
    return figures


def package_name(url: str) -> str:
    """The package's file name, e.g. `PMC6149739.tar.gz`."""
    return Path(urllib.parse.urlparse(url).path).name


def fetch_llava_med_images(
    figures: list[Figure],
    out: str | Path,
    *,
    archives: str | Path | None = None,
    url_prefix: tuple[str, str] | None = None,
    cloud_url: str = CLOUD_URL,
    concurrency: int = 8,
    progress: bool = True,
) -> dict[str, int]:
    """Write each figure not yet in `out` as `<pair_id>.jpg`; returns how many were written, already
    there and failed. An article's figures come from its package when `archives` holds one of its name,
    else from the package's URL with `url_prefix` `(old, new)` rewriting its start (the download kept in
    `archives` when given), else one by one from the PMC Cloud at `cloud_url`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    archive_dir = Path(archives) if archives is not None else None
    if archive_dir is not None:
        archive_dir.mkdir(parents=True, exist_ok=True)
    pending: dict[str, list[Figure]] = {}
    for figure in figures:
        if not (out / figure.file_name).exists():
            pending.setdefault(figure.package_url, []).append(figure)
    counts = {"written": 0, "present": len(figures) - sum(map(len, pending.values())), "failed": 0}
    failures: list[dict[str, str]] = []
    downloads_failed = 0

    def take(url: str) -> tuple[int, list[dict[str, str]]]:
        return _take_figures(url, pending[url], out, archive_dir, url_prefix, cloud_url)

    with (
        contextlib.closing(run_concurrently(take, list(pending), concurrency)) as results,
        tqdm(total=len(pending), unit="article", desc="llava-med images", disable=not progress) as bar,
    ):
        for _, job in results:  # an exception or Ctrl-C stops it: what is written stays written
            written, failed = job.result()
            downloads_failed += bool(failed) and failed[0]["reason"].startswith(DOWNLOAD_FAILED)
            if downloads_failed >= web.GIVE_UP_AFTER and counts["written"] + written == 0:
                raise RuntimeError(
                    f"the first {downloads_failed} articles could not be downloaded (last: {failed[0]['reason']}); "
                    + (
                        "PMC no longer serves the original package URLs: give --archives or another --url-prefix"
                        if url_prefix is not None
                        else "check the network, or give --cloud-url (a mirror of the PMC Cloud) or --archives"
                    )
                )
            counts["written"] += written
            counts["failed"] += len(failed)
            failures.extend(failed)
            bar.update(1)
            bar.set_postfix(figures=counts["written"], failed=counts["failed"])
    failures.sort(key=lambda f: f["pair_id"])
    (out / FAILED_FILE).write_text("".join(json.dumps(f) + "\n" for f in failures))
    return counts


def _take_figures(
    url: str,
    figures: list[Figure],
    out: Path,
    archive_dir: Path | None,
    url_prefix: tuple[str, str] | None,
    cloud_url: str,
) -> tuple[int, list[dict[str, str]]]:
    """One article's figures into `out`: how many were written, and a failure record for each other."""

    def failed(figure: Figure, reason: str) -> dict[str, str]:
        return {"pair_id": figure.pair_id, "pmc_tar_url": url, "image_file_path": figure.member, "reason": reason}

    name = package_name(url)
    kept = archive_dir / name if archive_dir is not None else None
    downloaded = kept is None or not kept.exists()
    if downloaded and url_prefix is None:
        return _take_from_cloud(name, figures, out, cloud_url, failed)
    source = kept if kept is not None else out / f".{name}.download"
    if downloaded:
        if url.startswith(url_prefix[0]):
            url = url_prefix[1] + url[len(url_prefix[0]) :]
        try:
            download(url, source)
        except (OSError, ValueError) as err:
            return 0, [failed(figure, f"{DOWNLOAD_FAILED}: {err}") for figure in figures]
    written, failures, done = 0, [], set()
    try:
        with tarfile.open(source, "r:gz") as package:
            for figure in figures:
                reason = _write_figure(package, figure, out)
                if reason is None:
                    written += 1
                else:
                    failures.append(failed(figure, f"{reason} in {name}"))
                done.add(figure.pair_id)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        if downloaded:  # fetched again by the next run; a copy the user gave is left alone
            source.unlink(missing_ok=True)
        failures.extend(
            failed(figure, f"unreadable package {name}: {err}") for figure in figures if figure.pair_id not in done
        )
    if kept is None:
        source.unlink(missing_ok=True)
    return written, failures


def _take_from_cloud(package: str, figures: list[Figure], out: Path, cloud_url: str, failed):
    """One article's figures fetched from the PMC Cloud, each by its file name in the package."""
    article = package.removesuffix(".tar.gz").removesuffix(".tgz")
    try:
        parse_pmcid(article)
        versions = article_versions(article, cloud_url)
    except ValueError:
        return 0, [failed(figure, f"the package name {package} names no PMCID") for figure in figures]
    except OSError as err:
        return 0, [failed(figure, f"{DOWNLOAD_FAILED}: {err}") for figure in figures]
    if not versions:
        return 0, [failed(figure, f"{article} is not in the PMC Cloud") for figure in figures]
    written, failures = 0, []
    for figure in figures:
        key = cloud_key(Path(figure.member).name, versions)
        if key is None:
            failures.append(failed(figure, f"no file {Path(figure.member).name} in {article} in the PMC Cloud"))
            continue
        try:
            data = fetch(object_url(key, cloud_url))
        except OSError as err:
            failures.append(failed(figure, f"{DOWNLOAD_FAILED}: {err}"))
            continue
        reason = _write_image(data, figure, out)
        if reason is None:
            written += 1
        else:
            failures.append(failed(figure, f"{key} {reason}"))
    return written, failures


def cloud_key(file_name: str, versions: dict[str, list[str]]) -> str | None:
    """The key of the file a package named `file_name`, in the newest version that has it: the same
    name, else the same name with another image extension (a figure converted since, JPEG first)."""
    stem = Path(file_name).stem
    for version, names in versions.items():
        by_name = {Path(name).name: name for name in names}
        if file_name in by_name:
            return f"{version}/{by_name[file_name]}"
        for extension in IMAGE_EXTENSIONS:
            if stem + extension in by_name:
                return f"{version}/{by_name[stem + extension]}"
    return None


def _write_figure(package, figure: Figure, out: Path) -> str | None:
    """The figure read out of its open package and written to `out`; else why not."""
    try:
        member = package.getmember(figure.member)
    except KeyError:
        return f"no file {figure.member}"
    data = package.extractfile(member).read() if member.isfile() else b""
    reason = _write_image(data, figure, out)
    return f"{figure.member} {reason}" if reason else None


def _write_image(data: bytes, figure: Figure, out: Path) -> str | None:
    """`data` written as the figure's `.jpg`: as it is when it is a JPEG, else (a figure the cloud keeps
    as PNG or TIFF) converted to one, so that the name does not lie about the content."""
    if not is_image(data):
        return "is not an image"
    if not data.startswith(b"\xff\xd8"):
        try:
            data = _as_jpeg(data)
        except Exception as err:  # Pillow raises many kinds for images it verifies but cannot decode
            return f"cannot be converted to JPEG ({err})"
    write_atomically(out / figure.file_name, data)
    return None


def _as_jpeg(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def is_image(data: bytes) -> bool:
    """Whether Pillow reads `data` as an image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except Exception:  # Pillow raises many kinds for bytes that are not an image
        return False
    return True
