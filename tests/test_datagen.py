"""Teacher-LLM data generation, with the real anthropic and openai SDK clients talking to local servers
that speak their wire protocols: canned good, malformed and leaking replies, 429 with retry-after, 500s
and slow replies. Checks resume after a kill, bounded retries, rejects counted not written, the
concurrency bound, and that the API key never reaches an output."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from conftest import chat_reply, send_json
from llama3med.cli import main
from llama3med.datagen import (
    AnthropicTeacher,
    BadReply,
    OpenAITeacher,
    RetryPolicy,
    clean_conversation,
    generate,
    load_prompt,
    mix,
    parse_reply,
    read_captions,
)

SRC = Path(__file__).resolve().parents[1] / "src"
SECRET = "sk-test-DO-NOT-LEAK-1234"
GOOD = [
    {"from": "human", "value": "What kind of image is this?"},
    {"from": "gpt", "value": "An axial CT slice of the abdomen."},
    {"from": "human", "value": "What is abnormal?"},
    {"from": "gpt", "value": "A 3 cm hypodense lesion in the liver."},
]


class TeacherServer(ThreadingHTTPServer):
    """Anthropic `/v1/messages` and OpenAI `/v1/chat/completions`; the behaviour is chosen by a
    `CASE:<name>` marker in the record's caption (the last user message)."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.attempts: Counter = Counter()
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.headers_seen: list[str] = []
        self.withdrawn: set[str] = set()  # models answered with 404 not_found_error
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        server: TeacherServer = self.server
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        server.headers_seen.append(str(self.headers))
        last = body["messages"][-1]["content"]
        case = last.split("CASE:")[1].split()[0] if "CASE:" in last else "good"
        with server.lock:
            server.attempts[case] += 1
            attempt = server.attempts[case]
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
        try:
            if body["model"] in server.withdrawn:
                error = {"type": "not_found_error", "message": f"model: {body['model']}"}
                return self.reply(404, {"type": "error", "error": error})
            if case.startswith("slow"):
                time.sleep(0.3)
            if case.startswith("ratelimited") and attempt == 1:
                return self.reply(
                    429,
                    {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}},
                    {"retry-after": "0.2"},
                )
            if case == "broken":
                return self.reply(500, {"type": "error", "error": {"type": "api_error", "message": "boom"}})
            text = {
                "refusal": "I'm sorry, I cannot describe images.",
                "garbage": "lorem ipsum",
                "leak": json.dumps(
                    [
                        {"from": "human", "value": "What is shown?"},
                        {"from": "gpt", "value": "According to the caption, a cyst."},
                    ]
                ),
                "invented": json.dumps(
                    [{"from": "human", "value": "How big?"}, {"from": "gpt", "value": "About 7 cm."}]
                ),
            }.get(case, json.dumps(GOOD))
            payload = chat_reply(self.path, body["model"], text, 100, 50)
            self.reply(200, payload)
        finally:
            with server.lock:
                server.in_flight -= 1

    def reply(self, status: int, payload: dict, headers: dict | None = None):
        send_json(self, status, payload, headers)


@pytest.fixture()
def server():
    server = TeacherServer()
    yield server
    server.shutdown()


CC_BY = "https://creativecommons.org/licenses/by/4.0/"


def captions(path: Path, cases: list[str]) -> Path:
    rows = [
        {
            "id": f"r{i}",
            "image": f"img{i}.png",
            "caption": f"Axial CT: a 3 cm hypodense liver lesion. CASE:{case}",
            "in_text_mention": ["A cyst."],
            "domain": "CT",
            "license": CC_BY,
        }
        for i, case in enumerate(cases)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_replies_become_clean_conversations_or_are_rejected_with_a_reason():
    source = "Axial CT: a 3 cm hypodense liver lesion."
    turns = clean_conversation(parse_reply("```json\n" + json.dumps(GOOD) + "\n```"), source)
    assert turns[0]["value"] == "<image>\nWhat kind of image is this?" and len(turns) == 4
    plain = parse_reply(
        "User: What is shown?\nAssistant: A liver lesion.\nUser: Where is it?\nAssistant: In the liver."
    )
    assert [t["from"] for t in plain] == ["human", "gpt", "human", "gpt"]
    repeated = GOOD + [{"from": "human", "value": "What kind of image is this ?"}, {"from": "gpt", "value": "A CT."}]
    assert len(clean_conversation(repeated, source)) == 4  # the near-duplicate question is dropped
    for reply, reason in [
        ("", "empty"),
        ("lorem ipsum", "unparseable"),
        (json.dumps([{"from": "gpt", "value": "Hi"}, {"from": "human", "value": "?"}]), "wrong roles"),
        ("User: Describe.\nAssistant: I'm sorry, I cannot see images.", "refusal"),
        ("User: Describe.\nAssistant: As described in the legend, a cyst.", "leak"),
        ("User: How big?\nAssistant: 7 cm.", "ungrounded"),
    ]:
        with pytest.raises(BadReply) as caught:
            clean_conversation(parse_reply(reply), source)
        assert caught.value.reason == reason


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
def test_both_sdks_generate_retry_and_reject_against_their_wire_protocols(kind, server, tmp_path):
    if kind == "anthropic":
        teacher = AnthropicTeacher(api_key=SECRET, base_url=server.url)
    else:
        teacher = OpenAITeacher(model="llama-3-70b", api_key=SECRET, base_url=f"{server.url}/v1")
    cases = ["good", "ratelimited", "refusal", "garbage", "leak", "invented", "broken", "good"]

    records = read_captions(captions(tmp_path / "captions.jsonl", cases))
    out = tmp_path / "out.jsonl"
    stats = asyncio.run(
        generate(
            records,
            out,
            [(teacher, 1.0)],
            load_prompt("conversation"),
            concurrency=3,
            retry=RetryPolicy(max_retries=2, base_delay=0.01),
            progress=False,
        )
    )

    written = read_jsonl(out)
    assert [r["id"] for r in written] == ["r0", "r1", "r7"] or sorted(r["id"] for r in written) == ["r0", "r1", "r7"]
    assert all(
        r["teacher"] == kind and r["prompt"] == "conversation_v1" and len(r["input_hash"]) == 16 for r in written
    )
    assert all(r["license"] == CC_BY for r in written)  # the caption's license goes with its conversations
    assert written[0]["conversations"][0]["value"].startswith("<image>\n")
    assert dict(stats.rejected) == {"refusal": 1, "unparseable": 1, "leak": 1, "ungrounded": 1}
    assert sorted(r["id"] for r in read_jsonl(tmp_path / "out.rejected.jsonl")) == ["r2", "r3", "r4", "r5"]
    assert stats.failed["gave up after 3 attempts"] == 1 and server.attempts["broken"] == 3  # bounded
    assert server.attempts["ratelimited"] == 2 and stats.retries == 1 + 2
    assert stats.max_in_flight <= 3 and server.max_in_flight <= 3
    for path in tmp_path.iterdir():
        assert SECRET not in path.read_text()


def test_a_model_the_api_no_longer_serves_stops_the_run_at_once_and_says_what_to_do(server, tmp_path, capsys):
    server.withdrawn.add("claude-3-opus-20240229")  # the paper's teacher, retired from the API in January 2026
    records = captions(tmp_path / "captions.jsonl", ["good"] * 20)
    out = tmp_path / "out.jsonl"
    args = ["datagen", "--input", str(records), "--out", str(out), "--teacher", "anthropic", "--yes"]
    args += ["--anthropic-base-url", server.url, "--api-key", SECRET, "--concurrency", "2"]
    assert main(args) == 1
    error = capsys.readouterr().err
    assert "the anthropic teacher (claude-3-opus-20240229) cannot be used: HTTP 404: model: claude-3-opus" in error
    assert "left Anthropic's API on 2026-01-05" in error and "--anthropic-model" in error
    assert sum(server.attempts.values()) <= 2  # the requests already in flight, not one per record
    assert main([*args, "--anthropic-model", "claude-opus-4-5"]) == 0
    assert len(read_jsonl(out)) == 20


def test_concurrency_never_exceeds_the_bound(server, tmp_path):

    records = read_captions(captions(tmp_path / "c.jsonl", ["slow"] * 12))
    teacher = OpenAITeacher(api_key=SECRET, base_url=f"{server.url}/v1")
    started = time.perf_counter()
    asyncio.run(
        generate(records, tmp_path / "o.jsonl", [(teacher, 1.0)], load_prompt("vqa"), concurrency=4, progress=False)
    )
    assert server.max_in_flight == 4 and len(read_jsonl(tmp_path / "o.jsonl")) == 12
    assert time.perf_counter() - started < 12 * 0.3  # really concurrent


def test_a_killed_run_resumes_with_exactly_one_record_per_input(server, tmp_path):
    path = captions(tmp_path / "captions.jsonl", ["slow"] * 10 + ["refusal"] * 2)
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": str(SRC), "ANTHROPIC_API_KEY": SECRET}
    command = [
        sys.executable,
        "-m",
        "llama3med.cli",
        "datagen",
        "--input",
        str(path),
        "--out",
        str(out),
        "--teacher",
        "anthropic",
        "--anthropic-base-url",
        server.url,
        "--concurrency",
        "2",
        "--yes",
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while len(read_jsonl(out)) < 3 and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    first = process.communicate()
    assert 3 <= len(read_jsonl(out)) < 10
    with out.open("a") as handle:
        handle.write('{"id": "r9", "image": "img9.png", "conv')  # a line cut by the kill

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    ids = [r["id"] for r in read_jsonl(out)] + [r["id"] for r in read_jsonl(tmp_path / "out.rejected.jsonl")]
    assert sorted(ids) == sorted(f"r{i}" for i in range(12))  # each input exactly once
    for text in (*first, done.stdout, done.stderr, *(p.read_text() for p in tmp_path.iterdir())):
        assert SECRET not in text


def test_a_paid_run_needs_confirmation_and_mix_reports_its_sources(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    path = captions(tmp_path / "captions.jsonl", ["good"])
    assert main(["datagen", "--input", str(path), "--out", str(tmp_path / "o.jsonl")]) == 1
    assert "pass --yes" in capsys.readouterr().err

    claude = [
        {"id": f"c{i}", "image": "x.png", "teacher": "anthropic", "domain": "CT", "conversations": GOOD}
        for i in range(4)
    ]
    llama = [
        {"id": f"l{i}", "image": "y.png", "teacher": "openai", "domain": "MRI", "conversations": GOOD[:2]}
        for i in range(2)
    ]
    (tmp_path / "claude.jsonl").write_text("".join(json.dumps(r) + "\n" for r in claude))
    (tmp_path / "llama.json").write_text(json.dumps(llama))
    stats = mix([(tmp_path / "claude.jsonl", 0.5), (tmp_path / "llama.json", 2.0)], tmp_path / "mixed.json", seed=1)
    assert stats["by_source"] == {str(tmp_path / "claude.jsonl"): 2, str(tmp_path / "llama.json"): 4}
    assert stats["by_teacher"] == {"anthropic": 2, "openai": 4} and stats["turns"] == {
        "1 question(s)": 4,
        "2 question(s)": 2,
    }
    assert len(json.loads((tmp_path / "mixed.json").read_text())) == 6


def test_llava_med_s_records_read_as_they_are_published_domain_flags_and_figure_fields_included(tmp_path):
    flags = {"chest_xray": False, "mri": False, "ct_scan": True, "histology": False, "gross": False}
    llava_med = [  # as llava_med_instruct_60k_inline_mention.json holds them
        {"id": "m0", "image": "m0.jpg", "domain": flags, "conversations": GOOD},
        {"id": "m1", "image": "m1.jpg", "domain": {**flags, "ct_scan": False}, "conversations": GOOD},
        {"id": "m2", "image": "m2.jpg", "domain": {**flags, "mri": True}, "conversations": GOOD},
    ]
    (tmp_path / "llava_med.json").write_text(json.dumps(llava_med))
    stats = mix([(tmp_path / "llava_med.json", 1.0)], tmp_path / "mixed.json")
    assert stats["by_domain"] == {"CT": 1, "unknown": 1, "MRI, CT": 1}
    figures = [  # LLaVA-Med's figure records, as its instruct generation reads them
        {
            "pair_id": "PMC6149739_fig1_0",
            "fig_label": "Fig. 1",
            "fig_caption": "Axial CT of the liver.",
            "in_text_mention": [{"tokens": "CT showed a lesion (Fig. 1).", "start": 10}],
            "domain": flags,
        }
    ]
    (tmp_path / "figures.json").write_text(json.dumps(figures))
    record = read_captions(tmp_path / "figures.json")[0]
    assert record == {
        "id": "PMC6149739_fig1_0",
        "image": "PMC6149739_fig1_0.jpg",  # as `data llava-med-images` names it
        "caption": "Fig. 1: Axial CT of the liver.",
        "mentions": ["CT showed a lesion (Fig. 1)."],
        "domain": "CT",
        "license": None,
    }
    assert "Kind of image: CT" in load_prompt("conversation").messages(record)[-1]["content"]


def test_mix_can_keep_only_records_under_the_licenses_named(tmp_path):
    rows = [
        {"id": "a", "image": "a.png", "license": CC_BY, "conversations": GOOD},
        {
            "id": "b",
            "image": "b.png",
            "license": "https://creativecommons.org/licenses/by-nc/4.0/",
            "conversations": GOOD,
        },
        {"id": "c", "image": "c.png", "conversations": GOOD},
    ]
    (tmp_path / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = mix([(tmp_path / "set.jsonl", 1.0)], tmp_path / "all.json")
    assert stats["by_license"] == {CC_BY: 1, rows[1]["license"]: 1, "unknown": 1}
    stats = mix([(tmp_path / "set.jsonl", 1.0)], tmp_path / "cc-by.json", licenses=["creativecommons.org/licenses/by/"])
    assert [r["id"] for r in json.loads((tmp_path / "cc-by.json").read_text())] == ["a"]
    assert stats["left_out_for_license"] == 2


@pytest.mark.parametrize("sdk", ["anthropic", "openai"])
def test_a_missing_teacher_sdk_is_one_line_that_says_what_to_install(sdk, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, sdk, None)  # what importing an uninstalled package does
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    path = captions(tmp_path / "captions.jsonl", ["good"])
    args = ["datagen", "--input", str(path), "--out", str(tmp_path / "o.jsonl"), "--teacher", sdk, "--yes"]
    assert main(args) == 1
    assert f"the {sdk} teacher needs the {sdk} SDK: pip install 'llama3med[datagen]'" in capsys.readouterr().err


def test_the_output_trains_as_it_is(server, tmp_path, tokenizer):
    from llama3med.data.conversations import ConversationDataset, Source
    from llama3med.processing import Llama3MedProcessor

    records = read_captions(captions(tmp_path / "captions.jsonl", ["good"] * 3))
    for record in records:
        Image.new("RGB", (40, 40), (90, 90, 90)).save(tmp_path / record["image"])
    teacher = OpenAITeacher(api_key=SECRET, base_url=f"{server.url}/v1")
    asyncio.run(
        generate(records, tmp_path / "out.jsonl", [(teacher, 1.0)], load_prompt("conversation"), progress=False)
    )
    processor = Llama3MedProcessor(
        tokenizer, image_size=32, image_mean=[0.5] * 3, image_std=[0.5] * 3, num_image_tokens=16
    )
    dataset = ConversationDataset([Source(tmp_path / "out.jsonl", tmp_path)], processor, max_length=512, strict=True)
    assert len(dataset) == 3 and dataset[0]["pixel_values"].shape == (3, 32, 32)
