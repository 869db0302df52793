"""Decoding with a static KV cache: the tokens of HF `generate`, greedy or sampled, faster.

HF `generate` rebuilds its plan at every step (logits processors, stopping criteria, keyword updates) and
grows a dynamic cache by concatenation, so each step has new shapes. Here the cache is allocated once at a
length rounded up to `LENGTH_BUCKET`, and every decode step has the same shapes. Compiled, the step (the LM
on one token per row) is traced for the first batch size and cache length with static shapes, and once
more, with sizes symbolic, when a second one comes (a server's batches vary); on a GPU each shape is
replayed as a CUDA graph. The prompt's prefill is not compiled: its length changes with every prompt.

Greedy means argmax after the generation config's suppressed tokens (and EOS, before `min_new_tokens`);
sampling (`Sampling`) draws from the same logits as `generate(do_sample=True)` does, after its
temperature, top-k and top-p warpers. A row that emits an EOS token is padded from then on, and the loop
ends when every row has. A config that asks for any other logits processor is refused by name rather
than decoded differently.

`StaticCacheDecoder` decodes a batch from start to end (`answer`, `eval`); `RunningBatch` keeps its rows
open for prompts that join between steps (`serve`), each row greedy or sampled with its own settings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import (
    AttentionInterface,
    AttentionMaskInterface,
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedModel,
    StaticCache,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import DynamicCache, StaticLayer, StaticSlidingWindowLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

LENGTH_BUCKET = 128  # cache lengths are multiples of this: few compiled shapes, little attention wasted
GROUPED_DECODE_SDPA = "sdpa_grouped_decode"

UNSUPPORTED = {  # generation config fields that would change greedy tokens, and their neutral values
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "min_length": 0,
}
UNSUPPORTED_IN_SAMPLING = {  # and those that would change sampled tokens too
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "top_h": None,
}


@dataclass(frozen=True)
class Sampling:
    """Sample instead of taking the argmax, as `generate(do_sample=True, temperature=..., top_p=...)` does:
    float32 logits, divided by the temperature, cut to the generation config's top-k (HF's default when
    it has none) and then to the top-p mass, one multinomial draw per row from torch's global generator,
    so `torch.manual_seed` before the call repeats the answer, and gives `generate`'s."""

    temperature: float = 1.0
    top_p: float = 1.0


def sdpa_grouped_decode(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """HF's SDPA attention, except that a single query token attends over the cached key/value heads as
    they are, its query heads grouped under them, inside `torch.compile` too. HF's SDPA groups them only
    when not compiling; compiled, it repeats every cached key and value once per query head, a copy of the
    whole cache at every step (at batch 32 over 896 positions the compiled step was 2x slower than eager;
    grouped, it is faster)."""
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1 or (attention_mask is not None and attention_mask.shape[1] != 1):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    batch, heads, _, dim = query.shape
    grouped = query.reshape(batch, heads // groups, groups, dim)  # (B, kv heads, group, D): a group's queries
    output = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=kwargs.get("scaling"))
    return output.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_DECODE_SDPA, sdpa_grouped_decode)
AttentionMaskInterface.register(GROUPED_DECODE_SDPA, sdpa_mask)


def token_ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _refuse_fields(generation_config: GenerationConfig, fields: dict[str, object]) -> None:
    for field, neutral in fields.items():
        if getattr(generation_config, field, neutral) not in (neutral, None, [], {}):
            raise ValueError(
                f"generation_config.{field}={getattr(generation_config, field)!r}: the static-cache decoder "
                "applies EOS, suppressed tokens, temperature, top-k and top-p only; unset it in generation_config.json"
            )


class StaticCacheDecoder:
    """New tokens of a causal LM from prompt embeddings, greedy or sampled: `(B, T, D) -> (B, <= max_new_tokens)`."""

    def __init__(self, language_model: PreTrainedModel, generation_config: GenerationConfig):
        _refuse_fields(generation_config, UNSUPPORTED)
        self.language_model = language_model
        self.generation_config = generation_config
        self.eos = token_ids(generation_config.eos_token_id)
        pad = generation_config.pad_token_id
        self.pad = pad if pad is not None else (self.eos[0] if self.eos else 0)  # `generate` pads with EOS too
        self.suppressed = token_ids(generation_config.suppress_tokens)
        self.cache: StaticCache | None = None
        self.cache_shape: tuple[int, int] | None = None
        self.step = self._logits_of_next

    def compile(self) -> None:
        """Compile the decode step (a CUDA graph on a GPU); an SDPA LM switches to `sdpa_grouped_decode`,
        the same attention with the cache read once a step. Inductor's `freezing`
        (which `compile_for_inference` turns on for the tower) stays off while the step is traced: it
        would hold the first cache's tensors as constants of the graph, and a later cache of the same
        shape would be read and written through them."""
        import torch._inductor.config as inductor  # only compiling needs inductor loaded

        if self.language_model.config._attn_implementation == "sdpa":
            self.language_model.set_attn_implementation(GROUPED_DECODE_SDPA)
        options = {"triton.cudagraphs": self.language_model.device.type == "cuda"}
        compiled = torch.compile(self._logits_of_next, fullgraph=True, dynamic=None, options=options)

        def step(*args: object) -> torch.Tensor:
            with inductor.patch(freezing=False):
                return compiled(*args)

        self.step = step

    def _logits_of_next(
        self, tokens: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor, cache: StaticCache
    ) -> torch.Tensor:
        """`(B, 1)` tokens at `(B, 1)` positions -> `(B, vocab)` logits, the cache one position longer."""
        output = self.language_model(
            input_ids=tokens, position_ids=positions, attention_mask=attention_mask, cache=cache, use_cache=True
        )
        return output.logits[:, -1]

    def _empty_cache(self, batch: int, length: int) -> StaticCache:
        """The static cache for this batch and bucketed length, reused while they repeat."""
        length = -(-length // LENGTH_BUCKET) * LENGTH_BUCKET
        if self.cache_shape != (batch, length):
            self.cache = None  # free the old one before allocating
            self.cache = static_cache(self.language_model.config, length)
            self.cache_shape = (batch, length)
        else:
            self.cache.reset()
        return self.cache

    @torch.inference_mode()
    def __call__(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        min_new_tokens: int = 0,
        prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        on_step: Callable[[torch.Tensor], torch.Tensor] | None = None,
        sampling: Sampling | None = None,
        on_first_logits: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """New tokens after each left-padded prompt, greedy unless `sampling` is given. With `prefix`
        (every layer's keys and values of the first P positions, each `(B, heads, P, head_dim)`;
        P = `attention_mask` length - T), `inputs_embeds` holds only the positions after it.
        `on_step` sees each step's `(B,)` tokens as they come and returns the rows to stop (a server's
        streaming, stop strings and cancellations); a stopped row is padded like a finished one.
        `on_first_logits` sees the first new token's `(B, vocab)` logits (how sure a yes or no is)."""
        choose = self._chooser(sampling)
        batch, prompt_length = attention_mask.shape
        device = inputs_embeds.device
        cache = self._empty_cache(batch, prompt_length + max_new_tokens)
        if prefix is not None:
            self._write_prefix(cache, prefix)
        mask = torch.zeros(batch, self.cache_shape[1], dtype=attention_mask.dtype, device=device)
        mask[:, :prompt_length] = attention_mask
        positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)  # as `generate` counts
        logits = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            position_ids=positions[:, -inputs_embeds.shape[1] :],
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        eos = torch.tensor(self.eos, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        position = positions[:, -1:]
        new_tokens = []
        for step in range(max_new_tokens):
            logits[:, self.suppressed] = -torch.inf
            if step < min_new_tokens:
                logits[:, self.eos] = -torch.inf
            if step == 0 and on_first_logits is not None:
                on_first_logits(logits)
            token = choose(logits).masked_fill(finished, self.pad)
            new_tokens.append(token)
            finished |= torch.isin(token, eos)
            if on_step is not None:
                finished |= on_step(token).to(device)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            mask[:, prompt_length + step] = 1
            position = position + 1
            logits = self.step(token[:, None], position, mask, cache)
        return torch.stack(new_tokens, dim=1)

    def check_sampling(self) -> None:
        """Raise, naming the field, if the generation config sets something sampling would not apply."""
        _refuse_fields(self.generation_config, UNSUPPORTED_IN_SAMPLING)

    @property
    def top_k(self) -> int:
        """The generation config's top-k, else `generate`'s default; 0: no cut."""
        top_k = self.generation_config.top_k
        return GenerationConfig._get_default_generation_params()["top_k"] if top_k is None else top_k

    def choose_rows(self, logits: torch.Tensor, samplings: Sequence[Sampling | None]) -> torch.Tensor:
        """`(B, vocab)` logits -> `(B,)` next tokens, row `i` greedy when `samplings[i]` is None and
        otherwise drawn after its own temperature and top-p (and the config's top-k), so that requests
        with other settings share a step. One setting for every row goes through `generate`'s own
        warpers (`_chooser`); mixed ones through the same operations batched, whose draws are
        distributed alike but are not `generate`'s under a seed."""
        if len(set(samplings)) == 1:
            return self._chooser(samplings[0])(logits)
        drawn = torch.multinomial(F.softmax(self.warp_rows(logits, samplings), dim=-1), num_samples=1).squeeze(1)
        is_greedy = torch.tensor([s is None for s in samplings], device=logits.device)
        return torch.where(is_greedy, logits.argmax(-1), drawn)

    def warp_rows(self, logits: torch.Tensor, samplings: Sequence[Sampling | None]) -> torch.Tensor:
        """`(B, vocab)` float32 scores to draw from: each row after `generate`'s temperature, top-k and
        top-p warpers with its own settings (a greedy row's are left whole)."""
        self.check_sampling()
        device = logits.device
        temperatures = torch.tensor([1.0 if s is None else s.temperature for s in samplings], device=device)
        scores = logits.float() / temperatures.unsqueeze(1)
        if self.top_k != 0:
            kth_best = torch.topk(scores, min(self.top_k, scores.shape[-1]))[0][:, -1:]
            scores = scores.masked_fill(scores < kth_best, -torch.inf)
        cut = torch.tensor([0.0 if s is None else 1 - s.top_p for s in samplings], device=device)
        ascending, order = torch.sort(scores)
        below = ascending.softmax(-1).cumsum(-1) <= cut.unsqueeze(1)  # the least likely tokens, up to 1 - top_p
        below[:, -1] = False  # the most likely token always stays
        return scores.masked_fill(below.scatter(1, order, below), -torch.inf)

    def _chooser(self, sampling: Sampling | None) -> Callable[[torch.Tensor], torch.Tensor]:
        """`(B, vocab)` logits -> `(B,)` next tokens: the argmax, or a draw after `generate`'s warpers
        (each only where `generate` would add it)."""
        if sampling is None:
            return lambda logits: logits.argmax(-1)
        self.check_sampling()
        top_k = self.top_k
        warpers = LogitsProcessorList()
        if sampling.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(sampling.temperature))
        if top_k != 0:
            warpers.append(TopKLogitsWarper(top_k))
        if sampling.top_p < 1.0:
            warpers.append(TopPLogitsWarper(sampling.top_p))

        def draw(logits: torch.Tensor) -> torch.Tensor:
            scores = warpers(None, logits.float())  # these warpers do not read the tokens so far
            return torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)

        return draw

    @staticmethod
    def _write_prefix(cache: StaticCache, prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy each layer's prefix keys and values into the first positions of the static cache."""
        for static, (keys, values) in zip(cache.layers, prefix, strict=True):
            if type(static) is not StaticLayer:
                raise ValueError(f"a shared prompt prefix needs full-attention layers, not {type(static).__name__}")
            if not static.is_initialized:
                static.lazy_initialization(keys, values)
            static.keys[:, :, : keys.shape[2]].copy_(keys)
            static.values[:, :, : values.shape[2]].copy_(values)
            static.cumulative_length.fill_(keys.shape[2])


def static_cache(config, length: int) -> StaticCache:
    """A static cache of `length` positions. A sliding-window layer whose window holds them all (Mistral's
    4,096 positions, LLaVA-Med's LM) attends to every position as a full-attention layer does, so it is
    made one: a shared prompt prefix and a joining request are written into full-attention layers."""
    cache = StaticCache(config=config, max_cache_len=length)
    cache.layers = [
        StaticLayer(max_cache_len=length)
        if type(layer) is StaticSlidingWindowLayer and layer.max_cache_len == length  # its window >= length
        else layer
        for layer in cache.layers
    ]
    return cache


@dataclass(frozen=True)
class TokenLogprobs:
    """A chosen token's log-probability, and the `(token id, log-probability)` of the most likely ones."""

    logprob: float
    top: list[tuple[int, float]]


class RunningBatch:
    """Rows decoding together in one static cache, where a prompt may take a free row between two steps
    (a server's continuous batching): an answer leaves its row as soon as it ends, and a request that
    comes while others decode starts at the next step instead of after them.

    Each prompt is prefilled alone and its keys and values are copied into its row so that they end at
    the cache's write position. Rows keep their own positions (RoPE), so prompts of any length share one
    write position; a prompt longer than that position moves it forward for every row, and the rows
    already there mask the positions skipped. A free row attends to one position, so its unused output
    stays finite. The step keeps its shapes until `grow` adds rows: compiled, one graph serves the batch.
    Each row is greedy or sampled with the settings its prompt joined with (`StaticCacheDecoder.choose_rows`),
    and may ask for the log-probabilities of its tokens (`TokenLogprobs`).
    """

    @torch.inference_mode()
    def __init__(self, decoder: StaticCacheDecoder, rows: int, length: int):
        self.decoder = decoder
        self.cache = decoder._empty_cache(rows, length)
        self.length = decoder.cache_shape[1]
        device = decoder.language_model.device
        self.mask = torch.zeros(rows, self.length, dtype=torch.long, device=device)
        self.mask[:, 0] = 1
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.logits = torch.zeros(rows, decoder.language_model.config.vocab_size, device=device)
        self.eos = torch.tensor(decoder.eos, dtype=torch.long, device=device)
        self.budget = [0] * rows  # new tokens each row may still emit; 0: the row is free
        self.sampling: list[Sampling | None] = [None] * rows  # each row's; None: greedy
        self.top_logprobs: list[int | None] = [None] * rows  # each row's; None: no log-probabilities
        self.logprobs: dict[int, TokenLogprobs] = {}  # the last step's, for the rows that asked
        self.written = 0  # the cache's write position

    @property
    def free_rows(self) -> list[int]:
        return [row for row, budget in enumerate(self.budget) if budget == 0]

    @property
    def active(self) -> bool:
        return any(self.budget)

    def fits(self, prompt_lengths: Sequence[int], max_new_tokens: Sequence[int]) -> bool:
        """Whether these prompts can join now, together, without leaving any of them or a running row
        short of cache."""
        start = max([self.written, *prompt_lengths])
        needed = max([*max_new_tokens, *self.budget])
        return len(prompt_lengths) <= len(self.free_rows) and start + needed <= self.length

    @torch.inference_mode()
    def join(
        self,
        inputs_embeds: torch.Tensor,
        max_new_tokens: int,
        sampling: Sampling | None = None,
        top_logprobs: int | None = None,
    ) -> int:
        """Prefill one `(1, T, D)` prompt into a free row, which is returned; its first token comes with the
        next `step`, greedy or drawn with `sampling`. With `top_logprobs` (0 or more), every step also
        gives the row's token's log-probability and those of its `top_logprobs` most likely tokens."""
        length = inputs_embeds.shape[1]
        if not self.fits([length], [max_new_tokens]):
            raise ValueError(f"a prompt of {length} positions and {max_new_tokens} new tokens does not fit now")
        row, start = self.free_rows[0], max(self.written, length)
        model = self.decoder.language_model
        alone = DynamicCache(config=model.config)
        positions = torch.arange(length, device=inputs_embeds.device)[None]
        output = model(
            inputs_embeds=inputs_embeds, position_ids=positions, cache=alone, use_cache=True, logits_to_keep=1
        )
        rows = len(self.budget)
        for static, layer in zip(self.cache.layers, alone.layers, strict=True):
            if type(static) is not StaticLayer:
                raise ValueError(f"joining a running batch needs full-attention layers, not {type(static).__name__}")
            if not static.is_initialized:
                static.lazy_initialization(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1))
            static.keys[row, :, start - length : start] = layer.keys[0]
            static.values[row, :, start - length : start] = layer.values[0]
            static.cumulative_length.fill_(start)
        self.written = start
        self.mask[row] = 0
        self.mask[row, start - length : start] = 1
        self.positions[row] = length - 1
        self.logits[row] = output.logits[0, -1]
        self.budget[row] = max_new_tokens
        self.sampling[row] = sampling
        self.top_logprobs[row] = top_logprobs
        return row

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """Each row's next token, `(rows,)` (padding for free rows), and `logprobs` for the running rows that
        asked. A row that emits EOS or its last allowed token becomes free; the others' tokens are fed to
        the LM for the next step."""
        decoder = self.decoder
        self.logits[:, decoder.suppressed] = -torch.inf
        running = torch.tensor([budget > 0 for budget in self.budget], device=self.mask.device)
        # a free row's token is padding: it takes a running row's settings, so that one setting stays one
        filler = next((s for s, budget in zip(self.sampling, self.budget, strict=True) if budget), None)
        samplings = [s if budget else filler for s, budget in zip(self.sampling, self.budget, strict=True)]
        token = decoder.choose_rows(self.logits, samplings).masked_fill(~running, decoder.pad)
        self.logprobs = self._logprobs(token)
        ended = torch.isin(token, self.eos).tolist()
        self.budget = [0 if end else max(budget - 1, 0) for budget, end in zip(self.budget, ended, strict=True)]
        if self.active:
            running = torch.tensor([budget > 0 for budget in self.budget], device=self.mask.device)
            self.mask[running, self.written] = 1
            self.positions[running] += 1
            # copied out: a CUDA graph's output is overwritten by its next replay, and `join` writes rows here
            self.logits.copy_(decoder.step(token[:, None], self.positions, self.mask, self.cache))
            self.written += 1
        return token

    def _logprobs(self, token: torch.Tensor) -> dict[int, TokenLogprobs]:
        """The chosen tokens' log-probabilities and the most likely alternatives, for the running rows that
        asked: from the model's distribution after the suppressed tokens, before any temperature or top-p
        (as vLLM and OpenAI report them), so that they measure the model whatever it was sampled with."""
        rows = [row for row, k in enumerate(self.top_logprobs) if k is not None and self.budget[row]]
        if not rows:
            return {}
        log_p = torch.log_softmax(self.logits[rows].float(), dim=-1)  # (len(rows), vocab)
        chosen = log_p.gather(1, token[rows, None])[:, 0].tolist()
        top_values, top_ids = log_p.topk(max(self.top_logprobs[row] for row in rows), dim=-1)
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
        return {
            row: TokenLogprobs(chosen[i], list(zip(top_ids[i], top_values[i], strict=True))[: self.top_logprobs[row]])
            for i, row in enumerate(rows)
        }

    @torch.inference_mode()
    def grow(self, rows: int) -> None:
        """Take `rows` rows in all, the new ones free: the cache is copied into a larger one, so a batch
        that started small takes the prompts that came later without waiting for a row to end."""
        old_rows = len(self.budget)
        if rows <= old_rows:
            return
        old = self.cache
        self.cache = self.decoder._empty_cache(rows, self.length)
        for source, target in zip(old.layers, self.cache.layers, strict=True):
            if source.is_initialized:
                target.lazy_initialization(
                    source.keys[:1].expand(rows, -1, -1, -1), source.values[:1].expand(rows, -1, -1, -1)
                )
                target.keys[:old_rows] = source.keys
                target.values[:old_rows] = source.values
                target.cumulative_length.fill_(self.written)
        new = rows - old_rows
        self.mask = torch.cat([self.mask, torch.zeros_like(self.mask[:1]).expand(new, -1)])
        self.mask[old_rows:, 0] = 1
        self.positions = torch.cat([self.positions, torch.zeros_like(self.positions[:1]).expand(new, -1)])
        self.logits = torch.cat([self.logits, torch.zeros_like(self.logits[:1]).expand(new, -1)])
        self.budget += [0] * new
        self.sampling += [None] * new
        self.top_logprobs += [None] * new

    def stop(self, rows: list[int]) -> None:
        """End these rows now (a stop string, a cancelled request); they are free for the next prompt."""
        for row in rows:
            self.budget[row] = 0
