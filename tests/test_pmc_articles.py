"""Open-access articles from the PMC Cloud (S3's protocol, served locally): each article's JATS XML and
its figures' images alone, from its newest version or the one asked for, into the folders pmc-figures
reads; resumable, what cannot be had listed with its reason."""

import json

import pytest
from test_pmc_figures import ARTICLE, FILES, records, write_package

from llama3med.cli import main
from llama3med.data.pmc_articles import fetch_pmc_articles, read_pmcids
from llama3med.data.pmc_figures import extract_pmc_figures

# The cloud serves the article XML of PMC's OAI-PMH service: JATS's namespace declared, possibly wrapped.
OAI_ARTICLE = (
    "<pmc-articleset>"
    + ARTICLE.split("\n", 3)[3].replace("<article ", '<article xmlns="https://jats.nlm.nih.gov/ns/archiving/1.3/" ', 1)
    + "</pmc-articleset>"
)
OLDER_ARTICLE = ARTICLE.replace("T2-weighted MRI of the same lesion.", "MRI of the lesion.")


def metadata(version: str, retracted: bool = False) -> bytes:
    """The cloud's record of an article version, `metadata/<version>.json`, with the fields PMC gives."""
    pmcid, number = version.split(".")
    folder = f"s3://pmc-oa-opendata/{version}/{version}"
    record = {
        "pmcid": pmcid,
        "version": int(number),
        "pmid": 31234567,
        "doi": "10.1016/j.radcr.2018.06.001",
        "title": "Hepatic lesion in a 54-year-old",
        "is_pmc_openaccess": True,
        "is_manuscript": False,
        "is_historical_ocr": False,
        "is_retracted": retracted,
        "license_code": "CC BY",
        "xml_url": f"{folder}.xml",
        "pdf_url": f"{folder}.pdf",
        "media_urls": [],
        "text_url": f"{folder}.txt",
    }
    return json.dumps(record).encode()


def cloud_with_article(pmc_cloud) -> None:
    pmc_cloud.objects.update(
        {
            "PMC6149739.1/PMC6149739.1.xml": OLDER_ARTICLE.encode(),
            "PMC6149739.1/gr1.jpg": FILES["gr1.jpg"],
            "PMC6149739.1/gr2.png": FILES["gr2.png"],
            "PMC6149739.2/PMC6149739.2.xml": OAI_ARTICLE.encode(),
            "PMC6149739.2/PMC6149739.2.pdf": b"%PDF-1.7",
            "PMC6149739.2/PMC6149739.2.txt": b"A 54-year-old man presented with pain.",
            "PMC6149739.2/gr1.jpg": FILES["gr1.jpg"],
            "PMC6149739.2/gr2.png": FILES["gr2.png"],
            "PMC6149739.2/media-1.zip": b"PK\x05\x06" + b"\0" * 18,
            "metadata/PMC6149739.1.json": metadata("PMC6149739.1"),
            "metadata/PMC6149739.2.json": metadata("PMC6149739.2"),
        }
    )


def test_an_article_is_its_newest_version_s_jats_and_figure_images_and_pmc_figures_reads_it(
    tmp_path, pmc_cloud, capsys
):
    cloud_with_article(pmc_cloud)
    pmc_cloud.unavailable_once.add("PMC6149739.2/gr1.jpg")  # a server error is retried
    articles = tmp_path / "articles"
    assert main(["data", "pmc-articles", "PMC6149739", "--out", str(articles), "--cloud-url", pmc_cloud.url]) == 0
    assert "1 articles fetched (2 figure images), 0 already there, 0 failed" in capsys.readouterr().out
    folder = articles / "PMC6149739"
    assert sorted(p.name for p in folder.iterdir()) == ["PMC6149739.2.json", "PMC6149739.2.xml", "gr1.jpg", "gr2.png"]
    assert (folder / "gr2.png").read_bytes() == FILES["gr2.png"]
    assert json.loads((folder / "PMC6149739.2.json").read_text())["license_code"] == "CC BY"
    fetched = [path for path in pmc_cloud.requests if not path.startswith("/?")]
    assert sorted(fetched) == [  # no PDF, text or supplementary file; gr1.jpg twice, after a server error
        "/PMC6149739.2/PMC6149739.2.xml",
        "/PMC6149739.2/gr1.jpg",
        "/PMC6149739.2/gr1.jpg",
        "/PMC6149739.2/gr2.png",
        "/metadata/PMC6149739.2.json",
    ]

    assert main(["data", "pmc-figures", str(articles), "--out", str(tmp_path / "from-cloud")]) == 0
    (tmp_path / "packages").mkdir()
    write_package(tmp_path / "packages" / "PMC6149739.tar.gz", FILES)
    extract_pmc_figures(tmp_path / "packages", tmp_path / "from-package", progress=False)
    assert records(tmp_path / "from-cloud") == records(tmp_path / "from-package")
    assert len(records(tmp_path / "from-cloud")) == 2


def test_a_version_can_be_named_what_cannot_be_had_is_listed_and_a_rerun_asks_only_for_that(tmp_path, pmc_cloud):
    cloud_with_article(pmc_cloud)
    pmc_cloud.objects["PMC7000001.1/PMC7000001.1.xml"] = b"<article><front>"  # no metadata record: none needed
    pmc_cloud.objects["PMC7000002.1/PMC7000002.1.xml"] = ARTICLE.encode()
    pmc_cloud.objects["metadata/PMC7000002.1.json"] = metadata("PMC7000002.1", retracted=True)
    ids = tmp_path / "oa_file_list.csv"
    ids.write_text(
        "File,Article Citation,Accession ID,Last Updated (YYYY-MM-DD HH:MM:SS),PMID,License\n"
        "oa_package/08/e0/PMC6149739.tar.gz,Radiol Case Rep. 2018,PMC6149739,2018-10-01 00:00:00,31234567,CC BY\n"
        "\n"
        "oa_package/1a/2b/PMC555.tar.gz,Gone,PMC555,2019-01-01 00:00:00,,CC BY\n"
    )
    pmcids = read_pmcids([str(ids), "PMC6149739.1", "PMC6149739.7", "PMC7000001", "PMC7000002", "PMC6149739"])
    assert pmcids == ["PMC6149739", "PMC555", "PMC6149739.1", "PMC6149739.7", "PMC7000001", "PMC7000002"]
    out = tmp_path / "articles"
    counts = fetch_pmc_articles(pmcids, out, cloud_url=pmc_cloud.url, progress=False)
    assert counts == {"fetched": 2, "present": 0, "failed": 4, "figures": 4}
    assert (out / "PMC6149739.1" / "PMC6149739.1.xml").read_text() == OLDER_ARTICLE
    failures = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert failures == [
        {"pmcid": "PMC555", "reason": "not in the PMC Cloud"},
        {"pmcid": "PMC6149739.7", "reason": "the PMC Cloud has no PMC6149739.7, only PMC6149739.2, PMC6149739.1"},
        {"pmcid": "PMC7000001", "reason": "unreadable JATS XML PMC7000001.1.xml: no element found: line 1, column 16"},
        {"pmcid": "PMC7000002", "reason": "PMC7000002.1 is retracted"},
    ]

    pmc_cloud.requests.clear()
    pmc_cloud.objects["PMC555.3/PMC555.3.xml"] = ARTICLE.encode()  # published since
    counts = fetch_pmc_articles(pmcids, out, cloud_url=pmc_cloud.url, progress=False)
    assert counts == {"fetched": 1, "present": 2, "failed": 3, "figures": 0}
    assert {path.split("prefix=")[1].split("&")[0] for path in pmc_cloud.requests if path.startswith("/?")} == {
        "PMC555.",
        "PMC6149739.",  # for PMC6149739.7
        "PMC7000001.",
        "PMC7000002.",
    }


def test_an_article_a_kill_left_half_written_is_fetched_again_and_never_read_meanwhile(tmp_path, pmc_cloud):
    cloud_with_article(pmc_cloud)
    out = tmp_path / "articles"
    (out / ".PMC6149739.partial").mkdir(parents=True)
    (out / ".PMC6149739.partial" / "PMC6149739.2.xml").write_text(ARTICLE)
    assert extract_pmc_figures(out, tmp_path / "figures", progress=False)["articles"] == 0
    assert fetch_pmc_articles(["PMC6149739"], out, cloud_url=pmc_cloud.url, progress=False)["fetched"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["PMC6149739", "failed.jsonl"]


def test_an_argument_that_is_neither_a_pmcid_nor_a_file_is_named(tmp_path, capsys):
    assert main(["data", "pmc-articles", "6149739", "--out", str(tmp_path / "articles")]) == 1
    assert "6149739: neither a PMCID (such as PMC6149739) nor a file of them" in capsys.readouterr().err


def test_a_run_that_cannot_reach_the_pmc_cloud_stops_early_saying_why(tmp_path, monkeypatch):
    monkeypatch.setattr("llama3med.data.web.GIVE_UP_AFTER", 2)
    monkeypatch.setattr("llama3med.data.web.RETRIES", 0)
    with pytest.raises(RuntimeError, match="the first 2 articles could not be downloaded .* give --cloud-url"):
        fetch_pmc_articles(
            [f"PMC9{i}" for i in range(6)], tmp_path, cloud_url="http://127.0.0.1:9", concurrency=1, progress=False
        )
