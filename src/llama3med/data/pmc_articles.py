"""Open-access articles fetched from the PMC Cloud, into the folders `llama3med data pmc-figures` reads.

For each PMCID: its JATS XML, the cloud's metadata record and the image files its figures name, nothing
else (not the PDF, the plain text or the supplementary files, which can be large), from the newest
version unless the PMCID names one (`PMC123.2`). An article whose record says it is retracted is not
fetched: its figures should not teach a model. An article is fetched into a hidden folder and renamed
to `OUT/<PMCID>/` once whole, so an interruption loses nothing finished and a rerun fetches only what
is missing; the articles that could not be had are listed in `OUT/failed.jsonl` with their reasons.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

from tqdm import tqdm

from . import web
from .pmc_cloud import CLOUD_URL, PMCID, article_metadata, article_versions, object_url, parse_pmcid
from .pmc_figures import figure_graphics, graphic_file, jats_file, parse_jats
from .web import fetch, run_concurrently

FAILED_FILE = "failed.jsonl"


class ArticleError(Exception):
    """Why one article could not be had; `download` when the network or the server failed, not the article."""

    def __init__(self, reason: str, download: bool = False):
        super().__init__(reason)
        self.download = download


def read_pmcids(sources: list[str]) -> list[str]:
    """PMCIDs given as such or in files: the first PMCID of each line (so PMC's CSV file lists work as
    they are), lines without one passed over. In order, each once."""
    found: list[str] = []
    for source in sources:
        if PMCID.fullmatch(source.strip()):
            found.append(source.strip())
            continue
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{source}: neither a PMCID (such as PMC6149739) nor a file of them")
        found += [match.group(0) for line in path.read_text().splitlines() if (match := PMCID.search(line))]
    return list(dict.fromkeys(found))


def fetch_pmc_articles(
    pmcids: list[str],
    out: str | Path,
    *,
    cloud_url: str = CLOUD_URL,
    concurrency: int = 8,
    progress: bool = True,
) -> dict[str, int]:
    """Each article not yet in `out` fetched into `out/<PMCID>/`; returns how many were fetched, already
    there and failed, and the figure images written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for partial in out.glob(".*.partial"):  # left by a killed run
        shutil.rmtree(partial, ignore_errors=True)
    pending = [pmcid for pmcid in pmcids if not (out / pmcid).is_dir()]
    counts = {"fetched": 0, "present": len(pmcids) - len(pending), "failed": 0, "figures": 0}
    failures: list[dict[str, str]] = []
    downloads_failed = 0
    with (
        contextlib.closing(
            run_concurrently(lambda pmcid: _fetch_article(pmcid, out, cloud_url), pending, concurrency)
        ) as results,
        tqdm(total=len(pending), unit="article", desc="pmc articles", disable=not progress) as bar,
    ):
        for pmcid, job in results:  # an exception or Ctrl-C stops it: the article being written is redone next time
            try:
                counts["figures"] += job.result()
                counts["fetched"] += 1
            except ArticleError as err:
                counts["failed"] += 1
                failures.append({"pmcid": pmcid, "reason": str(err)})
                downloads_failed += err.download
                if downloads_failed >= web.GIVE_UP_AFTER and counts["fetched"] == 0:
                    raise RuntimeError(
                        f"the first {downloads_failed} articles could not be downloaded (last: {err}); "
                        "check the network, or give --cloud-url (a mirror of the PMC Cloud)"
                    ) from None
            bar.update(1)
            bar.set_postfix(figures=counts["figures"], failed=counts["failed"])
    failures.sort(key=lambda f: f["pmcid"])
    (out / FAILED_FILE).write_text("".join(json.dumps(f) + "\n" for f in failures))
    return counts


def _fetch_article(pmcid: str, out: Path, cloud_url: str) -> int:
    """One article's JATS XML and figure images into `out/<pmcid>/`; how many images it has there."""
    number, wanted = parse_pmcid(pmcid)
    with _downloading():
        versions = article_versions(pmcid, cloud_url)
    if not versions:
        raise ArticleError("not in the PMC Cloud")
    version = f"PMC{number}.{wanted}" if wanted else next(iter(versions))
    if version not in versions:
        raise ArticleError(f"the PMC Cloud has no {version}, only {', '.join(versions)}")
    with _downloading():
        metadata = article_metadata(version, cloud_url)
    if metadata is not None and metadata.get("is_retracted") is True:
        raise ArticleError(f"{version} is retracted")
    by_name = {Path(key).name: key for key in versions[version] if not Path(key).name.startswith(".")}
    jats_name = f"{version}.xml" if f"{version}.xml" in by_name else jats_file(by_name)
    if jats_name is None:
        raise ArticleError(f"no JATS XML in {version}")
    jats = _get(version, by_name[jats_name], cloud_url)
    try:
        graphics = figure_graphics(parse_jats(jats))
    except (ET.ParseError, ValueError) as err:
        raise ArticleError(f"unreadable JATS XML {jats_name}: {err}") from None
    images = dict.fromkeys(name for href in graphics if (name := graphic_file(href, by_name)))
    partial = out / f".{pmcid}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        (partial / jats_name).write_bytes(jats)
        if metadata is not None:
            (partial / f"{version}.json").write_text(json.dumps(metadata, indent=1))
        for name in images:
            (partial / name).write_bytes(_get(version, by_name[name], cloud_url))
        os.replace(partial, out / pmcid)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return len(images)


def _get(version: str, name: str, cloud_url: str) -> bytes:
    with _downloading():
        return fetch(object_url(f"{version}/{name}", cloud_url))


@contextlib.contextmanager
def _downloading():
    """A network or server failure, as the article's failure of that kind."""
    try:
        yield
    except OSError as err:
        raise ArticleError(f"download failed: {err}", download=True) from None
