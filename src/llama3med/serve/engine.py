"""The serving engine: requests decode together in the rows of one running batch (the static-cache
decoder, greedy or sampled), joining it between two steps and leaving it as soon as they end (continuous
batching); images are encoded once and their features kept for the next request that sends the same
file; tokens stream back per request; a bounded queue refuses work it cannot take.

One batch runs at a time, on a worker thread. Each row decodes with its own request's settings (greedy,
or sampled with its temperature and top-p), so requests of any settings share the batch; a seeded
request decodes alone, so that its seed repeats its answer. A waiting request joins while it is first in
the queue and fits in the batch's cache; otherwise it starts the next batch once this one drains, so
none waits behind later ones. Each request keeps its own token budget, stop strings, deadline and
cancellation, enforced row by row at every step, so a client that leaves frees its row at the next step.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..generation import RunningBatch, Sampling, TokenLogprobs
from ..inference import static_cache_decoder
from ..model import Llama3MedForConditionalGeneration
from ..processing import Llama3MedProcessor
from ..processing.images import Window


class QueueFull(Exception):
    """The engine holds as many requests as it may; the client should retry later."""


def image_key(data: bytes, frame: int | None = None, window: Window = None) -> str:
    """What identifies an image for the feature cache: a digest of its file's bytes, which of its frames
    or slices (None: the middle one) and the window it is seen through (None: the file's own)."""
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    digest += "" if frame is None else f"#frame={frame}"
    return digest if window is None else f"{digest}#window={window}"


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
        if features.nbytes > self.max_bytes:
            return
        with self.lock:
            if key in self.entries:
                return
            self.entries[key] = features
            self.bytes += features.nbytes
            while self.bytes > self.max_bytes:
                _, old = self.entries.popitem(last=False)
                self.bytes -= old.nbytes


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
    top_logprobs: int | None = None  # None: no log-probabilities; 0 or more: the chosen token's and as many others
    stop: list[str] = field(default_factory=list)
    deadline: float = float("inf")  # time.monotonic() by which it must finish
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False
    # filled by the engine
    events: asyncio.Queue | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token, when asked for
    text: str = ""
    finish_reason: str | None = None

    @property
    def sampling(self) -> Sampling | None:
        return Sampling(self.temperature, self.top_p) if self.temperature > 0 else None

    def decodes_with(self, other: Job) -> bool:
        """Whether the two may share a batch: any settings may, but a seeded job decodes alone, so that its
        seed gives `generate`'s draws (and repeats its answer)."""
        return self.seed is None and other.seed is None


def _ended(job: Job) -> bool:
    """Whether the job is over: finished by its tokens, cancelled, or past its deadline."""
    if job.finish_reason is None and (job.cancelled or time.monotonic() > job.deadline):
        job.finish_reason = "cancelled" if job.cancelled else "timeout"
    return job.finish_reason is not None


class Engine:
    def __init__(
        self,
        model: Llama3MedForConditionalGeneration,
        processor: Llama3MedProcessor,
        max_batch: int = 8,
        max_queue: int = 32,
        batch_window: float = 0.01,
        feature_cache_bytes: int = 512 * 2**20,
        spare_rows: bool | None = None,
    ):
        self.model, self.processor = model, processor
        # Refused at start-up rather than request by request: a generation config the decoder would not
        # follow, greedy or sampled (OpenAI clients sample by default).
        static_cache_decoder(model).check_sampling()
        self.spare_rows = model.device.type == "cuda" if spare_rows is None else spare_rows
        self.features = FeatureCache(feature_cache_bytes)
        self.max_batch, self.max_queue, self.batch_window = max_batch, max_queue, batch_window
        self.pending: deque[Job] = deque()
        self.pending_lock = threading.Lock()  # requests queue on the event loop, join on the worker
        self.running = 0
        self.wakeup: asyncio.Event | None = None
        self.lock = threading.Lock()  # one running batch at a time
        eos = model.generation_config.eos_token_id
        self.eos = set([eos] if isinstance(eos, int) else (eos or []))
        self.batches = 0
        self.finished: Counter[str] = Counter()  # finish reasons, for /metrics

    @property
    def queue_depth(self) -> int:
        return len(self.pending) + self.running

    def submit(self, job: Job) -> asyncio.Queue:
        """Queue a job; its events are ("delta", (text, tokens so far)) ... then ("done", job) or ("error",
        exception)."""
        if self.queue_depth >= self.max_queue:
            raise QueueFull(f"{self.queue_depth} requests queued or running")
        job.events = asyncio.Queue()
        with self.pending_lock:
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
            while (first := self._take_first(loop)) is not None:
                self.running = 1
                try:
                    await loop.run_in_executor(None, self._decode, first, loop)
                finally:
                    self.running = 0

    def _take_first(self, loop) -> Job | None:
        """The job at the head of the queue that has not expired, or None."""
        with self.pending_lock:
            while self.pending:
                job = self.pending.popleft()
                if not _ended(job):
                    return job
                self._finish(job, loop)
        return None

    def _joiners(self, first: Job, loop, fits: Callable[[list[Job]], bool]) -> list[Job]:
        """The waiting jobs, from the head of the queue, that may decode with `first` and `fits` lets in
        together; the first that may not stops the search, so that no job waits behind later ones."""
        chosen: list[Job] = []
        with self.pending_lock:
            while self.pending:
                job = self.pending[0]
                if _ended(job):
                    self._finish(self.pending.popleft(), loop)
                    continue
                if not job.decodes_with(first) or not fits([*chosen, job]):
                    break
                chosen.append(self.pending.popleft())
        return chosen

    def _waiting_with(self, first: Job) -> int:
        """How many jobs at the head of the queue may decode with `first`."""
        with self.pending_lock:
            return next((i for i, job in enumerate(self.pending) if not job.decodes_with(first)), len(self.pending))

    def _finish(self, job: Job, loop) -> None:
        job.finish_reason = job.finish_reason or "length"
        self.finished[job.finish_reason] += 1
        loop.call_soon_threadsafe(job.events.put_nowait, ("done", job))

    @torch.inference_mode()
    def _decode(self, first: Job, loop) -> None:
        """Decode `first` and the jobs waiting with it, and those that join later, until every row has ended."""
        with self.lock:
            self.batches += 1
            slots: list[Job | None] = []
            joining = [first, *self._joiners(first, loop, lambda group: len(group) < self.max_batch)]
            try:
                batch = self._start_batch(joining)
                slots = [None] * len(batch.budget)

                def fits(group: list[Job]) -> bool:
                    return batch.fits([len(job.input_ids) for job in group], [job.max_new_tokens for job in group])

                while joining or batch.active:
                    self._join(batch, slots, joining)
                    joining = []
                    tokens = batch.step().tolist()
                    for row, job in enumerate(slots):
                        if job is not None:
                            self._send(job, tokens[row], batch.logprobs.get(row), loop)
                    batch.stop([row for row, job in enumerate(slots) if job is not None and _ended(job)])
                    for row, job in enumerate(slots):
                        if job is not None and not batch.budget[row]:
                            self._finish(job, loop)
                            slots[row] = None
                    waiting = self._waiting_with(first)
                    if waiting > len(batch.free_rows):
                        batch.grow(min(self.max_batch, len(batch.budget) + waiting - len(batch.free_rows)))
                        slots += [None] * (len(batch.budget) - len(slots))
                    joining = self._joiners(first, loop, fits)
                    self.running = sum(job is not None for job in slots) + len(joining)
            except Exception as err:  # the batch fails; the server keeps serving others
                failed = {job.id: job for job in [*slots, *joining] if job is not None}
                for job in failed.values():
                    loop.call_soon_threadsafe(job.events.put_nowait, ("error", err))

    def _start_batch(self, jobs: list[Job]) -> RunningBatch:
        """A batch for the jobs starting it, with a cache twice as long as they need, so that jobs that come
        while they decode have room. With `spare_rows` (the default on a GPU) it has `max_batch` rows from
        the start: a GPU's decoding step is bound by reading the weights, so spare rows cost almost
        nothing, and the step keeps one shape (one CUDA graph). On a CPU a step costs in proportion to its
        rows, so by default there are only as many as jobs, and the batch grows a row for each job that
        comes, up to `max_batch`. A seeded job decodes alone, in one row, so that its seed gives
        `generate`'s tokens."""
        need = max(len(job.input_ids) for job in jobs) + max(job.max_new_tokens for job in jobs)
        length = max(need, min(2 * need, self.model.config.text_config.max_position_embeddings))
        first = jobs[0]
        if first.sampling is not None and first.seed is not None:
            torch.manual_seed(first.seed)
        rows = self.max_batch if self.spare_rows and first.seed is None else len(jobs)
        return RunningBatch(static_cache_decoder(self.model), rows, length)

    def _join(self, batch: RunningBatch, slots: list[Job | None], jobs: list[Job]) -> None:
        """Prefill each job into a free row; their images not cached are encoded in one call."""
        device = self.model.device
        features = self._image_features([image for job in jobs for image in job.images], device)
        start = 0
        for job in jobs:
            count = len(job.images)
            input_ids = torch.tensor([job.input_ids], device=device)
            embeds = self.model.embed_inputs(input_ids, features[start : start + count] if count else None)
            start += count
            slots[batch.join(embeds, job.max_new_tokens, job.sampling, job.top_logprobs)] = job

    def _send(self, job: Job, token: int, logprobs: TokenLogprobs | None, loop) -> None:
        """One new token of a running job: its text so far streams out, and a stop string or its budget
        ends it."""
        if job.finish_reason is not None:
            return
        if token in self.eos:
            job.finish_reason = "stop"
            return
        job.tokens.append(token)
        if logprobs is not None:
            job.logprobs.append(logprobs)
        text = self.processor.decode_so_far(job.tokens)
        if text is None:
            return
        for stop in job.stop:
            if stop in text:
                text, job.finish_reason = text[: text.index(stop)], "stop"
                break
        if len(job.tokens) >= job.max_new_tokens and job.finish_reason is None:
            job.finish_reason = "length"
        delta, job.text = text[len(job.text) :], text
        if delta:
            loop.call_soon_threadsafe(job.events.put_nowait, ("delta", (delta, len(job.tokens))))

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
