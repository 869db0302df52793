"""The PMCIDs a Europe PMC search finds (its REST search, served locally): narrowed to the open-access
subset, paged through with the cursor, capped by --limit, resumed after an interruption, not rerun once
finished; the file feeds pmc-articles."""

import http.server
import json
import threading
import urllib.parse
from types import SimpleNamespace

import pytest

from llama3med.cli import main
from llama3med.data.europe_pmc import search_pmcids
from llama3med.data.pmc_articles import read_pmcids

HITS = [
    {"id": str(30000000 + i), "source": "MED", "pmid": str(30000000 + i), "pmcid": f"PMC{7000 + i}"} for i in range(7)
]
HITS.insert(3, {"id": "PPR123", "source": "PPR"})  # a preprint without a PMCID


@pytest.fixture()
def europe_pmc():
    """Europe PMC's REST search: three hits a page, the cursor an opaque mark, `hitCount` the total;
    `failing` makes a page at that cursor answer 500."""
    requests: list[dict] = []
    failing: set[str] = set()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            query = {k: v[0] for k, v in urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).items()}
            requests.append(query)
            if query["cursorMark"] in failing:
                self.send_error(500)
                return
            start = 0 if query["cursorMark"] == "*" else int(query["cursorMark"].removeprefix("AoE"))
            page = HITS[start : start + 3]
            body = {"version": "6.9", "hitCount": len(HITS), "request": {"queryString": query["query"]}}
            body["nextCursorMark"] = f"AoE{start + 3}" if page else query["cursorMark"]
            body["resultList"] = {"result": page}
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_port}/search", requests=requests, failing=failing)
    server.shutdown()


ALL = [f"PMC{7000 + i}" for i in range(7)]


def test_a_search_lists_the_open_access_pmcids_it_finds_for_pmc_articles(tmp_path, europe_pmc, capsys):
    out = tmp_path / "pmcids.txt"
    query = '"computed tomography" AND LICENSE:"cc by"'
    assert main(["data", "pmc-search", query, "--out", str(out), "--search-url", europe_pmc.url]) == 0
    assert f"{out}: 7 PMCIDs of open-access articles (8 matched)" in capsys.readouterr().out
    assert out.read_text().split() == ALL == read_pmcids([str(out)])
    first = europe_pmc.requests[0]
    assert first["query"] == '("computed tomography" AND LICENSE:"cc by") AND OPEN_ACCESS:y'
    assert (first["resultType"], first["format"], first["pageSize"], first["cursorMark"]) == (
        "idlist",
        "json",
        "1000",
        "*",
    )
    assert [r["cursorMark"] for r in europe_pmc.requests] == ["*", "AoE3", "AoE6", "AoE9"]

    asked = len(europe_pmc.requests)
    assert main(["data", "pmc-search", query, "--out", str(out), "--search-url", europe_pmc.url]) == 0
    assert "7 PMCIDs of open-access articles (8 matched), found by an earlier run" in capsys.readouterr().out
    assert len(europe_pmc.requests) == asked


def test_a_limit_caps_the_list(tmp_path, europe_pmc):
    counts = search_pmcids("radiology", tmp_path / "ids.txt", limit=4, search_url=europe_pmc.url, progress=False)
    assert counts == {"pmcids": 4, "matched": 8, "already done": False}
    assert (tmp_path / "ids.txt").read_text().split() == ALL[:4]
    assert len(europe_pmc.requests) == 2


def test_an_interrupted_search_resumes_at_its_cursor_and_lists_each_pmcid_once(
    tmp_path, europe_pmc, monkeypatch, capsys
):
    monkeypatch.setattr("llama3med.data.web.RETRIES", 0)
    europe_pmc.failing.add("AoE6")
    out = tmp_path / "ids.txt"
    argv = ["data", "pmc-search", "radiology", "--out", str(out), "--search-url", europe_pmc.url]
    assert main(argv) == 1
    assert "HTTP 500" in capsys.readouterr().err
    assert out.read_text().split() == ALL[:5]
    europe_pmc.failing.clear()
    europe_pmc.requests.clear()
    assert main(argv) == 0
    assert [r["cursorMark"] for r in europe_pmc.requests] == ["AoE6", "AoE9"]
    assert out.read_text().split() == ALL
