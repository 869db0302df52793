"""The serving engine: requests that arrive together share one batched decode (the static-cache
decoder, greedy or sampled), images are encoded once and their features kept for the next request that
sends the same file, tokens stream back per request, and a bounded queue refuses work it cannot take.

One generation runs at a time on a worker thread while the next batch gathers. Requests in a batch share
their sampling settings (greedy, or the same temperature and top-p); each keeps its own token budget,
stop strings, deadline and cancellation, enforced row by row at every step, so a client that leaves
frees its row at the next step.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

import torch

from ..generation import Sampling
from ..inference import static_cache_decoder
from ..model import Llama3MedForConditionalGeneration
from ..processing import Llama3MedProcessor, pad_sequences


class QueueFull(Exception):
    """The engine holds as many requests as it may; the client should retry later."""


def image_key(data: bytes) -> str:
    """What identifies an image file for the feature cache: a digest of its bytes."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class FeatureCache:
    """Projected features of the images seen last, by `image_key`, within a budget of bytes (least
    recently used first out).

    A chat client resends its image with every turn, and colleagues ask about the same scan: a hit skips
    decoding the file, resizing it to every scale and the tower's passes over all its tiles. Features stay
    where the model computed them (the GPU) and in memory only.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = self.hits = self.misses = 0
        self.lock = threading.Lock()  # requests look up on their threads while the engine stores

    def get(self, key: str) -> torch.Tensor | None:
        with self.lock:
            features = self.entries.get(key)
            if features is None:
                self.misses += 1
                return None
            self.hits += 1
            self.entries.move_to_end(key)
            return features

    def put(self, key: str, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.max_bytes:
            return
        with self.lock:
            if key in self.entries:
                return
            self.entries[key] = features
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self.entries.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()


@dataclass
class JobImage:
    """One image of a request: its pixels still to encode, or the features the cache held for it."""

    key: str
    pixel_values: torch.Tensor | None = None  # (3, H, W)
    features: torch.Tensor | None = None  # (num_image_tokens, text_hidden)


@dataclass
class Job:
    input_ids: list[int]
    images: list[JobImage]  # in the order of the prompt's <image> tokens
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    deadline: float = float("inf")  # time.monotonic() by which it must finish
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False
    # filled by the engine
    events: asyncio.Queue | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None

    @property
    def sampling(self) -> tuple:
        """Jobs with equal keys can share a decode; a seeded job runs alone to be reproducible."""
        if self.seed is not None:
            return ("seeded", self.id)
        return ("greedy",) if self.temperature <= 0 else ("sample", self.temperature, self.top_p)


def _stopped_rows(jobs: list[Job]) -> torch.Tensor:
    """Per-row stop: finished by the streamer, cancelled, or past its deadline."""
    now = time.monotonic()
    for job in jobs:
        if job.finish_reason is None and (job.cancelled or now > job.deadline):
            job.finish_reason = "cancelled" if job.cancelled else "timeout"
    return torch.tensor([job.finish_reason is not None for job in jobs])


class _Streamer:
    """Receives each step's tokens for the whole batch and sends every row its new text."""

    def __init__(self, jobs: list[Job], processor: Llama3MedProcessor, eos: set[int], loop):
        self.jobs, self.processor, self.eos, self.loop = jobs, processor, eos, loop

    def send(self, tokens: torch.Tensor) -> None:
        """One step's `(B,)` tokens."""
        for job, token in zip(self.jobs, tokens.tolist(), strict=True):
            if job.finish_reason is not None:
                continue
            if token in self.eos:
                job.finish_reason = "stop"
                continue
            job.tokens.append(token)
            text = self.processor.decode(job.tokens)
            if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                continue
            for stop in job.stop:
                if stop in text:
                    text, job.finish_reason = text[: text.index(stop)], "stop"
                    break
            if len(job.tokens) >= job.max_new_tokens and job.finish_reason is None:
                job.finish_reason = "length"
            delta, job.text = text[len(job.text) :], text
            if delta:
                self.loop.call_soon_threadsafe(job.events.put_nowait, ("delta", delta))


class Engine:
    def __init__(
        self,
        model: Llama3MedForConditionalGeneration,
        processor: Llama3MedProcessor,
        max_batch: int = 8,
        max_queue: int = 32,
        batch_window: float = 0.01,
        feature_cache_bytes: int = 512 * 2**20,
    ):
        self.model, self.processor = model, processor
        self.features = FeatureCache(feature_cache_bytes)
        self.max_batch, self.max_queue, self.batch_window = max_batch, max_queue, batch_window
        self.pending: deque[Job] = deque()
        self.running = 0
        self.wakeup: asyncio.Event | None = None
        self.lock = threading.Lock()  # one decode at a time
        eos = model.generation_config.eos_token_id
        self.eos = set([eos] if isinstance(eos, int) else (eos or []))
        self.batches = 0
        self.finished: Counter[str] = Counter()  # finish reasons, for /metrics

    @property
    def queue_depth(self) -> int:
        return len(self.pending) + self.running

    def submit(self, job: Job) -> asyncio.Queue:
        """Queue a job; its events are ("delta", text) ... then ("done", job) or ("error", exception)."""
        if self.queue_depth >= self.max_queue:
            raise QueueFull(f"{self.queue_depth} requests queued or running")
        job.events = asyncio.Queue()
        self.pending.append(job)
        self.wakeup.set()
        return job.events

    async def run(self) -> None:
        """The batching loop; start it once as a task on the server's event loop."""
        self.wakeup = asyncio.Event()
        loop = asyncio.get_running_loop()
        while True:
            await self.wakeup.wait()
            await asyncio.sleep(self.batch_window)  # let requests that arrive together meet
            self.wakeup.clear()
            while self.pending:
                batch = self._take_batch()
                if not batch:
                    continue
                self.running = len(batch)
                try:
                    await loop.run_in_executor(None, self._generate, batch, loop)
                except Exception as err:  # the batch fails; the server keeps serving others
                    for job in batch:
                        job.events.put_nowait(("error", err))
                else:
                    for job in batch:
                        self.finished[job.finish_reason] += 1
                        job.events.put_nowait(("done", job))
                finally:
                    self.running = 0

    def _take_batch(self) -> list[Job]:
        now = time.monotonic()
        first = self.pending.popleft()
        if first.cancelled or now > first.deadline:
            first.finish_reason = "cancelled" if first.cancelled else "timeout"
            self.finished[first.finish_reason] += 1
            first.events.put_nowait(("done", first))
            return []
        batch, kept = [first], deque()
        while self.pending and len(batch) < self.max_batch:
            job = self.pending.popleft()
            (batch if job.sampling == first.sampling and not job.cancelled else kept).append(job)
        self.pending.extendleft(reversed(kept))
        return batch

    @torch.inference_mode()
    def _generate(self, jobs: list[Job], loop) -> None:
        with self.lock:
            self.batches += 1
            device = self.model.device
            features = self._image_features([image for job in jobs for image in job.images], device)
            input_ids, attention_mask = pad_sequences(
                [job.input_ids for job in jobs], self.processor.tokenizer.pad_token_id, "left"
            )
            embeds = self.model.embed_inputs(input_ids.to(device), features)
            first, mask = jobs[0], attention_mask.to(device)
            max_new_tokens = max(job.max_new_tokens for job in jobs)
            streamer = _Streamer(jobs, self.processor, self.eos, loop)

            def on_step(tokens: torch.Tensor) -> torch.Tensor:
                streamer.send(tokens)
                return _stopped_rows(jobs)

            sampling = Sampling(first.temperature, first.top_p) if first.temperature > 0 else None
            if sampling is not None and first.seed is not None:
                torch.manual_seed(first.seed)
            static_cache_decoder(self.model)(embeds, mask, max_new_tokens, on_step=on_step, sampling=sampling)
            for job in jobs:
                job.finish_reason = job.finish_reason or "length"

    def _image_features(self, images: list[JobImage], device: torch.device) -> torch.Tensor | None:
        """`(len(images), num_image_tokens, text_hidden)`: the images not cached are encoded in one call
        (a file sent twice in the batch, once) and cached."""
        if not images:
            return None
        todo = {image.key: image.pixel_values for image in images if image.features is None}
        if todo:
            encoded = self.model.encode_images(torch.stack(list(todo.values())).to(device))
            for key, features in zip(todo, encoded, strict=True):
                self.features.put(key, features.clone())  # its own storage, not a view of the batch
                todo[key] = features
        return torch.stack([image.features if image.features is not None else todo[image.key] for image in images])
