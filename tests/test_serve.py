"""`llama3med serve` as clients see it: the official openai client with images (PNG and DICOM), streaming
exactly like OpenAI, batching of concurrent requests, images encoded once while their features are cached, a
bounded queue, disconnects, auth, HTTPS, and a 4xx with an OpenAI error for every kind of bad input while the server
keeps serving."""

import asyncio
import base64
import dataclasses
import datetime
import gzip
import http.server
import io
import ipaddress
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import nibabel
import numpy as np
import openai
import pydicom
import pytest
import torch
from PIL import Image

from conftest import Server, needs_node, write_dicom
from llama3med.checkpoints import load
from llama3med.cli import _exposure_warnings, main
from llama3med.explain import answer_relevance, conversation_relevance
from llama3med.inference import question_messages, static_cache_decoder
from llama3med.processing import load_image, window_values
from llama3med.serve import Engine, Settings
from llama3med.serve.app import ApiError, ChatRequest, build_prompt, read_image_url
from llama3med.serve.engine import FeatureCache, JobImage

KEY = "test-key"


@pytest.fixture(scope="module")
def server(built_model_dir, tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed")
    server = Server(built_model_dir, allow_dirs=[allowed.resolve()], max_body_bytes=2_000_000)
    server.allowed = allowed
    yield server
    server.stop()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png(value: int = 128, size: int = 40) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def ask(url: str, question: str = "Is there a lesion?") -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
        }
    ]


def test_the_openai_client_asks_about_an_image_and_streams_the_same_answer(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    messages = ask(data_url(png()))
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    text = reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 6
    assert reply.usage.prompt_tokens > 16  # the 16 image tokens are counted
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-2].choices[0].finish_reason == reply.choices[0].finish_reason
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens


def test_dicom_images_are_accepted_and_rendered_with_a_window(server, tmp_path):
    ct = open(pydicom.data.get_testdata_file("CT_small.dcm"), "rb").read()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    reply = client.chat.completions.create(model="tiny", messages=ask(data_url(ct, "application/dicom")), max_tokens=3)
    assert reply.choices[0].message.content is not None
    rendered = httpx.post(f"{server.url}/v1/render?window=lung", content=ct)
    assert rendered.status_code == 200 and Image.open(io.BytesIO(rendered.content)).size == (128, 128)
    assert rendered.headers["x-frame"] == "0" and rendered.headers["x-frame-count"] == "1"
    for query, message in (("frame=1", "frame 1 requested but the image has 1"), ("frame=-1", "whole number")):
        refused = httpx.post(f"{server.url}/v1/render?{query}", content=ct)
        assert refused.status_code == 400 and message in refused.json()["error"]["message"]
    (server.allowed / "scan.png").write_bytes(png(90))
    reply = client.chat.completions.create(
        model="tiny", messages=ask(f"file://{server.allowed / 'scan.png'}"), max_tokens=2
    )
    assert reply.choices[0].message.content is not None


def bad_requests(server, tmp_path):
    no_pixels = write_dicom(tmp_path / "empty.dcm", np.zeros((8, 8), np.uint16), with_pixels=False).read_bytes()
    outside = tmp_path / "secret.png"
    outside.write_bytes(png())
    link = server.allowed / "link.png"
    if not link.exists():
        link.symlink_to(outside)
    base = {"model": "tiny", "max_tokens": 2}
    two_images = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png())}}] * 2}]
    return [
        ({**base, "messages": ask("data:image/png;base64,@@@not-base64")}, 400, "invalid base64"),
        ({**base, "messages": ask(data_url(b"just some text, not an image"))}, 400, "unreadable image"),
        ({**base, "messages": ask(data_url(no_pixels, "application/dicom"))}, 400, "no pixel data"),
        ({**base, "messages": two_images}, 400, "at most 1"),
        ({**base, "messages": ask(data_url(png())), "frequency_boost": 2}, 400, "frequency_boost"),
        ({**base, "messages": [{"role": "user", "content": "lesion " * 600}]}, 400, "too long"),
        ({**base, "messages": ask("https://example.org/x.png")}, 400, "remote image URLs are disabled"),
        (
            {**base, "messages": ask(f"file://{server.allowed}/../{outside.parent.name}/secret.png")},
            403,
            "only read under",
        ),
        ({**base, "messages": ask(f"file://{link}")}, 403, "only read under"),
        ({**base, "messages": ask(data_url(png())), "n": 2}, 400, "n=1"),
        ({**base, "model": "gpt-4o", "messages": ask(data_url(png()))}, 404, "not served here"),
        ({**base, "messages": ask(data_url(bytes(2_000_000)))}, 413, "over 2000000 bytes"),
    ]


def test_every_kind_of_bad_input_gets_a_4xx_openai_error_and_the_server_keeps_serving(server, tmp_path):
    for body, status, message in bad_requests(server, tmp_path):
        response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == status, (message, response.text)
        error = response.json()["error"]
        assert message in error["message"] and {"type", "param", "code"} <= set(error)
    bomb = Image.new("L", (8000, 8000))  # 64 M pixels in a tiny PNG: refused from the header, never decoded
    buffer = io.BytesIO()
    bomb.save(buffer, format="PNG")
    response = httpx.post(
        f"{server.url}/v1/chat/completions", json={"model": "tiny", "messages": ask(data_url(buffer.getvalue()))}
    )
    assert response.status_code == 400 and "pixels" in response.json()["error"]["message"]
    ok = httpx.post(
        f"{server.url}/v1/chat/completions", json={"model": "tiny", "messages": ask(data_url(png())), "max_tokens": 2}
    )
    assert ok.status_code == 200


def test_concurrent_requests_share_forward_passes_and_get_their_own_answers(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    questions = [
        "Is there a lesion?",
        "What modality is this?",
        "Which side is the lesion on?",
        "Is the kidney normal?",
    ]

    def one(question):
        reply = client.chat.completions.create(
            model="tiny", messages=ask(data_url(png(60)), question), max_tokens=5, temperature=0
        )
        return reply.choices[0].message.content

    alone = [one(q) for q in questions]
    before = server.engine.batches
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(one, questions))
    assert together == alone
    assert server.engine.batches - before < len(questions)


def test_greedy_and_sampled_requests_decode_in_one_batch_and_the_greedy_answers_stay_their_own(server):
    """The page asks greedily and OpenAI clients sample by default (temperature 1): they share the steps."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    requests = [(0.0, "Is there a lesion?"), (1.0, "What modality is this?"), (0.0, "Is it normal?"), (0.7, "Size?")]

    def one(temperature, question):
        reply = client.chat.completions.create(
            model="tiny", messages=ask(data_url(png(60)), question), max_tokens=6, temperature=temperature
        )
        return reply.choices[0].message.content

    alone = [one(t, q) for t, q in requests if t == 0]
    before = server.engine.batches
    server.engine.lock.acquire()  # hold decoding until all four wait, so they start together
    held = True
    try:
        with ThreadPoolExecutor(4) as pool:
            replies = [pool.submit(one, *request) for request in requests]
            while server.engine.queue_depth < len(requests):
                time.sleep(0.02)
            server.engine.lock.release()
            held = False
            answers = [reply.result() for reply in replies]
    finally:
        if held:
            server.engine.lock.release()
    assert server.engine.batches - before == 1
    assert [answers[0], answers[2]] == alone


def count_encoded_images(engine: Engine) -> list[int]:
    """The number of images of each `encode_images` call the engine makes from now on."""
    calls, encode = [], engine.model.encode_images

    def counted(pixel_values):
        calls.append(pixel_values.shape[0])
        return encode(pixel_values)

    engine.model.encode_images = counted
    return calls


def test_an_image_sent_again_is_answered_from_its_cached_features(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    url = data_url(png(77))
    kept, encoded = server.engine.features, count_encoded_images(server.engine)
    try:

        def reply(messages):
            return client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0)

        first = reply(ask(url)).choices[0].message.content
        assert encoded == [1]
        follow_up = ask(url) + [
            {"role": "assistant", "content": first},
            {"role": "user", "content": "What modality is this?"},
        ]
        cached = reply(follow_up).choices[0].message.content
        assert encoded == [1]  # the chat's second turn resends the image; it is not encoded again
        server.engine.features = FeatureCache(max_bytes=0)  # caching off
        assert reply(follow_up).choices[0].message.content == cached
        assert reply(follow_up).choices[0].message.content == cached
        assert encoded == [1, 1, 1]
    finally:
        del server.engine.model.encode_images
        server.engine.features = kept
    metrics = httpx.get(f"{server.url}/metrics").text
    assert re.search(r'llama3med_image_cache_lookups_total\{result="hit"\} [1-9]', metrics)
    assert re.search(r"llama3med_image_cache_bytes [1-9]", metrics)


def test_the_feature_cache_keeps_the_most_recently_used_within_its_budget():
    cache = FeatureCache(max_bytes=2 * 64)
    a, b, c = (torch.full((4, 4), float(i)) for i in range(3))  # 64 bytes each
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # a is now the most recently used
    cache.put("c", c)
    assert cache.get("b") is None and cache.get("a") is a and cache.get("c") is c
    assert cache.bytes == 128 and (cache.hits, cache.misses) == (3, 1)
    cache.put("huge", torch.zeros(8, 8))  # over the whole budget: not kept, nothing evicted
    assert list(cache.entries) == ["a", "c"]


def test_a_file_sent_twice_in_one_batch_is_encoded_once(server):
    engine = server.engine
    pixels = engine.processor.preprocess_image(load_image(png(91)))
    images = [JobImage("twice", pixel_values=pixels), JobImage("twice", pixel_values=pixels)]
    encoded = count_encoded_images(engine)
    try:
        with torch.inference_mode():
            features = engine._image_features(images, engine.model.device)
    finally:
        del engine.model.encode_images
    assert encoded == [1] and torch.equal(features[0], features[1])
    assert torch.equal(engine.features.get("twice"), features[0])


def test_requests_leave_the_running_batch_when_they_end_and_new_ones_take_their_rows(server):
    """Continuous batching: a short answer returns while a long one decodes beside it, and a request sent
    then joins the running batch in the freed row instead of waiting for the long answer to end."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    url = data_url(png(120))

    def reply(question, max_tokens):
        answer = client.chat.completions.create(
            model="tiny", messages=ask(url, question), max_tokens=max_tokens, temperature=0
        )
        return answer, time.monotonic()

    alone = reply("What modality is this?", 3)[0].choices[0].message.content
    before = server.engine.batches
    with ThreadPoolExecutor(3) as pool:
        with server.engine.lock:  # hold decoding until both are queued, so that they start together
            long = pool.submit(reply, "Describe the image.", 300)
            short = pool.submit(reply, "Is there a lesion?", 2)
            while server.engine.queue_depth < 2:
                time.sleep(0.01)
        short.result()
        joined, joined_at = reply("What modality is this?", 3)
        (long_answer, long_done) = long.result()
    assert long_answer.choices[0].finish_reason == "length" and long_answer.usage.completion_tokens == 300
    assert joined_at < long_done  # answered while the long one still decoded
    assert joined.choices[0].message.content == alone
    assert server.engine.batches - before == 1  # all three decoded in one running batch


@pytest.mark.parametrize("spare_rows", [False, True])
def test_a_request_that_comes_while_a_lone_answer_decodes_joins_it_at_once(server, spare_rows):
    """On a CPU (no spare rows) the batch grows a row for it; on a GPU it has `max_batch` rows from the start."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    url = data_url(png(130))
    alone = client.chat.completions.create(model="tiny", messages=ask(url), max_tokens=3, temperature=0)
    server.engine.spare_rows = spare_rows
    try:
        before = server.engine.batches
        body = {"model": "tiny", "messages": ask(url, "Describe the image."), "max_tokens": 300, "temperature": 0}
        body |= {"stream": True}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as long:
            lines = long.iter_lines()
            while '"content": ""' in (line := next(lines)) or not line:
                pass  # until the long answer's first words: it is decoding
            joined = client.chat.completions.create(model="tiny", messages=ask(url), max_tokens=3, temperature=0)
            still_decoding = server.engine.running > 0
            assert [line for line in lines if line][-1] == "data: [DONE]"
    finally:
        server.engine.spare_rows = False
    assert still_decoding and joined.choices[0].message.content == alone.choices[0].message.content
    assert server.engine.batches - before == 1


@pytest.mark.parametrize(("field", "value"), [("repetition_penalty", 1.2), ("min_p", 0.05)])
def test_a_generation_config_the_decoder_would_not_follow_is_refused_at_start_up(built_model_dir, field, value):
    """Greedy or sampled alike: a server that would fail every sampled request must not start."""
    model, processor = load(built_model_dir)
    setattr(model.generation_config, field, value)
    with pytest.raises(ValueError, match=f"{field}={value}"):
        Engine(model, processor)


def test_a_full_queue_answers_429_with_retry_after(built_model_dir):
    server = Server(built_model_dir, max_queue=2)
    body = {"model": "tiny", "messages": ask(data_url(png())), "max_tokens": 2}
    try:
        server.engine.lock.acquire()  # hold generation so the queue fills
        with ThreadPoolExecutor(2) as pool:
            held = [
                pool.submit(httpx.post, f"{server.url}/v1/chat/completions", json=body, timeout=30) for _ in range(2)
            ]
            while server.engine.queue_depth < 2:
                time.sleep(0.02)
            refused = httpx.post(f"{server.url}/v1/chat/completions", json=body)
            server.engine.lock.release()
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "queue_full"
            assert [f.result().status_code for f in held] == [200, 200]
        assert 'llama3med_requests_total{status="429"} 1' in httpx.get(f"{server.url}/metrics").text
    finally:
        server.stop()


def test_a_client_that_disconnects_frees_its_slot(server):
    body = {"model": "tiny", "messages": ask(data_url(png())), "max_tokens": 500, "stream": True}
    before = server.engine.finished["cancelled"]
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
        next(response.iter_lines())  # the first event arrives, then the client leaves
    deadline = time.time() + 10
    while server.engine.queue_depth and time.time() < deadline:
        time.sleep(0.05)
    assert server.engine.queue_depth == 0
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "llama3med_queue_depth 0" in metrics
    assert server.engine.finished["cancelled"] == before + 1  # stopped early, not run to its 500 tokens


def test_with_an_api_key_every_endpoint_but_health_needs_it(built_model_dir):
    server = Server(built_model_dir, api_key=KEY, request_timeout=0.0001)
    try:
        assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        assert httpx.get(f"{server.url}/metrics").status_code == 401
        headers = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(f"{server.url}/v1/models", headers=headers).status_code == 200
        body = {"model": "tiny", "messages": ask(data_url(png())), "max_tokens": 2}
        timed_out = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers)
        assert timed_out.status_code == 504 and "timeout" in timed_out.json()["error"]["message"]
        page = httpx.get(f"{server.url}/")
        assert page.status_code == 200 and "not for diagnosis" in page.text and "https://" not in page.text  # no CDN
    finally:
        server.stop()


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files, for a test to trust."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def test_serve_speaks_https_with_the_given_certificate_and_reads_its_api_key_from_the_environment(
    built_model_dir, tmp_path
):
    cert_file, key_file = self_signed_certificate(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "llama3med.cli", "serve", "--model", str(built_model_dir), "--port", str(port)]
    command += ["--ssl-certfile", str(cert_file), "--ssl-keyfile", str(key_file)]
    process = subprocess.Popen(command, env={**os.environ, "LLAMA3MED_API_KEY": KEY}, stderr=subprocess.PIPE, text=True)
    trusted = ssl.create_default_context(cafile=str(cert_file))
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                assert httpx.get(f"{url}/health", verify=trusted).json()["status"] == "ok"
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
                time.sleep(0.5)
        assert httpx.get(f"{url}/v1/models", verify=trusted).status_code == 401
        models = httpx.get(f"{url}/v1/models", verify=trusted, headers={"Authorization": f"Bearer {KEY}"})
        assert models.status_code == 200 and KEY not in " ".join(command)
        with pytest.raises(httpx.TransportError):  # an untrusted certificate is refused
            httpx.get(f"{url}/health")
        with pytest.raises(httpx.TransportError):  # nor is plain HTTP spoken there
            httpx.get(f"http://127.0.0.1:{port}/health")
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    assert f"serving {built_model_dir.name} on https://127.0.0.1:{port}" in stderr and "warning" not in stderr


def test_serve_refuses_half_a_tls_setting_before_loading_the_model(tmp_path, capsys):
    assert main(["serve", "--ssl-certfile", str(tmp_path / "cert.pem")]) == 1
    assert "--ssl-certfile and --ssl-keyfile go together" in capsys.readouterr().err
    assert main(["serve", "--ssl-certfile", str(tmp_path / "c.pem"), "--ssl-keyfile", str(tmp_path / "k.pem")]) == 1
    assert f"{tmp_path / 'c.pem'}: no such file" in capsys.readouterr().err


def test_a_server_reachable_from_other_machines_is_warned_of_what_it_lacks():
    assert _exposure_warnings("127.0.0.1", tls=False, api_key=False) == []
    assert _exposure_warnings("localhost", tls=False, api_key=False) == []
    assert _exposure_warnings("0.0.0.0", tls=True, api_key=True) == []
    plain, open_to_all = _exposure_warnings("0.0.0.0", tls=False, api_key=False)
    assert "plain HTTP" in plain and "--ssl-certfile" in plain and "without an API key" in open_to_all
    assert len(_exposure_warnings("10.1.2.3", tls=True, api_key=False)) == 1


@pytest.fixture()
def image_host():
    """A web server holding images, on this machine (so a private address): `/scan.png`, `/big.png` of
    3,000 bytes, anything else 404."""
    files = {"/scan.png": png(90), "/big.png": b"\x89PNG" + b"\0" * 2996}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = files.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{host.server_port}", files=files)
    host.shutdown()


def refusal(url: str, **settings) -> tuple[int, str]:
    with pytest.raises(ApiError) as refused:
        read_image_url(url, Settings(**settings))
    return refused.value.status, refused.value.message


def test_remote_images_come_only_from_public_hosts_or_the_hosts_named(image_host):
    scan = f"{image_host.url}/scan.png"
    assert refusal(scan) == (400, "remote image URLs are disabled on this server; send a data: URL")
    for url in (scan, scan.replace("127.0.0.1", "localhost"), "http://169.254.169.254/latest/meta-data/"):
        status, message = refusal(url, allow_remote=True)  # a client must not reach into the server's network
        assert status == 403 and "not a public host" in message
    named = {"remote_hosts": ("127.0.0.1",), "max_body_bytes": 2000}
    assert read_image_url(scan, Settings(**named)) == image_host.files["/scan.png"]
    assert refusal(f"{image_host.url}/big.png", **named) == (413, "remote image too large")
    assert refusal(f"{image_host.url}/gone.png", **named) == (400, "could not fetch the image (HTTP 404)")
    assert refusal("http://127.0.0.1:9/scan.png", **named) == (400, "could not fetch the image (ConnectError)")


def test_an_image_from_a_named_host_is_answered_as_the_same_image_sent_inline(built_model_dir, image_host):
    server = Server(built_model_dir, remote_hosts=("127.0.0.1",))
    try:
        answers = []
        for url in (f"{image_host.url}/scan.png", data_url(image_host.files["/scan.png"])):
            body = {"model": "tiny", "messages": ask(url), "max_tokens": 4, "temperature": 0}
            reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
            assert reply.status_code == 200, reply.text
            answers.append(reply.json()["choices"][0]["message"]["content"])
        assert answers[0] == answers[1]
    finally:
        server.stop()


def test_no_prompt_or_image_reaches_the_logs(server, caplog):
    secret = "PATIENT-NAME-4242"
    with caplog.at_level("DEBUG"):
        httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"model": "tiny", "messages": ask(data_url(png()), secret), "max_tokens": 2},
        )
    assert secret not in caplog.text and "base64" not in caplog.text
    assert json.dumps(caplog.text)  # something was logged, without content


def test_the_datagen_teacher_client_talks_to_this_server(server):
    from llama3med.datagen import OpenAITeacher

    teacher = OpenAITeacher(model="tiny", api_key="unused", base_url=f"{server.url}/v1")
    messages = [{"role": "user", "content": "Legend: a CT."}]
    reply = asyncio.run(teacher.complete("You write data.", messages, max_tokens=4))
    assert isinstance(reply.text, str) and 0 < reply.output_tokens <= 4 and reply.input_tokens > 0


@needs_node
def test_the_web_page_renders_a_dicom_and_streams_an_answer(server, tmp_path):
    shown = server.run_web_page(tmp_path, pydicom.data.get_testdata_file("CT_small.dcm"), "Is there a lesion?")
    assert shown["preview"].startswith("blob:") and shown["image"].startswith("data:image/png;base64,")
    assert shown["first"]["hidden"] is True  # one slice: no slider
    assert [m["cls"] for m in shown["log"]] == ["msg user", "msg assistant", "explain"]  # "Where did it look?"
    assert shown["history"][0]["content"][0]["type"] == "image_url"
    assert shown["history"][1] == {"role": "assistant", "content": shown["log"][1]["text"]}
    assert shown["button"] == "Ask"


def test_the_web_pages_requests_are_relative_so_it_works_behind_a_proxy_at_any_path(server):
    script = re.search(r"<script>(.*)</script>", httpx.get(f"{server.url}/").text, re.S).group(1)
    requested = re.findall(r"fetch\(\s*[\"'`]([^\"'`]*)", script)
    assert sorted(set(requested)) == ["v1/chat/completions", "v1/explain", "v1/models", "v1/render?"]  # none from /


@needs_node
def test_the_web_pages_button_stops_an_answer_and_drops_its_turn(server, tmp_path):
    ct = pydicom.data.get_testdata_file("CT_small.dcm")
    shown = server.run_web_page(tmp_path, ct, "Describe the image.", stop_answer=True)
    assert [m["cls"] for m in shown["log"]] == ["msg user", "msg assistant"]
    assert shown["log"][1]["text"].endswith("(stopped)")
    assert shown["history"] == [] and shown["button"] == "Ask"  # the next question starts with the image again
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    assert client.chat.completions.create(model="tiny", messages=ask(data_url(png())), max_tokens=2).choices


def test_a_nifti_volume_in_a_chat_is_answered_as_its_middle_slice_is(server):
    voxels = np.random.default_rng(0).integers(-1000, 1000, size=(48, 40, 7), dtype=np.int16)
    volume = gzip.compress(nibabel.Nifti1Image(voxels, np.diag([-0.8, -0.8, 3.0, 1.0])).to_bytes())
    middle = httpx.post(f"{server.url}/v1/render", content=volume)
    assert middle.headers["x-frame"] == "3" and middle.headers["x-frame-count"] == "7"
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    answers = [
        client.chat.completions.create(model="tiny", messages=ask(url), max_tokens=6, temperature=0).choices[0]
        for url in (data_url(volume, "application/gzip"), data_url(middle.content))
    ]
    assert answers[0].message.content == answers[1].message.content


def test_an_api_client_picks_a_volumes_slice_with_the_image_urls_frame(server):
    voxels = np.random.default_rng(1).integers(-1000, 1000, size=(48, 40, 7), dtype=np.int16)
    volume = gzip.compress(nibabel.Nifti1Image(voxels, np.eye(4)).to_bytes())
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")

    def reply(image_url: dict):
        content = [{"type": "image_url", "image_url": image_url}, {"type": "text", "text": "Is it normal?"}]
        messages = [{"role": "user", "content": content}]
        return client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)

    cache = server.engine.features
    misses = cache.misses
    first = reply({"url": data_url(volume, "application/gzip"), "frame": 1}).choices[0].message.content
    assert reply({"url": data_url(volume, "application/gzip"), "frame": 5}) and cache.misses == misses + 2
    hits = cache.hits
    assert reply({"url": data_url(volume, "application/gzip"), "frame": 1}).choices[0].message.content == first
    assert cache.hits == hits + 1  # the slice's features were kept under its file and frame
    slice_one = httpx.post(f"{server.url}/v1/render?frame=1", content=volume).content
    assert reply({"url": data_url(slice_one)}).choices[0].message.content == first
    for frame, message in ((7, "slice 7 requested but the NIfTI volume has 7 axial slices"), (-1, "frame")):
        with pytest.raises(openai.BadRequestError, match=message):
            reply({"url": data_url(volume, "application/gzip"), "frame": frame})


def test_an_api_client_names_the_window_a_dicom_is_seen_through(server, tmp_path):
    ct = write_dicom(tmp_path / "ct.dcm", np.arange(1600, dtype=np.uint16).reshape(40, 40) * 2, intercept=-1000)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")

    def reply(image_url: dict) -> str:
        content = [{"type": "image_url", "image_url": image_url}, {"type": "text", "text": "Is it normal?"}]
        messages = [{"role": "user", "content": content}]
        return client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)

    dicom = data_url(ct.read_bytes(), "application/dicom")
    misses = server.engine.features.misses
    for window in ("lung", [-600, 1500]):  # the same window by name and by numbers
        lung = reply({"url": dicom, "window": window}).choices[0].message.content
        rendered = httpx.post(f"{server.url}/v1/render?window=lung", content=ct.read_bytes()).content
        assert reply({"url": data_url(rendered)}).choices[0].message.content == lung
    # encoded: the DICOM through each window as written, the rendered PNG once (then its features are reused)
    assert reply({"url": dicom, "window": "bone"}) and server.engine.features.misses == misses + 4
    with pytest.raises(openai.BadRequestError, match="window must be CENTRE,WIDTH or one of"):
        reply({"url": dicom, "window": "sharp"})


@needs_node
def test_the_web_page_shows_a_nifti_volumes_middle_slice_and_asks_about_the_slice_chosen_on_its_slider(
    server, tmp_path
):
    volume = tmp_path / "ct.nii.gz"
    slices = [np.full((6, 8), 100 * k - 200, dtype=np.int16) for k in range(5)]  # HU rising from the feet
    volume.write_bytes(gzip.compress(nibabel.Nifti1Image(np.stack(slices, axis=2), np.eye(4)).to_bytes()))
    shown = server.run_web_page(tmp_path, volume, "Is there a lesion?", frame=1)
    assert shown["first"] == {"hidden": False, "max": "4", "value": "2"}  # opened at the middle slice
    assert shown["shownFrame"] == {"value": "1", "label": "2 of 5"}
    sent = base64.b64decode(shown["history"][0]["content"][0]["image_url"]["url"].partition(",")[2])
    rendered = httpx.post(f"{server.url}/v1/render?window=soft_tissue&frame=1", content=volume.read_bytes())
    assert sent == rendered.content  # the model is asked about the slice the page shows
    assert np.asarray(Image.open(io.BytesIO(sent)))[0, 0, 0] == window_values(np.array(-100.0), 40, 400)


def test_seeded_sampling_repeats_and_stop_strings_cut_the_answer(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    messages = ask(data_url(png(200)), "Describe the image.")

    def text(**options):
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, **options)
        return reply.choices[0].message.content, reply.choices[0].finish_reason

    sampled = text(temperature=1.0, top_p=0.9, seed=7)
    assert sampled == text(temperature=1.0, top_p=0.9, seed=7)
    greedy, _ = text(temperature=0)
    assert len(greedy) > 2
    stop = greedy[len(greedy) // 2 :][:2]
    cut, reason = text(temperature=0, stop=[stop])
    assert reason == "stop" and stop not in cut and greedy.startswith(cut)


def test_logprobs_are_the_models_own_for_each_token_streamed_or_not(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    image = png(90)
    messages = ask(data_url(image), "Is the image dark?")
    options = {"model": "tiny", "messages": messages, "max_tokens": 5, "temperature": 0}
    reply = client.chat.completions.create(**options, logprobs=True, top_logprobs=3).choices[0]
    tokens = reply.logprobs.content
    assert b"".join(bytes(t.bytes) for t in tokens).decode(errors="replace") == reply.message.content
    assert all(len(t.top_logprobs) == 3 for t in tokens)

    request = ChatRequest.model_validate({**options, "messages": messages})
    input_ids, _ = build_prompt(request, server.engine, server.settings)
    model, processor = server.engine.model, server.engine.processor
    pixel_values = processor.preprocess_image(load_image(image))[None]
    suppressed = static_cache_decoder(model).suppressed
    so_far = list(input_ids)
    for got in tokens:  # greedy decoding from scratch: the whole sequence through the model at every token
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([so_far]), pixel_values=pixel_values).logits[0, -1]
        logits[suppressed] = -torch.inf
        expected = torch.log_softmax(logits.float(), dim=-1)
        token, best = expected.argmax().item(), expected.topk(3)
        assert bytes(got.bytes) == processor.token_bytes(token)
        assert got.logprob == pytest.approx(expected[token].item(), abs=1e-4)
        assert [bytes(t.bytes) for t in got.top_logprobs] == [processor.token_bytes(i) for i in best.indices.tolist()]
        assert [t.logprob for t in got.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
        so_far.append(token)

    streamed = client.chat.completions.create(**options, logprobs=True, top_logprobs=3, stream=True)
    chunks = [c.choices[0] for c in streamed if c.choices and c.choices[0].logprobs]
    assert [t.model_dump() for c in chunks for t in c.logprobs.content] == [t.model_dump() for t in tokens]
    assert client.chat.completions.create(**options).choices[0].logprobs is None
    for wrong, param in (
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ):
        with pytest.raises(openai.BadRequestError, match=param):
            client.chat.completions.create(**options, **wrong)


def test_neutral_penalties_and_developer_messages_that_chat_clients_send_are_taken_other_penalties_refused(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    options = {"model": "tiny", "messages": ask(data_url(png(90)), "Is the image dark?"), "max_tokens": 4}
    reply = client.chat.completions.create(**options, temperature=0)
    plain, plain_tokens = reply.choices[0].message.content, reply.usage.prompt_tokens
    neutral = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}}
    assert client.chat.completions.create(**options, temperature=0, **neutral).choices[0].message.content == plain
    instructed = {"role": "system", "content": "Answer briefly."}
    with_system, with_developer = (
        client.chat.completions.create(
            **{**options, "messages": [{**instructed, "role": role}, *options["messages"]]}, temperature=0
        )
        for role in ("system", "developer")
    )
    assert with_developer.choices[0].message.content == with_system.choices[0].message.content
    assert with_developer.usage.prompt_tokens == with_system.usage.prompt_tokens > plain_tokens
    for wrong, param in (
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": -1}, "presence_penalty"),
        ({"logit_bias": {"12": -100}}, "logit_bias"),
    ):
        with pytest.raises(openai.BadRequestError, match=param):
            client.chat.completions.create(**options, **wrong)


def explain(server, messages, model="tiny") -> httpx.Response:
    return httpx.post(f"{server.url}/v1/explain", json={"model": model, "messages": messages}, timeout=60)


def png_pixels(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.removeprefix("data:image/png;base64,")))))


def test_explain_draws_where_a_chats_last_answer_came_from_as_the_python_api_does(server):
    model, processor = server.engine.model, server.engine.processor
    ct = Path(pydicom.data.get_testdata_file("CT_small.dcm")).read_bytes()
    first_turn = [
        *ask(data_url(ct, "application/dicom"), "Is there a lesion?"),
        {"role": "assistant", "content": "yes"},
    ]
    reply = explain(server, first_turn)
    assert reply.status_code == 200, reply.text
    expected = answer_relevance(model, processor, ct, "Is there a lesion?", "yes")
    relevance = torch.tensor(reply.json()["relevance"])
    assert relevance.shape == (model.config.image_grid,) * 2 and float(relevance.sum()) == pytest.approx(1.0)
    assert torch.allclose(relevance, expected.relevance, atol=1e-6)
    assert np.array_equal(png_pixels(reply.json()["heat_map"]), np.asarray(expected.heat_map()))

    later_turn = [*first_turn, {"role": "user", "content": "Which side?"}, {"role": "assistant", "content": "left"}]
    lookups = server.engine.features.hits, server.engine.features.misses
    reply = explain(server, later_turn)
    assert (server.engine.features.hits, server.engine.features.misses) == (lookups[0] + 1, lookups[1])  # cached
    with torch.no_grad():
        features = model.encode_images(processor.preprocess_image(ct)[None])
    as_text = [*question_messages("Is there a lesion?"), *later_turn[1:]]
    expected = conversation_relevance(model, processor, features, as_text)
    assert torch.allclose(torch.tensor(reply.json()["relevance"]), expected, atol=1e-6)

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    options = {"model": "tiny", "messages": ask(data_url(png(33))), "max_tokens": 48, "temperature": 0}
    alone = client.chat.completions.create(**options).choices[0].message.content
    with ThreadPoolExecutor(2) as pool:  # an explanation while a batch decodes: neither changes the other
        answering = pool.submit(client.chat.completions.create, **options)
        time.sleep(0.05)
        beside = explain(server, later_turn)
        assert answering.result().choices[0].message.content == alone
    assert torch.allclose(torch.tensor(beside.json()["relevance"]), expected, atol=1e-6)

    for messages, status, message in (
        (first_turn[:1], 400, "the last message must be the answer"),
        ([{"role": "user", "content": "Is there a lesion?"}, first_turn[1]], 400, "needs the image"),
        ([*first_turn[:1], {"role": "assistant", "content": " "}], 400, "the answer is empty"),
    ):
        refused = explain(server, messages)
        assert refused.status_code == status and message in refused.json()["error"]["message"]
    assert explain(server, first_turn, model="gpt-4o").status_code == 404
    server.engine.max_queue, queue = 0, server.engine.max_queue  # as many waiting as may
    try:
        busy = explain(server, first_turn)
    finally:
        server.engine.max_queue = queue
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
    server.settings.no_heat_maps = "a heat map differentiates through the LM, which its fp8 and 4-bit layers cannot do"
    try:
        refused = explain(server, first_turn)
    finally:
        server.settings.no_heat_maps = None
    assert refused.status_code == 501 and "fp8 and 4-bit" in refused.json()["error"]["message"]
    counted = dict(
        re.findall(r'llama3med_explanations_total\{status="(\d+)"\} (\d+)', httpx.get(f"{server.url}/metrics").text)
    )
    assert int(counted["200"]) >= 3 and int(counted["400"]) >= 3 and counted["501"] == "1" and counted["429"] == "1"


def test_a_servers_system_message_opens_the_chats_that_send_none(server):
    system = {"role": "system", "content": "You are a radiologist."}
    messages = ask(data_url(png()))
    served = Settings(**{**dataclasses.asdict(server.settings), "system": system["content"]})

    def prompt(messages: list[dict], settings: Settings) -> list[int]:
        request = ChatRequest.model_validate({"model": "tiny", "messages": messages})
        return build_prompt(request, server.engine, settings)[0]

    assert prompt(messages, served) == prompt([system, *messages], server.settings) != prompt(messages, server.settings)
    own = {"role": "developer", "content": "Answer in one word."}
    assert prompt([own, *messages], served) == prompt([own, *messages], server.settings)  # its own is kept
