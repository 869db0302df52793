"""Fixtures: tiny real components (SigLIP/CLIP towers, Llama LMs, a trained BPE tokenizer) built from
configs, and DICOM files written with pydicom. Nothing is downloaded."""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path
from types import SimpleNamespace
from xml.sax.saxutils import escape

import numpy as np
import pydicom
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from llama3med import Llama3MedConfig
from llama3med.data.dicom import save_dicom
from llama3med.processing import train_bpe_tokenizer

CORPUS = [
    "Is there a lesion in the liver? Yes, there is one small lesion in the right lobe.",
    "What modality is this? This is an axial CT slice of the abdomen.",
    "How many lesions are visible? Two lesions are visible.",
    "Which side is the lesion on? The lesion is on the left side.",
    "Is the kidney normal? No, the left kidney shows a cyst.",
    "Describe the image. An MRI slice of the brain with no abnormality.",
]

TINY_SIGLIP = dict(
    model_type="siglip_vision_model",
    image_size=32,
    patch_size=8,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
)
TINY_CLIP = dict(TINY_SIGLIP, model_type="clip_vision_model")


def send_json(handler: http.server.BaseHTTPRequestHandler, status: int, payload: dict, headers: dict | None = None):
    """Answer `handler`'s request with `payload` as JSON."""
    data = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("content-type", "application/json")
    handler.send_header("content-length", str(len(data)))
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(data)


def chat_reply(path: str, model: str, text: str, input_tokens: int, output_tokens: int) -> dict:
    """`text` as the reply to a chat request at `path`: an Anthropic message for `/v1/messages`, else an
    OpenAI chat completion."""
    if path.endswith("/messages"):
        return {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
        }
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": input_tokens,
            "completion_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
        },
    }


def tiny_llama(vocab_size: int) -> dict:
    return dict(
        model_type="llama",
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="session")
def tokenizer():
    return train_bpe_tokenizer(CORPUS * 4, vocab_size=320, model_max_length=512)


@pytest.fixture()
def tiny_config(tokenizer) -> Llama3MedConfig:
    return Llama3MedConfig(
        vision_config=TINY_SIGLIP,
        text_config=tiny_llama(len(tokenizer)),
        scales=[32, 64, 96],
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )


@pytest.fixture(scope="session")
def component_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """A SigLIP tower dir and a Llama LM dir with a text-only tokenizer, as users have them."""
    root = tmp_path_factory.mktemp("components")
    tokenizer = train_bpe_tokenizer(CORPUS * 4, vocab_size=320, model_max_length=512, image_token=False)
    torch.manual_seed(0)
    vision = AutoModel.from_config(AutoConfig.for_model(**TINY_SIGLIP))
    vision.save_pretrained(root / "siglip")
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_llama(len(tokenizer))))
    llm.save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    return root / "siglip", root / "llama"


@pytest.fixture(scope="session")
def built_model_dir(tmp_path_factory, component_dirs) -> Path:
    from llama3med.checkpoints import build, save

    out = tmp_path_factory.mktemp("built") / "model"
    torch.manual_seed(0)
    model, processor = build(*component_dirs, scales=[32, 64, 96])
    save(model, processor, out)
    return out


@pytest.fixture(scope="session")
def test_set(tmp_path_factory) -> Path:
    """A LLaVA-Med-format test file of 3 phantom DICOM slices (96 px) and their questions."""
    from llama3med.data.phantoms import write_phantom_set

    out = tmp_path_factory.mktemp("phantom-test")
    write_phantom_set(out, n=3, seed=5, size=96, image_format="dcm")
    return out / "test.json"


def write_dicom(path: Path, pixels: np.ndarray, *, with_pixels: bool = True, **tags) -> Path:
    """A real DICOM file (see `save_dicom`); `with_pixels=False` strips its pixel data afterwards."""
    save_dicom(path, pixels, **tags)
    if not with_pixels:
        ds = pydicom.dcmread(path)
        del ds.PixelData
        ds.save_as(path)
    return path


class Server:
    """`llama3med serve`'s app on a free local port, in a thread of this process; `url` is its address."""

    def __init__(self, model_dir, **settings):
        import uvicorn

        from llama3med.checkpoints import load
        from llama3med.serve import Engine, Settings, create_app

        model, processor = load(model_dir)
        self.engine = Engine(model, processor, max_batch=8, max_queue=settings.pop("max_queue", 32), batch_window=0.05)
        self.settings = Settings(**{"model_id": "tiny", **settings})
        config = uvicorn.Config(create_app(self.engine, self.settings), host="127.0.0.1", port=0, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def run_web_page(
        self, tmp_path: Path, image, question: str, frame: int | None = None, stop_answer=False, explain=False
    ) -> dict:
        """The page this server serves, its own script run in Node (`tests/web/page_harness.js`): picks
        `image`, moves the slider to `frame`, asks `question` (and with `stop_answer`, presses the button
        again as the answer starts; with `explain`, presses "Where did it look?" under the answer);
        returns what the page then shows."""
        import httpx

        page = tmp_path / "page.js"
        page.write_text(re.search(r"<script>(.*)</script>", httpx.get(f"{self.url}/").text, re.S).group(1))
        harness = Path(__file__).parent / "web" / "page_harness.js"
        command = ["node", harness, page, self.url, image, question, *([] if frame is None else [str(frame)])]
        env = {**os.environ, **({"STOP_ANSWER": "1"} if stop_answer else {}), **({"EXPLAIN": "1"} if explain else {})}
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js to run the web page's script")


@pytest.fixture()
def pmc_cloud():
    """A local stand-in for PMC's Cloud Service bucket, speaking S3 over HTTP: ListObjectsV2 (two keys a
    page, so a listing takes several, with opaque continuation tokens) and object GETs (404 NoSuchKey
    for a missing key). `objects` maps keys to bytes, `requests` records the paths asked for, and a key
    in `unavailable_once` answers 503 the first time."""
    objects: dict[str, bytes] = {}
    requests: list[str] = []
    unavailable_once: set[str] = set()

    def listing(query: dict[str, list[str]]) -> bytes:
        prefix = query.get("prefix", [""])[0]
        token = query.get("continuation-token", [None])[0]
        keys = sorted(k for k in objects if k.startswith(prefix))
        start = int(base64.b64decode(token)) if token else 0
        page, more = keys[start : start + 2], start + 2 < len(keys)
        body = '<?xml version="1.0" encoding="UTF-8"?>\n'
        body += '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>pmc-oa-opendata</Name>'
        body += f"<Prefix>{escape(prefix)}</Prefix><KeyCount>{len(page)}</KeyCount><MaxKeys>2</MaxKeys>"
        body += f"<IsTruncated>{str(more).lower()}</IsTruncated>"
        if token:
            body += f"<ContinuationToken>{token}</ContinuationToken>"
        if more:
            body += (
                f"<NextContinuationToken>{base64.b64encode(str(start + 2).encode()).decode()}</NextContinuationToken>"
            )
        for key in page:
            body += f"<Contents><Key>{escape(key)}</Key><Size>{len(objects[key])}</Size>"
            body += "<StorageClass>STANDARD</StorageClass></Contents>"
        return (body + "</ListBucketResult>").encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            url = urllib.parse.urlsplit(self.path)
            key = urllib.parse.unquote(url.path[1:])
            if key in unavailable_once:
                unavailable_once.discard(key)
                return self.answer(503, b"<Error><Code>SlowDown</Code></Error>")
            if not key:
                return self.answer(200, listing(urllib.parse.parse_qs(url.query)))
            if key not in objects:
                return self.answer(404, b"<Error><Code>NoSuchKey</Code></Error>")
            self.answer(200, objects[key])

        def answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield SimpleNamespace(
        url=f"http://127.0.0.1:{server.server_port}",
        objects=objects,
        requests=requests,
        unavailable_once=unavailable_once,
    )
    server.shutdown()
