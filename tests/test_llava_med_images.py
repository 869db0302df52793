"""LLaVA-Med's figure images out of PMC's articles: from the PMC Cloud one file at a time, or from article
packages (copies, or a mirror of the old layout) each fetched once; only the listed figures written (as
`<pair_id>.jpg`, checked to be images), resumable, failures listed with reasons."""

import http.server
import io
import json
import tarfile
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from llama3med.cli import main
from llama3med.data.pmc import fetch_llava_med_images, read_image_list

PMC = "https://ftp.ncbi.nlm.nih.gov/pub/pmc/"


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_package(path: Path, files: dict[str, bytes]) -> None:
    """An article package as PMC's open-access service laid them out: `PMCID/` with the article's files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as package:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            package.addfile(info, io.BytesIO(data))


FIGURES = {"PMC100/fig1.jpg": jpeg(1), "PMC100/fig2.jpg": jpeg(2), "PMC200/gr1.jpg": jpeg(3)}
LIST = [
    {
        "pair_id": "PMC100_fig1_0",
        "pmc_tar_url": PMC + "oa_package/0a/1b/PMC100.tar.gz",
        "image_file_path": "PMC100/fig1.jpg",
    },
    {
        "pair_id": "PMC100_fig2_1",
        "pmc_tar_url": PMC + "oa_package/0a/1b/PMC100.tar.gz",
        "image_file_path": "PMC100/fig2.jpg",
    },
    {
        "pair_id": "PMC200_gr1_2",
        "pmc_tar_url": PMC + "oa_package/2c/3d/PMC200.tar.gz",
        "image_file_path": "PMC200/gr1.jpg",
    },
]


@pytest.fixture()
def mirror(tmp_path):
    """A local HTTP mirror of PMC's package folders: `requests` records the paths asked for, and a path in
    `unavailable_once` answers 503 the first time."""
    root = tmp_path / "mirror"
    write_package(
        root / "oa_package/0a/1b/PMC100.tar.gz",
        {
            "PMC100/PMC100.nxml": b"<article/>",
            "PMC100/fig1.jpg": FIGURES["PMC100/fig1.jpg"],
            "PMC100/fig2.jpg": FIGURES["PMC100/fig2.jpg"],
        },
    )
    write_package(root / "oa_package/2c/3d/PMC200.tar.gz", {"PMC200/gr1.jpg": FIGURES["PMC200/gr1.jpg"]})
    requests, unavailable_once = [], set()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            if self.path in unavailable_once:
                unavailable_once.discard(self.path)
                self.send_error(503)
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield SimpleNamespace(
        root=root,
        prefix=(PMC, f"http://127.0.0.1:{server.server_port}/"),
        requests=requests,
        unavailable_once=unavailable_once,
    )
    server.shutdown()


def image_list(tmp_path: Path, records=LIST) -> Path:
    path = tmp_path / "llava_med_image_urls.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_each_listed_figure_is_written_as_its_pair_id_and_each_package_is_fetched_once(tmp_path, mirror):
    prefix, requests = mirror.prefix, mirror.requests
    out = tmp_path / "images"
    counts = fetch_llava_med_images(read_image_list(image_list(tmp_path)), out, url_prefix=prefix, progress=False)
    assert counts == {"written": 3, "present": 0, "failed": 0}
    for record in LIST:
        assert (out / f"{record['pair_id']}.jpg").read_bytes() == FIGURES[record["image_file_path"]]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{r['pair_id']}.jpg" for r in LIST] + ["failed.jsonl"])
    assert sorted(requests) == ["/oa_package/0a/1b/PMC100.tar.gz", "/oa_package/2c/3d/PMC200.tar.gz"]


def test_a_rerun_fetches_nothing_already_written(tmp_path, mirror):
    prefix, requests = mirror.prefix, mirror.requests
    figures = read_image_list(image_list(tmp_path))
    fetch_llava_med_images(figures, tmp_path / "images", url_prefix=prefix, progress=False)
    requests.clear()
    counts = fetch_llava_med_images(figures, tmp_path / "images", url_prefix=prefix, progress=False)
    assert counts == {"written": 0, "present": 3, "failed": 0}
    assert requests == []


def test_what_cannot_be_had_is_listed_with_its_reason_and_a_rerun_retries_only_that(tmp_path, mirror):
    root, prefix, requests = mirror.root, mirror.prefix, mirror.requests
    records = [
        *LIST,
        {"pair_id": "PMC100_fig9_3", "pmc_tar_url": LIST[0]["pmc_tar_url"], "image_file_path": "PMC100/fig9.jpg"},
        {"pair_id": "PMC100_nxml_4", "pmc_tar_url": LIST[0]["pmc_tar_url"], "image_file_path": "PMC100/PMC100.nxml"},
        {
            "pair_id": "PMC300_f1_5",
            "pmc_tar_url": PMC + "oa_package/4e/5f/PMC300.tar.gz",
            "image_file_path": "PMC300/f1.jpg",
        },
    ]
    figures = read_image_list(image_list(tmp_path, records))
    out = tmp_path / "images"
    counts = fetch_llava_med_images(figures, out, url_prefix=prefix, progress=False)
    assert counts == {"written": 3, "present": 0, "failed": 3}
    reasons = {r["pair_id"]: r["reason"] for r in map(json.loads, (out / "failed.jsonl").read_text().splitlines())}
    assert reasons["PMC100_fig9_3"] == "no file PMC100/fig9.jpg in PMC100.tar.gz"
    assert reasons["PMC100_nxml_4"] == "PMC100/PMC100.nxml is not an image in PMC100.tar.gz"
    assert reasons["PMC300_f1_5"].startswith("download failed: HTTP 404")

    write_package(root / "oa_package/4e/5f/PMC300.tar.gz", {"PMC300/f1.jpg": jpeg(4)})
    requests.clear()
    counts = fetch_llava_med_images(figures, out, url_prefix=prefix, progress=False)
    assert counts == {"written": 1, "present": 3, "failed": 2}
    assert (out / "PMC300_f1_5.jpg").read_bytes() == jpeg(4)
    assert "PMC300_f1_5" not in (out / "failed.jsonl").read_text()
    assert sorted(requests) == ["/oa_package/0a/1b/PMC100.tar.gz", "/oa_package/4e/5f/PMC300.tar.gz"]


def test_a_server_error_is_retried(tmp_path, mirror):
    prefix, requests = mirror.prefix, mirror.requests
    mirror.unavailable_once.add("/oa_package/2c/3d/PMC200.tar.gz")
    counts = fetch_llava_med_images(
        read_image_list(image_list(tmp_path)), tmp_path / "images", url_prefix=prefix, progress=False
    )
    assert counts == {"written": 3, "present": 0, "failed": 0}
    assert requests.count("/oa_package/2c/3d/PMC200.tar.gz") == 2


def test_a_truncated_download_fails_its_figures_and_is_not_kept(tmp_path, mirror):
    root, prefix = mirror.root, mirror.prefix
    package = root / "oa_package/2c/3d/PMC200.tar.gz"
    package.write_bytes(package.read_bytes()[:40])
    archives = tmp_path / "archives"
    figures = read_image_list(image_list(tmp_path))
    counts = fetch_llava_med_images(figures, tmp_path / "images", archives=archives, url_prefix=prefix, progress=False)
    assert counts == {"written": 2, "present": 0, "failed": 1}
    assert sorted(p.name for p in archives.iterdir()) == ["PMC100.tar.gz"]  # downloads kept, the broken one not


def test_the_command_reads_packages_from_a_folder_of_copies_without_the_network(tmp_path, capsys):
    archives = tmp_path / "archives"
    write_package(archives / "PMC100.tar.gz", {k: v for k, v in FIGURES.items() if k.startswith("PMC100/")})
    write_package(archives / "PMC200.tar.gz", {"PMC200/gr1.jpg": FIGURES["PMC200/gr1.jpg"]})
    out = tmp_path / "images"
    argv = ["data", "llava-med-images", str(image_list(tmp_path)), "--out", str(out), "--archives", str(archives)]
    argv += ["--url-prefix", f"{PMC}=http://127.0.0.1:9/"]  # nothing listens there
    assert main(argv) == 0
    assert "3 figures written, 0 already there, 0 failed" in capsys.readouterr().out
    assert (out / "PMC200_gr1_2.jpg").read_bytes() == FIGURES["PMC200/gr1.jpg"]


@pytest.mark.parametrize(
    "line, message",
    [
        (
            '{"pair_id": "a/b", "pmc_tar_url": "u", "image_file_path": "p"}',
            ":1: 'pair_id' 'a/b' is not a plain file name",
        ),
        ('{"pair_id": "a", "image_file_path": "p"}', ":1: 'pmc_tar_url' must be a non-empty string"),
        ("not json", ":1: not JSON"),
    ],
)
def test_a_bad_line_of_the_image_list_is_named(tmp_path, capsys, line, message):
    path = tmp_path / "urls.jsonl"
    path.write_text(line + "\n")
    assert main(["data", "llava-med-images", str(path), "--out", str(tmp_path / "images")]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "source, advice",
    [("packages from a mirror", "HTTP 404.* give --archives"), ("the PMC Cloud", "give --cloud-url")],
)
def test_a_run_whose_articles_cannot_be_downloaded_at_all_stops_early_saying_why(
    tmp_path, mirror, monkeypatch, source, advice
):
    monkeypatch.setattr("llama3med.data.web.GIVE_UP_AFTER", 2)
    monkeypatch.setattr("llama3med.data.web.RETRIES", 0)
    records = [
        {
            "pair_id": f"PMC9{i}_f_{i}",
            "pmc_tar_url": f"{PMC}oa_package/ff/ff/PMC9{i}.tar.gz",
            "image_file_path": "f.jpg",
        }
        for i in range(6)
    ]
    where = {"url_prefix": mirror.prefix} if source.startswith("packages") else {"cloud_url": "http://127.0.0.1:9"}
    with pytest.raises(RuntimeError, match=f"the first 2 articles could not be downloaded .*{advice}"):
        fetch_llava_med_images(
            read_image_list(image_list(tmp_path, records)), tmp_path / "images", **where, concurrency=1, progress=False
        )
    assert len(mirror.requests) <= 3  # the 2 that failed, and at most the 1 handed out meanwhile


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg(seed))).save(buffer, format="PNG")
    return buffer.getvalue()


def test_without_a_package_each_figure_is_fetched_alone_from_the_pmc_cloud_by_its_file_name(
    tmp_path, pmc_cloud, capsys
):
    pmc_cloud.objects.update(
        {
            "PMC100.1/PMC100.1.xml": b"<article/>",
            "PMC100.1/fig1.jpg": jpeg(10),  # superseded by version 2
            "PMC100.1/fig2.jpg": FIGURES["PMC100/fig2.jpg"],  # only in version 1
            "PMC100.2/PMC100.2.xml": b"<article/>",
            "PMC100.2/PMC100.2.pdf": b"%PDF-1.7",
            "PMC100.2/fig1.jpg": FIGURES["PMC100/fig1.jpg"],
            "PMC100.2/media-1.mp4": b"\0" * 64,
            "PMC200.1/gr1.png": png(3),  # the package's gr1.jpg, stored since as PNG
            "PMC2000.1/gr1.jpg": jpeg(11),  # another article, whose PMCID starts alike
        }
    )
    pmc_cloud.unavailable_once.add("PMC100.2/fig1.jpg")
    out = tmp_path / "images"
    argv = ["data", "llava-med-images", str(image_list(tmp_path)), "--out", str(out), "--cloud-url", pmc_cloud.url]
    assert main(argv) == 0
    assert "3 figures written, 0 already there, 0 failed" in capsys.readouterr().out
    assert (out / "PMC100_fig1_0.jpg").read_bytes() == FIGURES["PMC100/fig1.jpg"]
    assert (out / "PMC100_fig2_1.jpg").read_bytes() == FIGURES["PMC100/fig2.jpg"]
    with Image.open(out / "PMC200_gr1_2.jpg") as converted:  # a PNG in the cloud, written as the JPEG it is named
        assert converted.format == "JPEG"
        original = np.asarray(Image.open(io.BytesIO(pmc_cloud.objects["PMC200.1/gr1.png"])), dtype=float)
        assert np.abs(np.asarray(converted, dtype=float) - original).mean() < 8
    fetched = sorted(path for path in pmc_cloud.requests if not path.startswith("/?"))
    assert fetched == ["/PMC100.1/fig2.jpg", "/PMC100.2/fig1.jpg", "/PMC100.2/fig1.jpg", "/PMC200.1/gr1.png"]

    asked = len(pmc_cloud.requests)
    assert main(argv) == 0  # a rerun asks the cloud for nothing
    assert "0 figures written, 3 already there, 0 failed" in capsys.readouterr().out
    assert len(pmc_cloud.requests) == asked


def test_what_the_pmc_cloud_lacks_is_listed_with_its_reason(tmp_path, pmc_cloud):
    pmc_cloud.objects.update({"PMC100.1/fig1.jpg": b"<html>not found</html>", "PMC100.1/fig2.jpg": jpeg(2)})
    records = LIST + [
        {"pair_id": "PMC100_fig9_3", "pmc_tar_url": LIST[0]["pmc_tar_url"], "image_file_path": "PMC100/fig9.jpg"}
    ]
    out = tmp_path / "images"
    counts = fetch_llava_med_images(
        read_image_list(image_list(tmp_path, records)), out, cloud_url=pmc_cloud.url, progress=False
    )
    assert counts == {"written": 1, "present": 0, "failed": 3}
    reasons = {f["pair_id"]: f["reason"] for f in map(json.loads, (out / "failed.jsonl").read_text().splitlines())}
    assert reasons == {
        "PMC100_fig1_0": "PMC100.1/fig1.jpg is not an image",
        "PMC100_fig9_3": "no file fig9.jpg in PMC100 in the PMC Cloud",
        "PMC200_gr1_2": "PMC200 is not in the PMC Cloud",
    }
