"""`eval` and `answer` of a model behind an OpenAI-compatible endpoint (`--api-url`): a real `llama3med
serve` of the demo model answers exactly what the same model answers locally, scored on the same harness;
a busy endpoint's 429s are waited out, an interrupted run resumes without asking twice, and options that
belong to the other source are refused."""

import base64
import dataclasses
import http.server
import io
import json
import re
import threading
from pathlib import Path

import httpx
import openai
import pytest
import torch
from PIL import Image

from conftest import Server, needs_node
from llama3med.checkpoints import DEMO_MODEL_DIR, load
from llama3med.cli import main
from llama3med.data import web
from llama3med.data.benchmarks import load_benchmark, prompt_text
from llama3med.data.web import is_public_host
from llama3med.datagen.teachers import RetryPolicy
from llama3med.eval.api import TOP_LOGPROBS, ChatAPI, image_data_url, run_api, yes_probability_of
from llama3med.inference import begun_word, question_messages
from llama3med.processing import load_image


@pytest.fixture(scope="module")
def demo_server():
    server = Server(DEMO_MODEL_DIR, model_id="llama3med-demo")
    yield server
    server.stop()


def requests_answered(server: Server) -> dict[str, int]:
    metrics = httpx.get(f"{server.url}/metrics").text
    return {status: int(n) for status, n in re.findall(r'llama3med_requests_total\{status="(\d+)"\} (\d+)', metrics)}


def answers(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "answers.jsonl").read_text().splitlines()]


def test_an_endpoint_is_scored_on_the_same_harness_with_the_answers_the_model_gives_locally(
    demo_server, test_set, tmp_path
):
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert main(["eval", "--model", str(DEMO_MODEL_DIR), "--data", str(test_set), "--out", str(local)]) == 0
    api = ["eval", "--api-url", f"{demo_server.url}/v1", "--data", str(test_set), "--out", str(remote)]
    before = requests_answered(demo_server).get("200", 0)
    assert main([*api, "--limit", "5"]) == 0  # interrupted after five questions
    assert main(api) == 0

    questions = load_benchmark("llava-med", test_set)
    assert requests_answered(demo_server)["200"] - before == len(questions)  # none asked twice
    assert [row["question_id"] for row in answers(remote)] == [r.id for r in questions]
    assert [row["text"] for row in answers(remote)] == [row["text"] for row in answers(local)]
    assert {row["model_id"] for row in answers(remote)} == {"llama3med-demo"}
    local_report = json.loads((local / "report.json").read_text())
    remote_report = json.loads((remote / "report.json").read_text())
    assert remote_report["scores"] == local_report["scores"]
    assert (remote_report["model"], remote_report["api_url"]) == ("llama3med-demo", f"{demo_server.url}/v1")
    assert remote_report["closed_auroc"]["n_yes"] == local_report["closed_auroc"]["n_yes"] > 0  # ranked by P(yes)


def test_an_endpoints_answers_carry_the_p_yes_its_top_logprobs_give(demo_server, test_set, tmp_path):
    records = load_benchmark("llava-med", test_set)[:3]
    run_api(ChatAPI(f"{demo_server.url}/v1"), records, tmp_path / "answers.jsonl")
    model, processor = load(DEMO_MODEL_DIR)
    p_yes = {row["question_id"]: row["metadata"]["p_yes"] for row in answers(tmp_path)}
    for record in records:
        inputs = processor(
            [processor.chat_prompt(question_messages(prompt_text(record, "plain")))], images=[record.image]
        )
        with torch.no_grad():
            first = torch.softmax(model(**inputs).logits[0, -1].float(), dim=-1)
        listed = first.topk(TOP_LOGPROBS).indices.tolist()  # what the endpoint lists
        yes, no = ([t for t in listed if begun_word(processor.decode([t])) == word] for word in ("yes", "no"))
        assert p_yes[record.id] == pytest.approx(float(first[yes].sum() / first[yes + no].sum()), rel=1e-4)


def test_answer_asks_an_endpoint_a_question_file_in_its_order(demo_server, tmp_path, capsys):
    questions = Path(__file__).parents[1] / "examples" / "questions.jsonl"
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert main(["answer", str(questions), "--model", str(DEMO_MODEL_DIR), "--out", str(local)]) == 0
    assert main(["answer", str(questions), "--api-url", f"{demo_server.url}/v1", "--out", str(remote)]) == 0
    assert [(r["question_id"], r["text"]) for r in answers(remote)] == [
        (r["question_id"], r["text"]) for r in answers(local)
    ]
    assert "public host" not in capsys.readouterr().err  # 127.0.0.1


def test_a_users_own_images_bound_for_a_public_host_are_announced_before_they_are_sent(
    demo_server, tmp_path, monkeypatch, capsys
):
    assert is_public_host("8.8.8.8") and not is_public_host("127.0.0.1") and not is_public_host("10.1.2.3")
    monkeypatch.setattr(web, "is_public_host", lambda host: True)  # as if the server were on the internet
    questions = Path(__file__).parents[1] / "examples" / "questions.jsonl"
    assert main(["answer", str(questions), "--api-url", f"{demo_server.url}/v1", "--out", str(tmp_path)]) == 0
    assert "127.0.0.1 is a public host and every image and question goes there" in capsys.readouterr().err


def test_a_system_message_reaches_the_endpoint_before_each_question_as_it_is_put_locally(
    demo_server, test_set, tmp_path
):
    system = "You are a radiologist. Answer in one word."
    local, remote = tmp_path / "local", tmp_path / "remote"
    flags = ["--data", str(test_set), "--limit", "6", "--system", system]
    assert main(["eval", "--model", str(DEMO_MODEL_DIR), "--out", str(local), *flags]) == 0
    endpoint = forwarding(Forwards, demo_server.url)
    try:
        url = f"http://127.0.0.1:{endpoint.server_port}/v1"
        assert main(["eval", "--api-url", url, "--out", str(remote), *flags]) == 0
    finally:
        endpoint.shutdown()
    assert [row["text"] for row in answers(remote)] == [row["text"] for row in answers(local)]
    asked = [body["messages"] for body in Forwards.bodies if "messages" in body]
    assert len(asked) == 6 and all(messages[0] == {"role": "system", "content": system} for messages in asked)
    assert [messages[1]["role"] for messages in asked] == ["user"] * 6
    assert json.loads((remote / "settings.json").read_text())["system"] == system


def test_an_endpoint_samples_each_question_with_a_seed_of_its_own_that_repeats_it(demo_server, test_set, tmp_path):
    def texts(name: str, *flags: str) -> list[str]:
        args = ["eval", "--api-url", f"{demo_server.url}/v1", "--data", str(test_set), "--out", str(tmp_path / name)]
        assert main([*args, "--temperature", "2", *flags]) == 0
        return [row["text"] for row in answers(tmp_path / name)]

    sampled = texts("a", "--seed", "4")
    assert sampled == texts("b", "--seed", "4") != texts("c", "--seed", "5")
    assert json.loads((tmp_path / "a" / "settings.json").read_text())["sampling"]["seed"] == 4


class Forwards(http.server.BaseHTTPRequestHandler):
    """An endpoint that passes every request on to the server in `upstream`, keeping each POST's body."""

    upstream = ""
    bodies: list[dict] = []

    def do_GET(self):
        self.reply(httpx.get(self.upstream + self.path))

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        self.bodies.append(json.loads(body))
        self.reply(self.answer(json.loads(body), body))

    def answer(self, request: dict, body: bytes) -> httpx.Response:
        return httpx.post(self.upstream + self.path, content=body, headers={"content-type": "application/json"})

    def reply(self, response: httpx.Response):
        self.send_response(response.status_code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(response.content)))
        self.end_headers()
        self.wfile.write(response.content)

    def log_message(self, *args):
        pass


class RefusesLogprobs(Forwards):
    """An endpoint that refuses `logprobs` with a 400, as some hosted models do."""

    def answer(self, request: dict, body: bytes) -> httpx.Response:
        if "logprobs" in request:
            error = {"error": {"message": "logprobs is not supported for this model", "type": "invalid_request_error"}}
            return httpx.Response(400, json=error)
        return super().answer(request, body)


def forwarding(handler: type[Forwards], upstream: str) -> http.server.ThreadingHTTPServer:
    """`handler` serving on a free local port in a thread of its own, in front of `upstream`."""
    handler.upstream, handler.bodies = upstream, []
    endpoint = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=endpoint.serve_forever, daemon=True).start()
    return endpoint


def test_an_endpoint_that_refuses_logprobs_is_asked_without_them(demo_server, test_set, tmp_path, capsys):
    endpoint = forwarding(RefusesLogprobs, demo_server.url)
    try:
        records = load_benchmark("llava-med", test_set)[:4]
        run_api(ChatAPI(f"http://127.0.0.1:{endpoint.server_port}/v1"), records, tmp_path / "answers.jsonl")
    finally:
        endpoint.shutdown()
    assert sorted(row["question_id"] for row in answers(tmp_path)) == sorted(r.id for r in records)
    assert all(row["metadata"] == {} for row in answers(tmp_path))  # no P(yes), so no AUROC
    assert capsys.readouterr().err.count("refuses logprobs") == 1


def test_a_busy_endpoints_429s_are_waited_out_and_every_question_is_answered(test_set, tmp_path):
    server = Server(DEMO_MODEL_DIR, max_queue=1)
    try:
        records = load_benchmark("llava-med", test_set)
        got = run_api(ChatAPI(f"{server.url}/v1"), records, tmp_path / "answers.jsonl", concurrency=6)
        assert requests_answered(server)["429"] > 0
        assert sorted(got) == sorted(r.id for r in records)
    finally:
        server.stop()


def test_an_endpoint_that_keeps_failing_ends_the_run_keeping_what_was_answered(tmp_path, test_set):
    records = load_benchmark("llava-med", test_set)
    api = ChatAPI("http://127.0.0.1:9/v1", model="any")  # nothing listens on the discard port
    with pytest.raises(ValueError, match=f"kept failing.*{len(records)} questions are still to answer"):
        run_api(api, records, tmp_path / "answers.jsonl", retry=RetryPolicy(max_retries=1, base_delay=0.01))


def test_plain_images_are_sent_as_they_are_and_medical_ones_as_the_picture_the_model_sees(tmp_path, test_set):
    record = load_benchmark("llava-med", test_set)[0]
    assert record.image.suffix == ".dcm"
    sent = image_data_url(record)
    assert sent.startswith("data:image/png;base64,")
    picture = Image.open(io.BytesIO(base64.b64decode(sent.split(",", 1)[1])))
    assert picture.tobytes() == load_image(record.image).tobytes()

    jpeg = tmp_path / "x.jpg"
    load_image(record.image).save(jpeg, quality=90)
    assert image_data_url(dataclasses.replace(record, image=jpeg, image_key="")) == (
        "data:image/jpeg;base64," + base64.b64encode(jpeg.read_bytes()).decode()
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--api-url", "http://127.0.0.1:9/v1", "--fp8", "--batch-size", "4"], "--fp8, --batch-size: for a local"),
        (["--model", "m", "--api-model", "gpt-4o"], "--api-model: only with --api-url"),
        (["--api-url", "http://127.0.0.1:9/v1"], "cannot list its models"),
    ],
)
def test_options_of_the_other_source_and_an_unreachable_endpoint_are_one_line_errors(
    flags, message, test_set, tmp_path, capsys
):
    assert main(["eval", *flags, "--data", str(test_set), "--out", str(tmp_path / "out")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "answers.jsonl").exists()


@needs_node
def test_the_web_page_shows_a_yes_or_no_answers_p_yes_as_eval_through_the_api_reads_it(demo_server, tmp_path):
    examples = Path(__file__).resolve().parents[1] / "examples"
    shown = demo_server.run_web_page(tmp_path, examples / "phantom_ct_lesion.dcm", "Is there a lesion in this image?")
    assert [(m["cls"], m["text"].split()[0]) for m in shown["log"]] == [
        ("msg user", "Is"),
        ("msg assistant", "yes"),
        ("msg p-yes", "P(yes)"),
        ("explain", "Where"),
    ]
    client = openai.OpenAI(base_url=f"{demo_server.url}/v1", api_key="unused")
    reply = client.chat.completions.create(
        model="llama3med-demo", messages=shown["history"][:1], temperature=0, logprobs=True, top_logprobs=TOP_LOGPROBS
    )
    first = reply.choices[0].logprobs.content[0].top_logprobs
    p_yes = yes_probability_of([(t.token, t.logprob) for t in first])
    assert shown["log"][2]["text"] == f"P(yes) {p_yes:.3f}" and p_yes > 0.9

    open_question = demo_server.run_web_page(
        tmp_path, examples / "phantom_ct_lesion.dcm", "What imaging modality is this?"
    )
    assert [m["cls"] for m in open_question["log"]] == ["msg user", "msg assistant", "explain"]  # no P(yes) under "CT"
