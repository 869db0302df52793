"""`llama3med serve`: an OpenAI-compatible chat API with images, and a web page, safe under load and
bad input.

Every refusal is a 4xx with OpenAI's error JSON naming what is wrong; the server keeps serving others.
Uploaded images and prompts are never written to disk or logs: logs carry request ids, sizes, token
counts and timings only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import json
import logging
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..data.web import is_public_host
from ..explain import AnswerRelevance, conversation_relevance, view
from ..processing import (
    IMAGE_PLACEHOLDER,
    ImageLoadError,
    SampleTooLongError,
    frame_count,
    load_image,
    message_content,
    with_system,
)
from ..processing.images import CT_WINDOWS, Window, parse_window, shown_frame
from .engine import Engine, FeatureCache, Job, JobImage, QueueFull, image_key

logger = logging.getLogger("llama3med.serve")


@dataclass
class Settings:
    model_id: str = "llama3med"
    api_key: str | None = None
    allow_dirs: list[Path] = field(default_factory=list)
    allow_remote: bool = False  # http(s) images from public hosts
    remote_hosts: tuple[str, ...] = ()  # hosts whose http(s) images are fetched whatever their address
    max_body_bytes: int = 20 * 2**20
    max_image_pixels: int = 40_000_000
    max_images: int = 1
    max_tokens: int = 512
    request_timeout: float = 120.0
    no_heat_maps: str | None = None  # why /v1/explain cannot run here (the LM's layers cannot be differentiated)
    system: str | None = None  # the system message of chats that send none (the model was tuned with it)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def body_too_large(settings: Settings) -> ApiError:
    return ApiError(413, f"request body over {settings.max_body_bytes} bytes (the server's --max-body-mb)")


# ---- the OpenAI request format ---------------------------------------------------------------------


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    detail: Literal["auto", "low", "high"] | None = None
    frame: int | None = Field(None, ge=0)  # llama3med's: a volume's axial slice or a DICOM's frame; None: the middle
    window: str | list[float] | None = None  # llama3med's: a CT preset or [centre, width]; None: the file's own


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]  # "developer": OpenAI's newer name for "system"
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    n: int = 1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class ExplainRequest(BaseModel):
    """llama3med's own request: a chat as `ChatRequest` has it, ending with the answer to explain."""

    model_config = ConfigDict(extra="forbid")
    model: str
    messages: list[Message] = Field(min_length=1)


def parse_request(kind: type[BaseModel], body: bytes) -> BaseModel:
    try:
        return kind.model_validate_json(body)
    except ValidationError as err:
        deepest = max(err.errors(), key=lambda e: len(e["loc"]))  # where a union's intended branch failed
        param = ".".join(str(p) for p in deepest["loc"])
        raise ApiError(400, f"{param}: {deepest['msg']}", param) from None


# ---- images ------------------------------------------------------------------------------------------


def read_image_url(url: str, settings: Settings) -> bytes:
    """Bytes of a data: URL, an allowed file:// path, or (only with allow_remote) an http(s) URL."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise ApiError(400, "image data URLs must be base64-encoded", "image_url")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "image data URL holds invalid base64", "image_url") from None
    if url.startswith("file://"):
        path = Path(url.removeprefix("file://")).resolve()  # follows symlinks and '..'
        if not any(path.is_relative_to(root) for root in settings.allow_dirs):
            raise ApiError(403, "file:// images are only read under the directories the server allows", "image_url")
        if not path.is_file():
            raise ApiError(400, "file:// image not found", "image_url")
        if path.stat().st_size > settings.max_body_bytes:
            raise ApiError(413, "image file too large", "image_url")
        return path.read_bytes()
    if url.startswith(("http://", "https://")):
        return fetch_remote_image(url, settings)
    raise ApiError(400, "image_url must be a data:, file:// or http(s) URL", "image_url")


def fetch_remote_image(url: str, settings: Settings) -> bytes:
    """An http(s) image, from a host named in `remote_hosts` or, with `allow_remote`, from a host whose
    every address is public: a client must not make the server reach into its own network (an
    intranet service, a cloud's metadata address). The body is read up to the size a request may carry."""
    host = urllib.parse.urlsplit(url).hostname
    if host is None:
        raise ApiError(400, "image URL names no host", "image_url")
    if host not in settings.remote_hosts:
        if not settings.allow_remote:
            raise ApiError(400, "remote image URLs are disabled on this server; send a data: URL", "image_url")
        if not is_public_host(host):
            raise ApiError(
                403, f"{host} is not a public host; this server fetches images only from public ones", "image_url"
            )
    import httpx

    try:
        with (
            httpx.Client(timeout=20.0, follow_redirects=False) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise ApiError(400, f"could not fetch the image (HTTP {response.status_code})", "image_url")
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > settings.max_body_bytes:
                    raise ApiError(413, "remote image too large", "image_url")
    except httpx.HTTPError as err:
        raise ApiError(400, f"could not fetch the image ({type(err).__name__})", "image_url") from None
    return bytes(body)


def render_png(body: bytes, window: str | None, frame: str | None, settings: Settings) -> tuple[bytes, int, int]:
    """The image as PNG, the frame shown and how many there are. Off the event loop: a CT volume takes
    about a second to decompress to its middle slice."""
    try:
        count = frame_count(body)
        chosen = shown_frame(count, None if frame is None else int(frame))
        if chosen >= count:
            raise ApiError(400, f"frame {chosen} requested but the image has {count}", "frame")
        image = load_image(body, window=window, frame=chosen, max_pixels=settings.max_image_pixels)
    except ImageLoadError as err:
        raise ApiError(400, f"unreadable image: {err.reason}", "image") from None
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), chosen, count


def _window(value: str | list[float] | None) -> Window:
    try:
        return None if value is None else parse_window(value)
    except ValueError as err:
        raise ApiError(400, str(err), "window") from None


def chat_messages(request_messages: list[Message], settings: Settings) -> tuple[list[dict], list[SentImage]]:
    """A request's messages as the processor takes them (`role`, `content` with an image placeholder per
    image, before its message's text) and the images they hold, in order; the server's `system` message
    first when the request sends none."""
    messages, images = [], []
    for message in request_messages:
        if isinstance(message.content, str):
            text = message.content
        else:
            parts: list[str | None] = []
            for part in message.content:
                if part.type == "text":
                    parts.append(part.text or "")
                elif message.role != "user":
                    raise ApiError(400, "images are only accepted in user messages", "messages")
                else:
                    if part.image_url is None:
                        raise ApiError(400, "an image_url part needs an image_url", "messages")
                    window = _window(part.image_url.window)
                    data = read_image_url(part.image_url.url, settings)
                    images.append(SentImage(data, part.image_url.frame, window))
                    parts.append(None)
            text = message_content(parts)
        if IMAGE_PLACEHOLDER in text and isinstance(message.content, str):
            raise ApiError(400, f"send images as image_url parts, not as {IMAGE_PLACEHOLDER} in the text", "messages")
        messages.append({"role": "system" if message.role == "developer" else message.role, "content": text})
    if len(images) > settings.max_images:
        raise ApiError(400, f"{len(images)} images sent; this server takes at most {settings.max_images}", "messages")
    return with_system(messages, settings.system), images


@dataclass
class SentImage:
    data: bytes
    frame: int | None
    window: Window

    @property
    def key(self) -> str:
        return image_key(self.data, self.frame, self.window)

    def pixel_values(self, processor, settings: Settings) -> torch.Tensor:
        """`(3, S, S)`: the image decoded, windowed and fitted as the model takes it."""
        try:
            shown = load_image(self.data, window=self.window, frame=self.frame, max_pixels=settings.max_image_pixels)
            return processor.preprocess_image(shown)
        except ImageLoadError as err:
            raise ApiError(400, f"unreadable image: {err.reason}", "image_url") from None


def build_prompt(request: ChatRequest, engine: Engine, settings: Settings) -> tuple[list[int], list[JobImage]]:
    """Token ids (images expanded) and images of a chat; images go before their message's text. An image
    whose features the engine holds is not decoded again."""
    processor = engine.processor
    messages, images = chat_messages(request.messages, settings)
    job_images = []
    for sent in images:
        image = JobImage(sent.key, features=engine.features.get(sent.key))
        if image.features is None:
            image.pixel_values = sent.pixel_values(processor, settings)
        job_images.append(image)
    prompt = processor.chat_prompt(messages)
    context = engine.model.config.text_config.max_position_embeddings
    try:
        input_ids = processor.encode_text(prompt, num_images=len(images), max_length=context - 1)
    except SampleTooLongError as err:
        raise ApiError(
            400, f"the prompt is too long for the model's context: {err}", "messages", "context_length_exceeded"
        ) from None
    return input_ids, job_images


def explain_answer(request: ExplainRequest, engine: Engine, settings: Settings) -> tuple[list[list[float]], bytes]:
    """Where in the image the chat's last answer came from (`conversation_relevance`): the relevance over
    the base grid and the heat map as PNG, from the image's cached features when the engine holds them.
    Runs beside the engine's decoding, on its own thread: it reads the same weights and changes nothing."""
    messages, images = chat_messages(request.messages, settings)
    if messages[-1]["role"] != "assistant":
        raise ApiError(400, "the last message must be the answer to explain, in the assistant role", "messages")
    if len(images) != 1:
        raise ApiError(400, "a heat map needs the image the answer is about, in a user message", "messages")
    model, processor = engine.model, engine.processor
    pixel_values = images[0].pixel_values(processor, settings)  # for the view drawn; a cache hit skips the tower
    features = engine.features.get(images[0].key)
    if features is None:
        with torch.no_grad():
            features = model.encode_images(pixel_values[None].to(model.device))[0]
        engine.features.put(images[0].key, features)
    try:
        relevance = conversation_relevance(model, processor, features[None].clone(), messages)
    except SampleTooLongError as err:
        raise ApiError(400, f"the chat is too long for the model's context: {err}", "messages") from None
    except ValueError as err:
        raise ApiError(400, str(err), "messages") from None
    buffer = io.BytesIO()
    AnswerRelevance(relevance, view(processor, pixel_values)).heat_map().save(buffer, format="PNG")
    return relevance.tolist(), buffer.getvalue()


# ---- metrics -----------------------------------------------------------------------------------------


class Metrics:
    def __init__(self):
        self.requests: dict[str, int] = {}
        self.explanations: dict[str, int] = {}  # /v1/explain's answers, by status
        self.prompt_tokens = self.completion_tokens = 0
        self.latency_sum = 0.0
        self.latency_count = 0

    def observe(self, status: int, latency: float, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        self.requests[str(status)] = self.requests.get(str(status), 0) + 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.latency_sum += latency
        self.latency_count += 1

    def render(self, queue_depth: int, finished: dict[str, int], features: FeatureCache) -> str:
        lines = ["# TYPE llama3med_requests_total counter"]
        lines += [f'llama3med_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
        lines += [
            "# TYPE llama3med_prompt_tokens_total counter",
            f"llama3med_prompt_tokens_total {self.prompt_tokens}",
            "# TYPE llama3med_completion_tokens_total counter",
            f"llama3med_completion_tokens_total {self.completion_tokens}",
            "# TYPE llama3med_request_latency_seconds summary",
            f"llama3med_request_latency_seconds_sum {self.latency_sum:.6f}",
            f"llama3med_request_latency_seconds_count {self.latency_count}",
            "# TYPE llama3med_explanations_total counter",
            *(f'llama3med_explanations_total{{status="{s}"}} {n}' for s, n in sorted(self.explanations.items())),
            "# TYPE llama3med_queue_depth gauge",
            f"llama3med_queue_depth {queue_depth}",
            "# TYPE llama3med_finished_total counter",
            *(f'llama3med_finished_total{{reason="{r}"}} {n}' for r, n in sorted(finished.items())),
            "# TYPE llama3med_image_cache_lookups_total counter",
            f'llama3med_image_cache_lookups_total{{result="hit"}} {features.hits}',
            f'llama3med_image_cache_lookups_total{{result="miss"}} {features.misses}',
            "# TYPE llama3med_image_cache_bytes gauge",
            f"llama3med_image_cache_bytes {features.bytes}",
        ]
        return "\n".join(lines) + "\n"


# ---- the app -----------------------------------------------------------------------------------------


def error_response(err: ApiError) -> JSONResponse:
    kind = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
        err.status, "invalid_request_error"
    )
    if err.status >= 500:
        kind = "server_error"
    body = {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.code}}
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def create_app(engine: Engine, settings: Settings) -> FastAPI:
    metrics = Metrics()
    processor = engine.processor
    state = {"ready": False}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(engine.run())
        state["ready"] = True
        yield
        task.cancel()

    app = FastAPI(title="llama3med", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return error_response(err)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        started = time.monotonic()
        if request.url.path not in ("/health", "/") and settings.api_key:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, f"Bearer {settings.api_key}".encode()):  # in constant time
                return error_response(ApiError(401, "missing or wrong API key (Authorization: Bearer ...)"))
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            return error_response(body_too_large(settings))
        response = await call_next(request)
        if request.url.path.startswith("/v1/chat") and response.status_code != 200:
            metrics.observe(response.status_code, time.monotonic() - started)
        if request.url.path == "/v1/explain":
            status = str(response.status_code)
            metrics.explanations[status] = metrics.explanations.get(status, 0) + 1
        logger.info(
            "%s %s %d %.3fs", request.method, request.url.path, response.status_code, time.monotonic() - started
        )
        return response

    @app.get("/health")
    async def health():
        if not state["ready"]:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "model": settings.model_id}

    @app.get("/metrics")
    async def prometheus():
        text = metrics.render(engine.queue_depth, engine.finished, engine.features)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": settings.model_id, "object": "model", "created": 0, "owned_by": "llama3med"}],
        }

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse((resources.files("llama3med.serve") / "static" / "index.html").read_text(encoding="utf-8"))

    @app.post("/v1/render")
    async def render(request: Request):
        """The image as the model sees it, as PNG: lets the page show DICOM files with a CT window, and a
        frame or axial slice of a multi-frame DICOM or a NIfTI volume (`X-Frame` of `X-Frame-Count`)."""
        body = await _read_body(request, settings)
        window = request.query_params.get("window") or None
        if window is not None and window not in CT_WINDOWS:
            raise ApiError(400, f"window must be one of {', '.join(CT_WINDOWS)}", "window")
        frame = request.query_params.get("frame") or None
        if frame is not None and not frame.isdigit():
            raise ApiError(400, "frame must be a whole number from 0", "frame")
        png, chosen, count = await asyncio.to_thread(render_png, body, window, frame, settings)
        headers = {"X-Frame": str(chosen), "X-Frame-Count": str(count)}
        return Response(png, media_type="image/png", headers=headers)

    def check_model(name: str) -> None:
        if name != settings.model_id:
            raise ApiError(
                404, f"model {name!r} is not served here; try {settings.model_id!r}", "model", "model_not_found"
            )

    explaining = asyncio.Lock()  # one backward pass at a time: each holds a forward's activations
    waiting_explains = 0  # as many as the engine's queue may wait, each holding its image

    @app.post("/v1/explain")
    async def explain(request: Request):
        """llama3med's own: where in the image a chat's last answer came from, as `ask --heatmap` draws
        it: `relevance` over the base grid, row by row from the top left, summing to 1, and `heat_map`,
        the model's view with it in red, as a PNG data URL."""
        nonlocal waiting_explains
        explain_request = parse_request(ExplainRequest, await _read_body(request, settings))
        check_model(explain_request.model)
        if settings.no_heat_maps:
            raise ApiError(501, f"heat maps are off on this server: {settings.no_heat_maps}")
        if waiting_explains >= engine.max_queue:
            raise ApiError(
                429, "server busy explaining; retry shortly", code="queue_full", headers={"retry-after": "1"}
            )
        waiting_explains += 1
        try:
            async with explaining:
                relevance, heat_map = await asyncio.to_thread(explain_answer, explain_request, engine, settings)
        finally:
            waiting_explains -= 1
        return {
            "object": "llama3med.explanation",
            "model": settings.model_id,
            "relevance": relevance,
            "heat_map": "data:image/png;base64," + base64.b64encode(heat_map).decode(),
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        started = time.monotonic()
        chat_request = parse_request(ChatRequest, await _read_body(request, settings))
        if chat_request.n != 1:
            raise ApiError(400, "only n=1 is supported", "n")
        for param in ("frequency_penalty", "presence_penalty", "logit_bias"):
            if getattr(chat_request, param):  # many clients send the neutral 0 or {} with every request
                raise ApiError(400, f"{param} is not supported; send 0 or leave it out", param)
        if chat_request.top_logprobs is not None and not chat_request.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        check_model(chat_request.model)
        input_ids, images = await asyncio.to_thread(build_prompt, chat_request, engine, settings)
        stop = [chat_request.stop] if isinstance(chat_request.stop, str) else list(chat_request.stop or [])
        job = Job(
            input_ids=input_ids,
            images=images,
            max_new_tokens=min(
                chat_request.max_completion_tokens or chat_request.max_tokens or settings.max_tokens,
                settings.max_tokens,
            ),
            temperature=chat_request.temperature,
            top_p=chat_request.top_p,
            seed=chat_request.seed,
            top_logprobs=(chat_request.top_logprobs or 0) if chat_request.logprobs else None,
            stop=stop,
            deadline=time.monotonic() + settings.request_timeout,
        )
        try:
            events = engine.submit(job)
        except QueueFull as err:
            raise ApiError(
                429, f"server busy: {err}; retry shortly", code="queue_full", headers={"retry-after": "1"}
            ) from None
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if chat_request.stream:
            include_usage = bool(chat_request.stream_options and chat_request.stream_options.include_usage)
            stream = _stream(
                job, events, completion_id, created, settings.model_id, include_usage, metrics, started, processor
            )
            return StreamingResponse(stream, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        kind, value = await _wait_done(job, events, request)
        if kind == "error":
            raise ApiError(500, "generation failed") from value
        if job.finish_reason in ("timeout", "cancelled"):
            raise ApiError(504 if job.finish_reason == "timeout" else 499, f"request {job.finish_reason}")
        usage = _usage(job)
        metrics.observe(200, time.monotonic() - started, usage["prompt_tokens"], usage["completion_tokens"])
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": settings.model_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": job.text},
                    "finish_reason": job.finish_reason,
                    "logprobs": _logprobs(job, processor, 0, len(job.tokens)),
                }
            ],
            "usage": usage,
        }

    return app


async def _read_body(request: Request, settings: Settings) -> bytes:
    """The body, refused once it passes the limit even without a content-length header."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > settings.max_body_bytes:
            raise body_too_large(settings)
        chunks.append(chunk)
    return b"".join(chunks)


def _logprobs(job: Job, processor, start: int, end: int) -> dict | None:
    """OpenAI's `logprobs` of the job's tokens `start:end` (None when the request did not ask): each
    token's bytes, their text and its log-probability, and its `top_logprobs` alternatives."""
    if job.top_logprobs is None:
        return None

    def entry(token: int, logprob: float) -> dict:
        data = processor.token_bytes(token)
        text = data.decode(errors="replace")
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(data)}  # -inf is no JSON

    content = [
        {**entry(token, step.logprob), "top_logprobs": [entry(other, logprob) for other, logprob in step.top]}
        for token, step in zip(job.tokens[start:end], job.logprobs[start:end], strict=True)
    ]
    return {"content": content, "refusal": None}


def _usage(job: Job) -> dict:
    prompt = len(job.input_ids)
    return {"prompt_tokens": prompt, "completion_tokens": len(job.tokens), "total_tokens": prompt + len(job.tokens)}


async def _wait_done(job: Job, events: asyncio.Queue, request: Request):
    """The final event; a client that disconnects meanwhile cancels its job."""
    while True:
        try:
            kind, value = await asyncio.wait_for(events.get(), timeout=0.5)
        except TimeoutError:
            if await request.is_disconnected():
                job.cancelled = True
            continue
        if kind != "delta":
            return kind, value


async def _stream(job, events, completion_id, created, model_id, include_usage, metrics, started, processor):
    """Server-sent events as OpenAI sends them: a role chunk, content deltas, a finish chunk, [DONE]. Asked
    for, each chunk carries the logprobs of the tokens since the last."""
    sent = 0  # tokens whose logprobs have gone out

    def chunk(delta: dict, finish_reason=None, usage=None, tokens: int | None = None) -> str:
        nonlocal sent
        logprobs = None
        if tokens is not None:
            logprobs, sent = _logprobs(job, processor, sent, tokens), tokens
        choices = (
            []
            if usage is not None
            else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}]
        )
        body = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_id,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await events.get()
            if kind == "delta":
                text, tokens = value
                yield chunk({"content": text}, tokens=tokens)
                continue
            if kind == "error" or job.finish_reason in ("timeout", "cancelled"):
                message = "generation failed" if kind == "error" else f"request {job.finish_reason}"
                yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
            else:
                yield chunk({}, job.finish_reason, tokens=len(job.tokens))
                usage = _usage(job)
                if include_usage:
                    yield chunk({}, usage=usage)
                metrics.observe(200, time.monotonic() - started, usage["prompt_tokens"], usage["completion_tokens"])
            yield "data: [DONE]\n\n"
            return
    finally:
        job.cancelled = job.finish_reason is None  # the client left before the end: free its row
