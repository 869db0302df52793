"""Zero-shot VQA runs: batched greedy answers, appended to `answers.jsonl` as they come so an interrupted
run resumes where it stopped.

Questions about one image share its work: the image is encoded once, and the prompt up to its last image
token (the chat template's start and the image tokens, most of a short VQA prompt) goes through the LM
once per image, even when its questions fall into two batches; each question's own tokens continue from
that cached prefix. Multiple-choice questions may instead be answered by ranking their options
(`rank_options`), each option's tokens scored after the same prefix.

The answers file has LLaVA-Med's fields (`question_id`, `prompt`, `text`, `answer_id`, `model_id`) and,
once a run is complete, the benchmark's question order, so its own evaluator (which asserts that order)
reads it too. Under torchrun each process answers its share of the images into `answers.partN.jsonl`;
`merge_answers` folds the parts into `answers.jsonl`.
"""

from __future__ import annotations

import functools
import itertools
import json
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache

from ..data.benchmarks import OPTION_LETTERS, VQARecord, prompt_text
from ..data.conversations import read_appended_rows, repair_appended_rows, write_atomically
from ..generation import Sampling
from ..inference import question_messages, static_cache_decoder, yes_no_tokens, yes_probability
from ..model import Llama3MedForConditionalGeneration
from ..processing import IGNORE_INDEX, Llama3MedProcessor, pad_sequences
from .scoring import picked_option


def answer_row(
    record: VQARecord,
    prompt: str,
    text: str,
    model_id: str,
    p_yes: float | None = None,
    option_log_probs: list[float] | None = None,
) -> dict:
    """A line of `answers.jsonl`, in LLaVA-Med's answer format; `metadata` holds llama3med's `p_yes`
    and, for a ranked multiple-choice question, each option's `option_log_probs`."""
    metadata = {} if p_yes is None else {"p_yes": p_yes}
    if option_log_probs is not None:
        metadata["option_log_probs"] = option_log_probs
    return {
        "question_id": record.id,
        "prompt": prompt,
        "text": text,
        "answer_id": uuid.uuid4().hex,
        "model_id": model_id,
        "metadata": metadata,
    }


def read_answers(path: Path) -> dict[str, dict]:
    """Answers already written, by question id; a line cut by a crash is ignored."""
    return {str(row["question_id"]): row for row in read_appended_rows(path)}


def answer_texts(rows: Mapping[str, dict]) -> dict[str, str]:
    """The text of each answer row (`read_answers`, `merge_answers`), by question id."""
    return {qid: row["text"] for qid, row in rows.items()}


def option_log_probs(rows: Mapping[str, dict]) -> dict[str, list[float]]:
    """Each ranked answer's options' log-probabilities (`metadata.option_log_probs`), by question id."""
    metadata = {qid: row.get("metadata") or {} for qid, row in rows.items()}
    return {qid: given["option_log_probs"] for qid, given in metadata.items() if given.get("option_log_probs")}


def yes_probabilities(rows: Mapping[str, dict]) -> dict[str, float]:
    """The P(yes) each answer row carries (`metadata.p_yes`), by question id."""
    return {qid: row["metadata"]["p_yes"] for qid, row in rows.items() if "p_yes" in (row.get("metadata") or {})}


def answer_parts(answers_path: Path) -> list[Path]:
    """The per-process files of a sharded run beside `answers.jsonl`."""
    return sorted(answers_path.parent.glob(f"{answers_path.stem}.part*{answers_path.suffix}"))


def answered_ids(answers_path: Path) -> set[str]:
    """Question ids answered in `answers.jsonl` or in any part of a sharded run."""
    return {qid for path in (answers_path, *answer_parts(answers_path)) for qid in read_answers(path)}


# Settings a run records only when they are given (sampled decoding, a system message): absent from
# either run, they were not given to it.
SETTINGS_ONLY_WHEN_GIVEN = ("sampling", "system")


def check_run_settings(out: Path, settings: dict[str, object], made: str = "answers") -> None:
    """Keep a resumed run from mixing its answers with another model's, prompt's or precision's: the first
    run writes `settings.json` in `out`, and a later one with other settings is refused, naming each
    change, before it answers anything. Settings are compared as the file holds them (a tuple as a list).
    Other fields the saved file lacks (an older version's) are not checked."""
    path = out / "settings.json"
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        stored = json.loads(json.dumps(settings))
        keys = [*stored, *(key for key in SETTINGS_ONLY_WHEN_GIVEN if key in saved and key not in stored)]
        before = {
            key: saved.get(key) if key in SETTINGS_ONLY_WHEN_GIVEN else saved.get(key, stored[key]) for key in keys
        }
        changed = [f"{key} {before[key]!r} -> {stored.get(key)!r}" for key in keys if before[key] != stored.get(key)]
        if changed:
            raise ValueError(
                f"{out}: its {made} were made with other settings ({'; '.join(changed)}); "
                "resume with the same ones or choose another --out"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(settings, indent=1) + "\n")


def shard_by_image(records: Sequence[VQARecord], rank: int, world_size: int) -> list[VQARecord]:
    """Process `rank`'s share: whole images (so each is encoded once), dealt round-robin."""
    images = sorted({r.image_key for r in records})
    mine = set(images[rank::world_size])
    return [r for r in records if r.image_key in mine]


def unanswered_share(records: Sequence[VQARecord], answers_path: Path, rank: int, world_size: int) -> list[VQARecord]:
    """Process `rank`'s records still to answer: its deal of all the images, less what `answers.jsonl` or
    any part already holds. The deal is over all the records, not over the unanswered ones: the other
    processes are appending to their parts while this one reads them, and a deal over what is left would
    differ between processes and leave some images to none."""
    answered = answered_ids(answers_path)
    return [r for r in shard_by_image(records, rank, world_size) if r.id not in answered]


def merge_answers(answers_path: Path, records: Sequence[VQARecord]) -> dict[str, dict]:
    """Rewrite `answers.jsonl` with every answer (its own and the parts') in the benchmark's order, then
    delete the parts, and return its rows by question id. The new file replaces the old in one step, so a
    crash loses nothing."""
    rows: dict[str, dict] = {}
    for path in (answers_path, *answer_parts(answers_path)):
        rows.update(read_answers(path))
    missing = [r.id for r in records if r.id not in rows]
    if missing:
        raise ValueError(f"{answers_path}: {len(missing)} questions have no answer yet, e.g. {missing[:3]}")
    write_atomically(answers_path, "".join(json.dumps(rows[r.id]) + "\n" for r in records))
    for part in answer_parts(answers_path):
        part.unlink()
    return {r.id: rows[r.id] for r in records}


@torch.inference_mode()
def generate_answers(
    model: Llama3MedForConditionalGeneration,
    processor: Llama3MedProcessor,
    records: Sequence[VQARecord],
    prompt_style: str = "plain",
    batch_size: int = 16,
    max_new_tokens: int = 64,
    prefetch_images: bool | None = None,
    sampling: Sampling | None = None,
    seed: int = 0,
    system: str | None = None,
) -> Iterator[tuple[VQARecord, str, str, float | None]]:
    """Yield `(record, prompt, answer, p_yes)` in image order, `p_yes` being the model's probability of
    starting the answer with "yes" against "no" (`yes_probability`; None where the vocabulary has no
    token beginning either). Answers are greedy, or drawn with `sampling`: each batch's draws from a
    seed made of `seed` and its first question's id, so a batch asked again draws the same answers
    (as LLaVA-Med's `model_vqa` samples, at temperature 0.2). Records are sorted by image; an image's prompt
    prefix (its keys and values) is kept while the next batch still needs it. With `prefetch_images`
    (default: when the model is on an accelerator) the next batch's images are read and preprocessed on
    a thread while this batch runs. On a CPU the thread takes cores from the model: on 2 cores it cost
    13 % (52 against 60 questions/s). `system`: a system message before each question."""
    yes_no = yes_no_tokens(processor.tokenizer)
    batches = _prefixed_batches(
        model, processor, records, lambda r: prompt_text(r, prompt_style), batch_size, prefetch_images, system
    )
    for batch, prompts, questions, prefixes in batches:
        if sampling is not None:
            torch.manual_seed(zlib.crc32(f"{seed}:{batch[0].id}".encode()))
        texts, p_yes = _answer_batch(model, processor, questions, prefixes, max_new_tokens, yes_no, sampling)
        for record, prompt, text, p in zip(batch, prompts, texts, p_yes, strict=True):
            yield record, prompt, text.strip(), p


@torch.inference_mode()
def rank_options(
    model: Llama3MedForConditionalGeneration,
    processor: Llama3MedProcessor,
    records: Sequence[VQARecord],
    prompt_style: str = "plain",
    batch_size: int = 16,
    prefetch_images: bool | None = None,
    system: str | None = None,
) -> Iterator[tuple[VQARecord, str, str, list[float]]]:
    """Yield `(record, prompt, answer, log_probs)` for multiple-choice records, in image order: each
    option scored as the model's whole answer to the question asked without its options, `log P` of
    the option's tokens and the end of the turn (as training supervises an answer) after the image's
    cached prefix; the answer is the likeliest option, as "B. liver". Unlike reading a generated
    letter, this needs no model taught to answer with letters: it asks what the model would say.
    `system`: a system message before each question."""
    question_of = functools.partial(prompt_text, style=prompt_style, options=False)
    batches = _prefixed_batches(model, processor, records, question_of, batch_size, prefetch_images, system)
    for batch, prompts, _, prefixes in batches:
        rows = []  # (question's record index, the answer's tokens after the prefix, their labels)
        for index, record in enumerate(batch):
            prefix_length = prefixes[index][0][0].shape[1]  # the prompt's tokens up to its image's last
            messages = question_messages(question_of(record), system)
            for option in record.options:
                encoded = processor.encode_conversation([*messages, {"role": "assistant", "content": option}])
                rows.append((index, encoded["input_ids"][prefix_length:], encoded["labels"][prefix_length:]))
        scores: list[list[float]] = [[] for _ in batch]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            log_probs = _answer_log_probs(model, processor, [prefixes[i] for i, _, _ in chunk], chunk)
            for (index, _, _), log_p in zip(chunk, log_probs, strict=True):
                scores[index].append(log_p)
        for record, prompt, log_probs in zip(batch, prompts, scores, strict=True):
            picked = picked_option(record, log_probs)
            yield record, prompt, f"{OPTION_LETTERS[record.options.index(picked)]}. {picked}", log_probs


def _prefixed_batches(
    model: Llama3MedForConditionalGeneration,
    processor: Llama3MedProcessor,
    records: Sequence[VQARecord],
    question_of: Callable[[VQARecord], str],
    batch_size: int,
    prefetch_images: bool | None,
    system: str | None = None,
) -> Iterator[tuple[list[VQARecord], list[str], list[list[int]], list[list[tuple[torch.Tensor, torch.Tensor]]]]]:
    """The records sorted by image in batches, each with its prompts (`system` before each question),
    each question's own tokens (after the shared prefix) and each record's prefix keys and values, an
    image's kept while the next batch still needs it; with `prefetch_images` the next batch's images are
    preprocessed on a thread."""
    ordered = sorted(records, key=lambda r: r.image_key)
    batches = [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]
    if prefetch_images is None:
        prefetch_images = model.device.type != "cpu"
    prefixes: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    loading: dict[str, Future] = {}
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-loader") if prefetch_images else None
    with loader or nullcontext():
        for index, batch in enumerate(batches):
            if loader is not None and index + 1 < len(batches):
                _start_loading(loader, loading, processor, batch, batches[index + 1])
            prompts = [processor.chat_prompt(question_messages(question_of(r), system)) for r in batch]
            token_ids = [processor.encode_text(p, num_images=1) for p in prompts]
            prefix_ids = shared_prefix(token_ids, model.config.image_token_id)
            images = {r.image_key: r for r in batch}  # one record per image: its file and frame
            prefixes = {key: prefixes[key] for key in images if key in prefixes}
            new = [key for key in images if key not in prefixes]
            if new:
                pixels = torch.stack([_pixels(processor, loading, images[key]) for key in new]).to(model.device)
                prefixes.update(zip(new, prefix_caches(model, prefix_ids, pixels), strict=True))
            questions = [ids[len(prefix_ids) :] for ids in token_ids]
            yield batch, prompts, questions, [prefixes[r.image_key] for r in batch]


def _start_loading(
    loader: ThreadPoolExecutor,
    loading: dict[str, Future],
    processor: Llama3MedProcessor,
    batch: Sequence[VQARecord],
    next_batch: Sequence[VQARecord],
) -> None:
    """Submit the images `next_batch` needs that `batch` does not already hold."""
    held = {r.image_key for r in batch}
    for record in next_batch:
        if record.image_key not in held and record.image_key not in loading:
            loading[record.image_key] = loader.submit(_preprocess, processor, record)


def _pixels(processor: Llama3MedProcessor, loading: dict[str, Future], record: VQARecord) -> torch.Tensor:
    """A record's image, preprocessed: from the loading thread where it was started there."""
    future = loading.pop(record.image_key, None)
    return future.result() if future is not None else _preprocess(processor, record)


def _preprocess(processor: Llama3MedProcessor, record: VQARecord) -> torch.Tensor:
    return processor.preprocess_image(record.image, window=record.window, frame=record.frame)


def shared_prefix(token_ids: list[list[int]], image_token_id: int) -> list[int]:
    """The prompts' common start, up to and with the image's last token (the chat template's start and the
    image: most of a short VQA prompt, and the same for every question about one image)."""
    length = max(i for i, t in enumerate(token_ids[0]) if t == image_token_id) + 1
    if any(ids[:length] != token_ids[0][:length] for ids in token_ids):
        raise ValueError("the prompts differ before their image tokens; the chat template must put the image first")
    return token_ids[0][:length]


def prefix_caches(
    model: Llama3MedForConditionalGeneration, prefix_ids: list[int], pixel_values: torch.Tensor
) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per image: the keys and values, layer by layer, of the prefix with that image, each `(H, P, D)`."""
    features = model.encode_images(pixel_values)  # (images, num_image_tokens, D)
    ids = torch.tensor([prefix_ids], device=model.device).expand(len(features), -1)
    cache = DynamicCache(config=model.config.text_config)
    model.language_model(inputs_embeds=model.embed_inputs(ids, features), cache=cache, use_cache=True, logits_to_keep=1)
    return [[(layer.keys[i], layer.values[i]) for layer in cache.layers] for i in range(len(features))]


def _answer_batch(
    model: Llama3MedForConditionalGeneration,
    processor: Llama3MedProcessor,
    questions: list[list[int]],
    prefixes: list[list[tuple[torch.Tensor, torch.Tensor]]],
    max_new_tokens: int,
    yes_no: tuple[list[int], list[int]],
    sampling: Sampling | None = None,
) -> tuple[list[str], list[float | None]]:
    """Answers to the questions' own tokens (greedy, or drawn with `sampling`), each after its row's
    cached prefix, and each one's P(yes) (from the `yes_no_tokens`, before any sampling). Left padding
    goes between prefix and question (positions come from the attention mask, so each question sees
    the positions it would have alone)."""
    device = model.device
    question_ids, question_mask = pad_sequences(questions, processor.tokenizer.pad_token_id, "left")
    prefix_length = prefixes[0][0][0].shape[1]
    attention_mask = torch.cat([torch.ones(len(questions), prefix_length, dtype=torch.long), question_mask], dim=1)
    prefix = _stacked(prefixes)
    question_embeds = model.embed_inputs(question_ids.to(device), None)
    first: list[torch.Tensor] = []
    new_tokens = static_cache_decoder(model)(
        question_embeds,
        attention_mask.to(device),
        max_new_tokens,
        prefix=prefix,
        sampling=sampling,
        on_first_logits=first.append,
    )
    return processor.batch_decode(new_tokens), yes_probability(first[0], *yes_no)


def _stacked(prefixes: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rows' prefix keys and values, layer by layer, as one batch: `(rows, H, P, D)` each."""
    return [
        (torch.stack([row[layer][0] for row in prefixes]), torch.stack([row[layer][1] for row in prefixes]))
        for layer in range(len(prefixes[0]))
    ]


def _answer_log_probs(
    model: Llama3MedForConditionalGeneration,
    processor: Llama3MedProcessor,
    prefixes: list[list[tuple[torch.Tensor, torch.Tensor]]],
    rows: list[tuple[int, list[int], list[int]]],
) -> list[float]:
    """Per row, the summed log-probability of its labelled tokens, the row's tokens continuing its
    cached prefix. Right padding keeps every real token at the position it has alone."""
    device = model.device
    ids, mask = pad_sequences([tokens for _, tokens, _ in rows], processor.tokenizer.pad_token_id, "right")
    labels, _ = pad_sequences([labels for _, _, labels in rows], IGNORE_INDEX, "right")
    prefix_length = prefixes[0][0][0].shape[1]
    attention_mask = torch.cat([torch.ones(len(rows), prefix_length, dtype=torch.long), mask], dim=1)
    cache = DynamicCache(_stacked(prefixes), config=model.config.text_config)
    logits = model.language_model(
        inputs_embeds=model.embed_inputs(ids.to(device), None),
        attention_mask=attention_mask.to(device),
        cache=cache,
        use_cache=True,
    ).logits  # (rows, L, vocab): position t predicts token t + 1
    targets = labels[:, 1:].to(device)
    sums = []
    for row in range(len(rows)):
        kept = targets[row] != IGNORE_INDEX
        log_p = torch.log_softmax(logits[row, :-1][kept].float(), dim=-1)
        sums.append(float(log_p.gather(1, targets[row][kept, None]).sum()))
    return sums


def run(
    model: Llama3MedForConditionalGeneration,
    processor: Llama3MedProcessor,
    records: Sequence[VQARecord],
    answers_path: str | Path,
    model_id: str,
    prompt_style: str = "plain",
    batch_size: int = 16,
    max_new_tokens: int = 64,
    sampling: Sampling | None = None,
    seed: int = 0,
    rank_choices: bool = False,
    system: str | None = None,
) -> dict[str, str]:
    """Answer every record not yet in `answers_path`, appending line by line (greedy, or drawn with
    `sampling` and `seed`: see `generate_answers`; with `rank_choices`, multiple-choice questions by
    `rank_options`; `system` before each question); returns all answers."""
    answers_path = Path(answers_path)
    answers_path.parent.mkdir(parents=True, exist_ok=True)
    done = {str(row["question_id"]): row for row in repair_appended_rows(answers_path)}
    pending = [r for r in records if r.id not in done]
    ranked = [r for r in pending if rank_choices and r.options]
    generated = [r for r in pending if not (rank_choices and r.options)]
    with (
        answers_path.open("a", encoding="utf-8") as out,
        tqdm(total=len(records), initial=len(records) - len(pending), unit="q", desc="answering") as bar,
    ):
        rows = (
            answer_row(record, prompt, text, model_id, p_yes)
            for record, prompt, text, p_yes in generate_answers(
                model,
                processor,
                generated,
                prompt_style,
                batch_size,
                max_new_tokens,
                sampling=sampling,
                seed=seed,
                system=system,
            )
        )
        ranked_rows = (
            answer_row(record, prompt, text, model_id, option_log_probs=log_probs)
            for record, prompt, text, log_probs in rank_options(
                model, processor, ranked, prompt_style, batch_size, system=system
            )
        )
        for row in itertools.chain(rows, ranked_rows):
            out.write(json.dumps(row) + "\n")
            out.flush()
            done[row["question_id"]] = row
            bar.update()
    return {qid: row["text"] for qid, row in done.items()}
