"""Figures, captions and citing sentences out of PMC articles (JATS XML as PMC publishes it, packaged or
in a folder), ready for `llama3med datagen`; resumable, unreadable articles listed."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from llama3med.cli import main
from llama3med.data.pmc_figures import domain_of, extract_pmc_figures, imaging_kinds
from llama3med.datagen.pipeline import read_captions

ARTICLE = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE article PUBLIC "-//NLM//DTD JATS (Z39.96) Journal Archiving and Interchange DTD v1.2 20190208//EN"
  "JATS-archivearticle1.dtd">
<article xmlns:xlink="http://www.w3.org/1999/xlink" xmlns:ali="http://www.niso.org/schemas/ali/1.0/"
  article-type="case-report">
  <front>
    <journal-meta>
      <journal-title-group><journal-title>Radiol Case Rep</journal-title></journal-title-group>
    </journal-meta>
    <article-meta>
      <article-id pub-id-type="pmid">31234567</article-id>
      <article-id pub-id-type="pmc">6149739</article-id>
      <title-group><article-title>Hepatic lesion in a 54-year-old</article-title></title-group>
      <permissions>
        <license license-type="open-access" xlink:href="https://creativecommons.org/licenses/by/4.0/">
          <ali:license_ref>https://creativecommons.org/licenses/by/4.0/</ali:license_ref>
          <license-p>This is an open access article under the CC BY license.</license-p>
        </license>
      </permissions>
    </article-meta>
  </front>
  <body>
    <sec>
      <title>Case</title>
      <p>A 54-year-old man presented with pain. Axial CT showed a hypodense lesion in segment VII
        (<xref ref-type="fig" rid="fig1">Fig. 1</xref>). The lesion measured 2 cm. MRI confirmed it
        (<xref ref-type="fig" rid="fig1 fig2">Figs. 1 and 2</xref>).</p>
      <p>No other finding was seen.<fig id="fig9"><label>Fig. 9</label><caption><p>Placed inline
        (<xref ref-type="fig" rid="fig1">Fig. 1</xref>).</p></caption></fig></p>
    </sec>
  </body>
  <floats-group>
    <fig id="fig1" position="float">
      <label>Fig. 1</label>
      <caption>
        <p>Axial contrast-enhanced CT: a <italic>hypodense</italic> lesion (arrow) in the right lobe.</p>
      </caption>
      <graphic xlink:href="gr1"/>
    </fig>
    <fig id="fig2" position="float">
      <label>Fig. 2</label>
      <caption><p>T2-weighted MRI of the same lesion.</p></caption>
      <graphic xlink:href="gr2.png"/>
    </fig>
    <fig id="fig3" position="float">
      <label>Fig. 3</label>
      <caption><p>A figure whose image the package lacks.</p></caption>
      <graphic xlink:href="gr3"/>
    </fig>
  </floats-group>
</article>
"""


def image_bytes(seed: int, format: str) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 28, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=format)
    return buffer.getvalue()


FILES = {"rcr-1.nxml": ARTICLE.encode(), "gr1.jpg": image_bytes(1, "JPEG"), "gr2.png": image_bytes(2, "PNG")}


def write_package(path, files: dict[str, bytes], top: str = "PMC6149739") -> None:
    with tarfile.open(path, "w:gz") as package:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            package.addfile(info, io.BytesIO(data))


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "figures.jsonl").read_text().splitlines()]


def test_each_figure_with_its_image_gives_a_record_with_caption_mentions_and_license(tmp_path):
    (tmp_path / "articles").mkdir()
    write_package(tmp_path / "articles" / "PMC6149739.tar.gz", FILES)
    counts = extract_pmc_figures(tmp_path / "articles", tmp_path / "out", progress=False)
    assert counts == {"articles": 1, "figures": 2, "without image or caption": 2, "failed": 0, "already done": 0}
    first, second = records(tmp_path / "out")
    assert first == {
        "id": "PMC6149739_fig1",
        "image": "PMC6149739_fig1.jpg",
        "caption": "Fig. 1 Axial contrast-enhanced CT: a hypodense lesion (arrow) in the right lobe.",
        "in_text_mention": [
            "Axial CT showed a hypodense lesion in segment VII (Fig. 1).",
            "MRI confirmed it (Figs. 1 and 2).",
        ],
        "domain": "CT",
        "pmcid": "PMC6149739",
        "license": "https://creativecommons.org/licenses/by/4.0/",
        "article": "PMC6149739",
    }
    assert second["image"] == "PMC6149739_fig2.png" and second["in_text_mention"] == [
        "MRI confirmed it (Figs. 1 and 2)."
    ]
    assert second["domain"] == "MRI"
    assert (tmp_path / "out" / "images" / "PMC6149739_fig1.jpg").read_bytes() == FILES["gr1.jpg"]
    assert (tmp_path / "out" / "images" / "PMC6149739_fig2.png").read_bytes() == FILES["gr2.png"]
    # what datagen reads: the caption, and the mentions the teacher may use
    captions = read_captions(tmp_path / "out" / "figures.jsonl")
    assert [c["mentions"] for c in captions] == [first["in_text_mention"], second["in_text_mention"]]


def test_an_article_folder_reads_as_its_package_does(tmp_path):
    folder = tmp_path / "articles" / "PMC6149739"
    folder.mkdir(parents=True)
    for name, data in FILES.items():
        (folder / name).write_bytes(data)
    extract_pmc_figures(tmp_path / "articles", tmp_path / "from-folder", progress=False)
    write_package(tmp_path / "PMC6149739.tar.gz", FILES)
    (tmp_path / "packages").mkdir()
    (tmp_path / "PMC6149739.tar.gz").rename(tmp_path / "packages" / "PMC6149739.tar.gz")
    extract_pmc_figures(tmp_path / "packages", tmp_path / "from-package", progress=False)
    assert records(tmp_path / "from-folder") == records(tmp_path / "from-package")


def test_a_rerun_does_only_new_articles_and_an_interrupted_article_is_redone_whole(tmp_path):
    articles = tmp_path / "articles"
    articles.mkdir()
    write_package(articles / "PMC6149739.tar.gz", FILES)
    out = tmp_path / "out"
    extract_pmc_figures(articles, out, progress=False)
    other = ARTICLE.replace("6149739", "1111111")
    write_package(articles / "PMC1111111.tar.gz", {**FILES, "rcr-1.nxml": other.encode()}, top="PMC1111111")
    with open(out / "figures.jsonl", "a") as file:  # what a kill midway through the new article leaves
        file.write(json.dumps({**records(out)[0], "id": "PMC1111111_fig1", "article": "PMC1111111"}) + "\n")
    counts = extract_pmc_figures(articles, out, progress=False)
    assert counts["articles"] == 1 and counts["already done"] == 1
    assert [r["id"] for r in records(out)] == [
        "PMC6149739_fig1",
        "PMC6149739_fig2",
        "PMC1111111_fig1",
        "PMC1111111_fig2",
    ]


def test_an_unreadable_article_is_listed_and_the_others_are_done(tmp_path, capsys):
    articles = tmp_path / "articles"
    articles.mkdir()
    write_package(articles / "PMC6149739.tar.gz", FILES)
    write_package(articles / "PMC2222222.tar.gz", {**FILES, "rcr-1.nxml": b"<article><body>"}, top="PMC2222222")
    (articles / "PMC3333333.tar.gz").write_bytes(b"not a package")
    assert main(["data", "pmc-figures", str(articles), "--out", str(tmp_path / "out")]) == 0
    assert "2 figures from 1 articles" in capsys.readouterr().out
    failed = [json.loads(line) for line in (tmp_path / "out" / "failed.jsonl").read_text().splitlines()]
    assert [f["article"] for f in failed] == ["PMC2222222.tar.gz", "PMC3333333.tar.gz"]


@pytest.mark.parametrize(
    "caption, kinds",
    [
        ("Axial contrast-enhanced CT of the abdomen.", ["ct"]),
        ("Coronal T2-weighted image and FLAIR.", ["mri"]),
        ("PET/CT fusion images show uptake.", ["ct", "nuclear"]),
        ("Chest radiograph on admission.", ["xray"]),
        ("Transthoracic echocardiography, apical view.", ["ultrasound"]),
        ("Photomicrograph of the tumour (H&E, original magnification x400).", ["histology"]),
        ("Gross specimen: cut surface of the resected kidney.", ["gross"]),
        ("Colonoscopy shows a polyp.", ["endoscopy"]),
        ("Fundus photograph and OCT of the left eye.", ["ophthalmology"]),
        ("Ct values of the qPCR over 30 days; stained-glass model of the pathway.", []),
        ("Kaplan-Meier survival curves by treatment arm.", []),
    ],
)
def test_a_figure_s_kind_of_image_is_read_from_the_words_of_its_caption(caption, kinds):
    assert imaging_kinds(caption) == kinds


def test_figures_can_be_kept_by_the_kind_of_image_their_caption_names(tmp_path, capsys):
    (tmp_path / "articles").mkdir()
    write_package(tmp_path / "articles" / "PMC6149739.tar.gz", FILES)
    argv = ["data", "pmc-figures", str(tmp_path / "articles"), "--out", str(tmp_path / "out"), "--kind", "mri"]
    assert main(argv) == 0
    assert "1 of other kinds" in capsys.readouterr().out
    assert [(r["id"], r["domain"]) for r in records(tmp_path / "out")] == [("PMC6149739_fig2", "MRI")]
    assert domain_of(["ct", "nuclear"]) == "CT, nuclear medicine" and domain_of([]) is None
