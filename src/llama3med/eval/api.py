"""Answers from a model behind an OpenAI-compatible chat API: a `llama3med serve` on another machine, a
vLLM or SGLang server, or a hosted model. The records, the question wording, the answers file and its
resumption are a local run's, so `eval` scores any model on the same harness.

Each question is one chat completion: the image as a data URL, then the question, decoded greedily
(temperature 0). PNG, JPEG and WebP files are sent as they are; any other image (DICOM, NIfTI, TIFF, a
series directory, a chosen slice) as the 8-bit picture a local model looks at, in PNG. Requests run
concurrently; transient failures (429, 5xx, timeouts) are retried with back-off, honouring `retry-after`.

The first answer token's most likely alternatives (`logprobs`) give each answer a P(yes), as a local run
has, so closed questions get an AUROC; an endpoint that refuses logprobs is asked without them.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import os
import random
import sys
import zlib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ..data.benchmarks import VQARecord, prompt_text
from ..data.conversations import repair_appended_rows
from ..datagen.teachers import FatalError, PermanentError, RetryPolicy, TransientError, classify_error, import_sdk
from ..generation import Sampling
from ..inference import begun_word
from ..processing import load_image
from .runner import answer_row

SENT_AS_IS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
TOP_LOGPROBS = 20  # OpenAI's and vLLM's most


def image_data_url(record: VQARecord) -> str:
    """The record's image as a `data:` URL an OpenAI-compatible server reads."""
    data = record.image if isinstance(record.image, bytes) else None
    if data is None and record.frame is None and Path(record.image).is_file():
        data = Path(record.image).read_bytes()
    mime = _plain_image_type(data) if data is not None and record.frame is None else None
    if mime is None:
        buffer = io.BytesIO()
        load_image(record.image, window=record.window, frame=record.frame).save(buffer, format="PNG")
        data, mime = buffer.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _plain_image_type(data: bytes) -> str | None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return SENT_AS_IS.get(image.format or "")
    except (OSError, ValueError):  # DICOM, NIfTI: not Pillow's
        return None


class ChatAPI:
    """One OpenAI-compatible endpoint and the model asked there. The key comes from `$OPENAI_API_KEY`
    unless given (local servers take any); it is never logged or written."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, timeout: float = 300.0):
        self.sdk = import_sdk("openai", "--api-url", extra="eval")
        self.base_url, self.model, self.timeout = base_url, model, timeout
        self._api_key = api_key or os.environ.get("OPENAI_API_KEY") or "none"
        self.logprobs = True  # until the endpoint refuses them

    def connect(self, asynchronous: bool = True):
        """A client of the endpoint; the SDK's own retries are off, `run_api` retries."""
        client = self.sdk.AsyncOpenAI if asynchronous else self.sdk.OpenAI
        return client(api_key=self._api_key, base_url=self.base_url, timeout=self.timeout, max_retries=0)

    def resolve_model(self) -> str:
        """The model to ask: the one named, else the endpoint's only one. Fails fast, before any question
        is sent, when the endpoint cannot be reached or refuses the key."""
        try:
            with self.connect(asynchronous=False) as client:
                listed = [m.id for m in client.models.list()]
        except self.sdk.OpenAIError as err:
            raise ValueError(f"{self.base_url}: cannot list its models ({classify_error(err, self.sdk)})") from None
        if self.model is None and len(listed) != 1:
            raise ValueError(
                f"{self.base_url} serves {len(listed)} models ({', '.join(listed[:5])}); name one with --api-model"
            )
        if self.model is not None and listed and self.model not in listed:
            raise ValueError(f"{self.base_url} does not serve {self.model!r}; it serves {', '.join(listed[:5])}")
        self.model = self.model or listed[0]
        return self.model

    async def complete(
        self,
        client,
        image_url: str,
        question: str,
        max_tokens: int,
        sampling: Sampling | None = None,
        seed=None,
        system: str | None = None,
    ) -> tuple[str, float | None]:
        """The answer (greedy, or drawn with `sampling` and the endpoint's `seed`; `system` a system message
        before the question) and its P(yes) (None without logprobs, or when neither word is among the
        first token's likeliest)."""
        content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": question}]
        messages = [{"role": "system", "content": system}] if system else []
        logprobs = self.logprobs
        options = {"logprobs": True, "top_logprobs": TOP_LOGPROBS} if logprobs else {}
        if sampling is not None:
            options.update(temperature=sampling.temperature, top_p=sampling.top_p, seed=seed)
        try:
            response = await client.chat.completions.create(
                model=self.model,
                messages=[*messages, {"role": "user", "content": content}],
                max_tokens=max_tokens,
                **{"temperature": 0, **options},
            )
        except self.sdk.OpenAIError as err:
            failure = classify_error(err, self.sdk)
            if logprobs and isinstance(failure, PermanentError) and "logprob" in str(failure).lower():
                if self.logprobs:
                    self.logprobs = False
                    tqdm.write(f"{self.base_url} refuses logprobs ({failure}); answers get no P(yes)", file=sys.stderr)
                return await self.complete(client, image_url, question, max_tokens, sampling, seed, system)
            raise failure from None
        choice = response.choices[0]
        tokens = choice.logprobs.content if choice.logprobs is not None else None
        alternatives = [(t.token, t.logprob) for t in tokens[0].top_logprobs] if tokens else []
        return (choice.message.content or "").strip(), yes_probability_of(alternatives)


def yes_probability_of(alternatives: Sequence[tuple[str, float]]) -> float | None:
    """P(yes) / (P(yes) + P(no)) from the first token's likeliest `(text, log-probability)`, counting the
    tokens that begin either word as a local run's `yes_probability` does over the whole vocabulary; a
    token not listed counts as nothing. None when no listed token begins either word."""
    mass = {"yes": 0.0, "no": 0.0}
    for text, logprob in alternatives:
        if (word := begun_word(text)) is not None:
            mass[word] += math.exp(logprob)
    total = mass["yes"] + mass["no"]
    return mass["yes"] / total if total > 0 else None


async def _ask(api: ChatAPI, client, image_url: str, question: str, retry: RetryPolicy, rng, **options):
    """The answer and its P(yes), retrying transient failures; the last one is raised once `retry` is spent."""
    attempt = 0
    while True:
        try:
            return await api.complete(client, image_url, question, **options)
        except TransientError as err:
            if attempt == retry.max_retries:
                raise
            await asyncio.sleep(retry.delay(attempt, err.retry_after, rng))
            attempt += 1


def run_api(
    api: ChatAPI,
    records: Sequence[VQARecord],
    answers_path: str | Path,
    prompt_style: str = "plain",
    max_new_tokens: int = 64,
    concurrency: int = 8,
    retry: RetryPolicy | None = None,
    sampling: Sampling | None = None,
    seed: int = 0,
    system: str | None = None,
) -> dict[str, str]:
    """Answer every record not yet in `answers_path` through `api`, appending each answer as it comes
    (greedy, or drawn with `sampling`, each question with a `seed` of its own made from `seed` and its id;
    `system` a system message before each question); returns all answers. A question the endpoint
    refuses (a 4xx) is left out of the file and the others are asked; an endpoint that refuses the run (a
    bad key, no such model) or keeps failing past `retry` ends it. Either way the error raised at the end
    names what is missing, and a rerun asks only that."""
    decoding = {"max_tokens": max_new_tokens, "sampling": sampling, "seed": seed, "system": system}
    return asyncio.run(_run(api, records, Path(answers_path), prompt_style, decoding, concurrency, retry))


async def _run(api, records, answers_path, prompt_style, decoding, concurrency, retry) -> dict[str, str]:
    model = api.model or api.resolve_model()
    answers_path.parent.mkdir(parents=True, exist_ok=True)
    done = {str(row["question_id"]): row for row in repair_appended_rows(answers_path)}
    pending = sorted((r for r in records if r.id not in done), key=lambda r: r.image_key)  # each image's together
    by_key = {r.image_key: r for r in pending}

    @lru_cache(maxsize=4 * concurrency)
    def data_url(image_key: str) -> str:
        return image_data_url(by_key[image_key])

    retry, rng = retry or RetryPolicy(), random.Random(0)
    slots, refused, stopped = asyncio.Semaphore(concurrency), {}, []
    with (
        answers_path.open("a", encoding="utf-8") as out,
        tqdm(total=len(records), initial=len(records) - len(pending), unit="q", desc="answering") as bar,
    ):
        async with api.connect() as client:

            async def one(record: VQARecord) -> None:
                question = prompt_text(record, prompt_style)
                async with slots:
                    if stopped:
                        return
                    try:
                        image_url = await asyncio.to_thread(data_url, record.image_key)  # a CT takes a while
                        seed = zlib.crc32(f"{decoding['seed']}:{record.id}".encode())
                        options = {**decoding, "seed": seed}
                        text, p_yes = await _ask(api, client, image_url, question, retry, rng, **options)
                    except FatalError as err:
                        stopped.append(f"refused the run ({err})")
                        return
                    except PermanentError as err:
                        refused[record.id] = str(err)
                        return
                    except TransientError as err:
                        stopped.append(f"kept failing ({err}, {retry.max_retries + 1} attempts)")
                        return
                row = answer_row(record, question, text, model, p_yes)
                out.write(json.dumps(row) + "\n")
                out.flush()
                done[record.id] = row
                bar.update()

            await asyncio.gather(*(one(record) for record in pending))
    missing = sum(r.id not in done for r in records)
    if stopped:
        raise ValueError(
            f"{api.base_url}: the endpoint {stopped[0]}; {missing} questions are still to answer, the others "
            f"are in {answers_path}: rerun to resume"
        )
    if refused:
        qid, reason = next(iter(refused.items()))
        raise ValueError(
            f"{api.base_url}: {len(refused)} questions were refused (e.g. {qid}: {reason}); the other answers are "
            f"in {answers_path}, and a rerun asks only these"
        )
    return {qid: row["text"] for qid, row in done.items()}
