"""PubMed Central's Cloud Service: where PMC serves its open-access articles' files since August 2026.

The public bucket `pmc-oa-opendata` keeps each version of an article under a prefix of its own,
`PMC<id>.<version>/`: the JATS XML (`PMC<id>.<version>.xml`), its plain text and PDF, and every figure
and supplementary file as an object of its own; there are no packages any more. Objects are read over
HTTPS, and a prefix is listed with S3's ListObjectsV2 call, which needs no account and no SDK.
`base_url` may name a mirror that answers the same two calls.
"""

from __future__ import annotations

import json
import re
import urllib.parse
import xml.etree.ElementTree as ET

from .web import NotFound, fetch

CLOUD_URL = "https://pmc-oa-opendata.s3.amazonaws.com"
PMCID = re.compile(r"\bPMC(\d+)(?:\.(\d+))?\b")


def object_url(key: str, base_url: str = CLOUD_URL) -> str:
    return f"{base_url.rstrip('/')}/{urllib.parse.quote(key, safe='/')}"


def list_keys(prefix: str, base_url: str = CLOUD_URL) -> list[str]:
    """Every object key under `prefix`, through as many ListObjectsV2 pages as the listing takes."""
    keys: list[str] = []
    query = {"list-type": "2", "prefix": prefix}
    while True:
        url = f"{base_url.rstrip('/')}/?{urllib.parse.urlencode(query)}"
        try:
            page = ET.fromstring(fetch(url))
        except ET.ParseError as err:
            raise OSError(f"{url}: not an S3 listing ({err})") from None
        keys += [_child_text(contents, "Key") for contents in _children(page, "Contents")]
        token = _child_text(page, "NextContinuationToken")
        if _child_text(page, "IsTruncated") != "true" or not token:
            return keys
        query["continuation-token"] = token


def article_versions(pmcid: str, base_url: str = CLOUD_URL) -> dict[str, list[str]]:
    """The versions of an article the cloud holds, newest first, each with its file names:
    `{"PMC123.2": ["PMC123.2.xml", "fig1.jpg", ...], "PMC123.1": [...]}`; empty if it holds none."""
    number = parse_pmcid(pmcid)[0]
    versions: dict[str, list[str]] = {}
    for key in list_keys(f"PMC{number}.", base_url):
        folder, _, name = key.partition("/")
        version = folder.removeprefix(f"PMC{number}.")
        if name and version.isdigit():
            versions.setdefault(folder, []).append(name)
    return dict(sorted(versions.items(), key=lambda item: -int(item[0].rsplit(".", 1)[1])))


def article_metadata(version: str, base_url: str = CLOUD_URL) -> dict | None:
    """The cloud's record of an article version (`metadata/PMC<id>.<version>.json`: its license code, its
    flags such as `is_retracted`, its files' URLs), or None where it has none."""
    try:
        record = json.loads(fetch(object_url(f"metadata/{version}.json", base_url)))
    except NotFound:
        return None
    except ValueError as err:
        raise OSError(f"metadata/{version}.json: not JSON ({err})") from None
    return record if isinstance(record, dict) else None


def parse_pmcid(text: str) -> tuple[str, str | None]:
    """`"PMC123"` -> `("123", None)`, `"PMC123.2"` -> `("123", "2")`; anything else is refused."""
    match = PMCID.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a PMCID (PMC followed by digits, optionally .VERSION)")
    return match.group(1), match.group(2)


def _children(element: ET.Element, name: str) -> list[ET.Element]:
    """Child elements by local name: S3 puts its listing in a namespace, some mirrors do not."""
    return [child for child in element if child.tag.rsplit("}", 1)[-1] == name]


def _child_text(element: ET.Element, name: str) -> str | None:
    found = _children(element, name)
    return found[0].text if found else None
