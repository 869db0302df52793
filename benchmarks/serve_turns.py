"""Chats through `llama3med serve`'s HTTP API as the web page holds them: each turn resends the image and
the conversation so far. The server's image-feature cache (on by default) against the same server with
it off, one client, the same chats, in one run. The answers must be identical.

    python benchmarks/serve_turns.py [--model DIR] [--images 6] [--turns 4] [--size 384] [--rounds 3]
"""

from __future__ import annotations

import argparse
import base64
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from llama3med.checkpoints import DEMO_MODEL_DIR, load
from llama3med.data.phantoms import make_phantom, save_phantom_dicom
from llama3med.inference import best_device
from llama3med.serve import Engine, Settings, create_app
from llama3med.serve.engine import FeatureCache

QUESTIONS = [
    "Is there a lesion in this image?",
    "What imaging modality is this?",
    "How many lesions are visible?",
    "Which organ is shown?",
    "Describe the image.",
]


def serve_in_thread(engine: Engine) -> tuple[uvicorn.Server, str]:
    config = uvicorn.Config(create_app(engine, Settings(model_id="bench")), host="127.0.0.1", port=0, log_level="error")
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


def chat(client: httpx.Client, url: str, image: bytes, turns: int, max_tokens: int) -> list[str]:
    """One conversation of `turns` questions about one DICOM image; the answers."""
    picture = {
        "type": "image_url",
        "image_url": {"url": "data:application/dicom;base64," + base64.b64encode(image).decode()},
    }
    messages, answers = [], []
    for question in QUESTIONS[:turns]:
        content = [picture, {"type": "text", "text": question}] if not messages else question
        messages.append({"role": "user", "content": content})
        body = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
        reply = client.post(f"{url}/v1/chat/completions", json=body, timeout=300)
        reply.raise_for_status()
        answers.append(reply.json()["choices"][0]["message"]["content"])
        messages.append({"role": "assistant", "content": answers[-1]})
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEMO_MODEL_DIR))
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--turns", type=int, default=4, choices=range(1, len(QUESTIONS) + 1))
    parser.add_argument("--size", type=int, default=384, help="phantom size in pixels")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model, processor = load(args.model, device=best_device())
    engine = Engine(model, processor)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [save_phantom_dicom(make_phantom(7, i, args.size), Path(tmp) / f"{i}.dcm") for i in range(args.images)]
        images = [path.read_bytes() for path in paths]
    server, url = serve_in_thread(engine)
    budget = engine.features.max_bytes
    engine.features = FeatureCache(0)
    rows = {}
    try:
        with httpx.Client() as client:
            chat(client, url, images[0], 1, 2)  # warm up the decoder and the allocator, caching nothing
            for _ in range(args.rounds):  # the paths in turns, each keeping its fastest round: this machine is noisy
                for name, budget_bytes in (("cache off", 0), ("image-feature cache", budget)):
                    engine.features = FeatureCache(budget_bytes)  # empty: every chat's first turn misses
                    start = time.perf_counter()
                    answers = [a for image in images for a in chat(client, url, image, args.turns, args.max_tokens)]
                    rate = args.images * args.turns / (time.perf_counter() - start)
                    rows[name] = (max(rate, rows.get(name, (0.0,))[0]), answers)
    finally:
        server.should_exit = True
    cache = engine.features
    reference_rate, reference = rows["cache off"]
    print(
        f"{args.images} DICOM images of {args.size} px, {args.turns} turns each (each resends the image), "
        f"greedy, up to {args.max_tokens} new tokens, device {model.device}"
    )
    for name, (rate, answers) in rows.items():
        same = sum(a == b for a, b in zip(answers, reference, strict=True))
        print(
            f"{name:<22} {rate:7.2f} turns/s {rate / reference_rate:5.2f}x  identical {same}/{args.images * args.turns}"
        )
    print(f"cache, each round: {cache.hits} hits, {cache.misses} misses, {cache.bytes / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
