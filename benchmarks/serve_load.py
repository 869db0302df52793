"""`llama3med serve` under load: several clients at once, each asking one question after another about its
own DICOM image, short answers mixed with long ones, through the HTTP API. The server as it runs (the
running batch, up to `--max-batch` rows, that requests join and leave between steps) against the same
server taking one request at a time (`--max-batch 1`), same requests, in one run; each server is its own
`llama3med serve` process, as in use, with the image cache off; both start together and are measured
one after the other. Greedy answers must be identical.
`--sampled-clients K` has K of the clients sample (temperature 1, the OpenAI API's default) while the
others ask greedily, as a web page and API scripts share a server; their rows share the batch's steps,
and only the greedy answers are compared.

    python benchmarks/serve_load.py [--model DIR] [--clients 8] [--requests 4] [--max-batch 8] [--sampled-clients 0]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from llama3med.data.phantoms import make_phantom, save_phantom_dicom

QUESTIONS = ["Describe the image.", "Is there a lesion in this image?", "What imaging modality is this?"]


@contextlib.contextmanager
def serving(model: str | None, max_batches: Sequence[int]) -> Iterator[list[str]]:
    """A `llama3med serve` process for each of `max_batches`, on free ports, until the block ends; their
    URLs. They start together (loading is most of a short run's time); one that is not asked waits on
    its socket without computing, so each is measured alone."""
    processes, urls = [], []
    try:
        for max_batch in max_batches:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            command = [sys.executable, "-m", "llama3med.cli", "serve", "--port", str(port), "--model-id", "bench"]
            command += ["--max-batch", str(max_batch), "--image-cache-mb", "0", *(["--model", model] if model else [])]
            processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            for _ in range(1200):
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/health").status_code == 200:
                        break
                time.sleep(0.1)
        yield urls
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


def client_run(
    url: str, image: bytes, requests: int, offset: int, temperature: float
) -> list[tuple[str, float, str, int, float]]:
    """One client's questions in turn: (question, latency in s, answer, new tokens, temperature) each."""
    picture = {
        "type": "image_url",
        "image_url": {"url": "data:application/dicom;base64," + base64.b64encode(image).decode()},
    }
    results = []
    with httpx.Client(timeout=600) as client:
        for i in range(requests):
            question = QUESTIONS[(offset + i) % len(QUESTIONS)]
            messages = [{"role": "user", "content": [picture, {"type": "text", "text": question}]}]
            start = time.perf_counter()
            reply = client.post(
                f"{url}/v1/chat/completions",
                json={"model": "bench", "messages": messages, "max_tokens": 64, "temperature": temperature},
            )
            reply.raise_for_status()
            body = reply.json()
            answer = body["choices"][0]["message"]["content"]
            tokens = body["usage"]["completion_tokens"]
            results.append((question, time.perf_counter() - start, answer, tokens, temperature))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the demo model)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="per client")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=384, help="phantom size in pixels")
    parser.add_argument("--sampled-clients", type=int, default=0, help="clients that sample (temperature 1)")
    args = parser.parse_args()
    temperatures = [1.0 if i < args.sampled_clients else 0.0 for i in range(args.clients)]
    with tempfile.TemporaryDirectory() as tmp:
        paths = [
            save_phantom_dicom(make_phantom(11, i, args.size), Path(tmp) / f"{i}.dcm") for i in range(args.clients)
        ]
        images = [path.read_bytes() for path in paths]
    rows = {}
    arms = {"one request at a time": 1, f"running batch, <= {args.max_batch} rows": args.max_batch}
    with serving(args.model, list(arms.values())) as urls:
        for name, url in zip(arms, urls, strict=True):
            client_run(url, images[0], 2, 0, 0.0)  # warm up
            start = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                runs = list(
                    pool.map(
                        client_run,
                        [url] * args.clients,
                        images,
                        [args.requests] * args.clients,
                        range(args.clients),
                        temperatures,
                    )
                )
            rows[name] = (time.perf_counter() - start, [result for run in runs for result in run])
    total = args.clients * args.requests
    sampled = f"{args.sampled_clients} of them sampling, the others greedy" if args.sampled_clients else "greedy"
    mix = "short and long answers mixed"
    print(f"{args.clients} clients x {args.requests} questions ({mix}), {sampled}, up to 64 new tokens")
    greedy_total = sum(temperature == 0 for temperature in temperatures) * args.requests
    reference_seconds, reference = rows["one request at a time"]
    for name, (seconds, results) in rows.items():
        tokens = sum(result[3] for result in results)
        latency = {
            kind: [r[1] for r in results if (r[0] == QUESTIONS[0]) == (kind == "long")] for kind in ("short", "long")
        }
        same = sum(a[2] == b[2] for a, b in zip(results, reference, strict=True) if a[4] == 0)
        print(
            f"{name:<26} {total / seconds:6.2f} requests/s {tokens / seconds:7.1f} new tokens/s "
            f"{reference_seconds / seconds:5.2f}x  median latency short {statistics.median(latency['short']):.2f} s, "
            f"long {statistics.median(latency['long']):.2f} s  greedy answers identical {same}/{greedy_total}"
        )


if __name__ == "__main__":
    main()
