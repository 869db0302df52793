"""Teacher LLMs behind one small interface: Claude through the Anthropic Messages API, and any
OpenAI-compatible chat endpoint (Llama-3-70B-Instruct under vLLM, SGLang, TGI, Ollama, a hosted API, or
`llama3med serve`).

The SDKs' own retries are switched off: the pipeline retries with its own bounded, jittered back-off
that honours `retry-after`, and counts what it does. API keys come from the environment or the caller
and are never logged or written.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import random
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

DEFAULT_MODELS = {"anthropic": "claude-3-opus-20240229", "openai": "meta-llama/Meta-Llama-3-70B-Instruct"}
# US$ per million input and output tokens, for the estimate printed before a paid run.
PRICES = {"claude-3-opus-20240229": (15.0, 75.0)}


class TransientError(Exception):
    """Worth retrying (429, 5xx, timeout, connection); `retry_after` in seconds when the server said."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(Exception):
    """Not worth retrying (bad request, authentication, not found)."""


class FatalError(PermanentError):
    """No request to this endpoint can succeed (a bad key, a model it does not serve): stop asking."""


# models the paper used that their providers have since withdrawn, and what to do instead
RETIRED = {
    "claude-3-opus-20240229": "left Anthropic's API on 2026-01-05 (it is now available there by request only): "
    "ask Anthropic for access, or name a current model with --anthropic-model",
}


@dataclass
class RetryPolicy:
    """How often, and after how long, a transient failure is tried again: exponential back-off with
    jitter, never sooner than the server's `retry-after`."""

    max_retries: int = 5
    base_delay: float = 1.0
    max_delay: float = 60.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        backoff = min(self.max_delay, self.base_delay * 2**attempt) + rng.uniform(0, self.base_delay)
        return max(backoff, retry_after or 0.0)


@dataclass
class Reply:
    text: str
    input_tokens: int
    output_tokens: int


def _retry_after(response) -> float | None:
    value = getattr(response, "headers", {}).get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def import_sdk(name: str, user: str | None = None, extra: str = "datagen") -> ModuleType:
    """An API's SDK, or an error that says how to install it (they are extras, not dependencies);
    `user` names what needs it (default: the teacher of that name)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        user = user or f"the {name} teacher"
        raise RuntimeError(f"{user} needs the {name} SDK: pip install 'llama3med[{extra}]'") from None


def classify_error(err: Exception, sdk) -> Exception:
    """The SDK's exception as TransientError or PermanentError (both SDKs share these class names)."""
    if isinstance(err, (sdk.APITimeoutError, sdk.APIConnectionError)):
        return TransientError(type(err).__name__)
    if isinstance(err, sdk.APIStatusError):
        status = err.status_code
        if status in (408, 409, 429) or status >= 500:
            return TransientError(f"HTTP {status}", _retry_after(err.response))
        body = err.body if isinstance(err.body, dict) else {}
        body = body.get("error", body) if isinstance(body.get("error"), dict) else body  # Anthropic's nests it
        reason = f"HTTP {status}: {body.get('message') or type(err).__name__}"
        return FatalError(reason) if status in (401, 403, 404) else PermanentError(reason)
    return err


class AnthropicTeacher:
    name = "anthropic"

    def __init__(
        self, model: str | None = None, api_key: str | None = None, base_url: str | None = None, timeout: float = 120.0
    ):
        self.sdk = import_sdk("anthropic")
        self.model = model or DEFAULT_MODELS["anthropic"]
        key = api_key or os.environ.get("ANTHROPIC_API_KEY")
        if not key:
            raise ValueError("the anthropic teacher needs ANTHROPIC_API_KEY (or --api-key)")
        self.client = self.sdk.AsyncAnthropic(api_key=key, base_url=base_url, timeout=timeout, max_retries=0)

    async def complete(
        self, system: str, messages: list[dict[str, str]], max_tokens: int, temperature: float | None = None
    ) -> Reply:
        """`temperature` is not sent: Anthropic's API took sampling settings out in its 2026-10-21 version
        (and its SDK 2 with it), so its models decode as they do."""
        try:
            response = await self.client.messages.create(
                model=self.model, system=system, messages=messages, max_tokens=max_tokens
            )
        except self.sdk.AnthropicError as err:
            failure = classify_error(err, self.sdk)
            if isinstance(failure, FatalError) and self.model in RETIRED:
                failure = FatalError(f"{failure}; {self.model} {RETIRED[self.model]}")
            raise failure from None
        text = "".join(block.text for block in response.content if getattr(block, "type", "") == "text")
        return Reply(text, response.usage.input_tokens, response.usage.output_tokens)


class OpenAITeacher:
    name = "openai"

    def __init__(
        self, model: str | None = None, api_key: str | None = None, base_url: str | None = None, timeout: float = 120.0
    ):
        self.sdk = import_sdk("openai")
        self.model = model or DEFAULT_MODELS["openai"]
        key = api_key or os.environ.get("OPENAI_API_KEY") or "none"  # local servers take any key
        self.client = self.sdk.AsyncOpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=0)

    async def complete(
        self, system: str, messages: list[dict[str, str]], max_tokens: int, temperature: float | None = None
    ) -> Reply:
        try:
            response = await self.client.chat.completions.create(
                model=self.model,
                messages=[{"role": "system", "content": system}, *messages],
                max_tokens=max_tokens,
                temperature=0.7 if temperature is None else temperature,
            )
        except self.sdk.OpenAIError as err:
            raise classify_error(err, self.sdk) from None
        usage = response.usage
        text = response.choices[0].message.content or ""
        return Reply(text, usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0)


class RequestCounts(Protocol):
    requests: int
    retries: int


async def complete_with_retries(
    teacher,
    system: str,
    messages: list[dict[str, str]],
    max_tokens: int,
    retry: RetryPolicy,
    rng: random.Random,
    counts: RequestCounts,
    max_requests: int | None = None,
    temperature: float | None = None,
) -> Reply:
    """`teacher`'s reply, a transient failure tried again as `retry` says; every request and retry is
    counted in `counts`, and none is made once `max_requests` have been."""
    attempt = 0
    while True:
        if max_requests is not None and counts.requests >= max_requests:
            raise PermanentError("request budget spent")
        counts.requests += 1
        try:
            return await teacher.complete(system, messages, max_tokens, temperature)
        except TransientError as err:
            if attempt == retry.max_retries:
                raise PermanentError(f"gave up after {attempt + 1} attempts: {err}") from None
            counts.retries += 1
            await asyncio.sleep(retry.delay(attempt, err.retry_after, rng))
            attempt += 1


TEACHERS = {"anthropic": AnthropicTeacher, "openai": OpenAITeacher}


def make_teacher(kind: str, model: str | None = None, api_key: str | None = None, base_url: str | None = None):
    if kind not in TEACHERS:
        raise ValueError(f"teacher must be one of {', '.join(TEACHERS)}, got {kind!r}")
    return TEACHERS[kind](model=model, api_key=api_key, base_url=base_url)
