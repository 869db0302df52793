"""Which open-access articles to fetch: the PMCIDs a Europe PMC search finds.

Europe PMC indexes PubMed Central with a query language that reaches titles, abstracts, full texts,
MeSH terms, journals, dates and licenses (`LICENSE:"cc by"`); its REST search pages through results with
a cursor, 1,000 a page. The query is narrowed to the open-access subset, the only articles the PMC
Cloud serves. PMCIDs are appended to the output file a page at a time, and the cursor is kept beside
it, so an interrupted search resumes where it stopped; a finished one is not run again.
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

from tqdm import tqdm

from .conversations import write_atomically
from .web import fetch

SEARCH_URL = "https://www.ebi.ac.uk/europepmc/webservices/rest/search"
PAGE_SIZE = 1000  # the most Europe PMC returns a page


def open_access_query(query: str) -> str:
    return f"({query}) AND OPEN_ACCESS:y"


def search_pmcids(
    query: str,
    out: str | Path,
    *,
    limit: int | None = None,
    search_url: str = SEARCH_URL,
    progress: bool = True,
) -> dict[str, int | bool]:
    """The PMCIDs of the open-access articles `query` finds, up to `limit`, written to `out` one a line;
    returns how many there are, how many the search matched, and whether an earlier run had finished."""
    out = Path(out)
    state_file = out.with_name(out.name + ".search.json")
    full_query = open_access_query(query)
    state = json.loads(state_file.read_text()) if state_file.exists() else None
    if state is None or state.get("query") != full_query or state.get("limit") != limit or not out.exists():
        state = {"query": full_query, "limit": limit, "cursor": "*", "matched": None, "done": False}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("")
    found = out.read_text().split()
    if state["done"]:
        return {"pmcids": len(found), "matched": state["matched"], "already done": True}
    seen = set(found)
    with open(out, "a") as ids, tqdm(total=limit, unit="id", desc="europe pmc", disable=not progress) as bar:
        bar.update(len(found))
        while limit is None or len(found) < limit:
            page = _search_page(full_query, state["cursor"], search_url)
            state["matched"] = page.get("hitCount")
            if bar.total is None and isinstance(state["matched"], int):
                bar.total = state["matched"] if limit is None else min(limit, state["matched"])
            results = (page.get("resultList") or {}).get("result") or []
            new = [r["pmcid"] for r in results if isinstance(r.get("pmcid"), str) and r["pmcid"] not in seen]
            new = new[: limit - len(found)] if limit is not None else new
            ids.write("".join(pmcid + "\n" for pmcid in new))
            ids.flush()
            found += new
            seen.update(new)
            bar.update(len(new))
            cursor = page.get("nextCursorMark")
            if not results or not cursor or cursor == state["cursor"]:
                break
            state["cursor"] = cursor
            write_atomically(state_file, json.dumps(state))
    state["done"] = True
    write_atomically(state_file, json.dumps(state))
    return {"pmcids": len(found), "matched": state["matched"], "already done": False}


def _search_page(query: str, cursor: str, search_url: str) -> dict:
    parameters = {
        "query": query,
        "resultType": "idlist",
        "format": "json",
        "pageSize": PAGE_SIZE,
        "cursorMark": cursor,
    }
    url = f"{search_url}?{urllib.parse.urlencode(parameters)}"
    try:
        page = json.loads(fetch(url))
    except ValueError as err:
        raise OSError(f"{url}: not a Europe PMC answer ({err})") from None
    if not isinstance(page, dict):
        raise OSError(f"{url}: not a Europe PMC answer")
    return page
