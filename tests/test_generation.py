"""The static-cache decoder gives HF `generate`'s tokens: greedy with left padding, EOS, suppressed tokens,
`min_new_tokens`, a shared prompt prefix and its compiled step, and sampled under the same seed."""

import pytest
import torch
from transformers import DynamicCache

from llama3med import Llama3MedForConditionalGeneration
from llama3med.generation import GROUPED_DECODE_SDPA, RunningBatch, Sampling, StaticCacheDecoder
from llama3med.inference import compile_model, static_cache_decoder
from llama3med.processing import pad_sequences


def make_model(config):
    torch.manual_seed(0)
    model = Llama3MedForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture()
def model(tiny_config):
    return make_model(tiny_config)


@pytest.fixture(params=["llama", "mistral"])
def lm_config(request, tiny_config):
    """The tiny config with a Llama LM, or with a Mistral one (LLaVA-Med's), whose layers attend within a
    4,096-position sliding window: wider than any prompt here, so the answers are full attention's."""
    if request.param == "llama":
        return tiny_config
    text = {**tiny_config.text_config.to_dict(), "model_type": "mistral", "sliding_window": 4096}
    return type(tiny_config)(**{**tiny_config.to_dict(), "text_config": text})


def prompts(config, lengths=((2, 5), (4, 1), (3, 3)), seed=1):
    """Left-padded prompts, each `before` tokens, one image, `after` tokens; and their pixels."""
    generator = torch.Generator().manual_seed(seed)
    ordinary = (config.image_token_id + 1, config.text_config.vocab_size)
    image = [config.image_token_id] * config.num_image_tokens
    rows = [
        torch.randint(*ordinary, (before,), generator=generator).tolist()
        + image
        + torch.randint(*ordinary, (after,), generator=generator).tolist()
        for before, after in lengths
    ]
    input_ids, attention_mask = pad_sequences(rows, 0, "left")
    pixel_values = torch.randn(len(rows), 3, config.max_image_size, config.max_image_size, generator=generator)
    return input_ids, attention_mask, pixel_values


def hf_generate(model, input_ids, attention_mask, pixel_values, new_tokens, **settings):
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            max_new_tokens=new_tokens,
            **{"do_sample": False, **settings},
        )
    return output[:, input_ids.shape[1] :]


def decode(model, input_ids, attention_mask, pixel_values, new_tokens, decoder=None, **settings):
    decoder = decoder or StaticCacheDecoder(model.language_model, model.generation_config)
    with torch.inference_mode():
        embeds = model.embed_inputs(input_ids, model.encode_images(pixel_values))
    return decoder(embeds, attention_mask, new_tokens, **settings)


def test_left_padded_prompts_get_the_tokens_of_greedy_generate(tiny_config, model):
    inputs = prompts(tiny_config)
    assert torch.equal(decode(model, *inputs, 8), hf_generate(model, *inputs, 8))


def test_eos_ends_a_row_and_pads_it_and_suppressed_tokens_are_never_chosen(tiny_config, model):
    inputs = prompts(tiny_config)
    free = hf_generate(model, *inputs, 8)
    model.generation_config.eos_token_id = [int(free[0, 2])]  # row 0 now stops at its third token
    model.generation_config.suppress_tokens = [int(free[1, 0])]  # and row 1 cannot start as it did
    ours, reference = decode(model, *inputs, 8), hf_generate(model, *inputs, 8)
    assert torch.equal(ours, reference)
    assert int(ours[0, 2]) == int(free[0, 2]) and (ours[0, 3:] == 0).all()
    assert int(free[1, 0]) not in ours[1].tolist()
    early = decode(model, *inputs, 8, min_new_tokens=4)
    assert torch.equal(early, hf_generate(model, *inputs, 8, min_new_tokens=4))
    assert int(free[0, 2]) not in early[0, :4].tolist()


def test_all_rows_finished_ends_decoding_early(tiny_config, model):
    inputs = prompts(tiny_config, lengths=((2, 2),))
    first = hf_generate(model, *inputs, 1)
    model.generation_config.eos_token_id = [int(first[0, 0])]
    assert decode(model, *inputs, 8).tolist() == [[int(first[0, 0])]]


def test_a_shared_prefix_cache_gives_the_same_tokens_as_the_whole_prompt(lm_config):
    """As `eval` asks: every row starts with the same text and an image (rows 0 and 2 the same image), its
    own question follows, left-padded after the prefix. The prefix is run once per image and repeated."""
    tiny_config, model = lm_config, make_model(lm_config)
    generator = torch.Generator().manual_seed(2)
    ordinary = (tiny_config.image_token_id + 1, tiny_config.text_config.vocab_size)
    image = [tiny_config.image_token_id] * tiny_config.num_image_tokens
    start = torch.randint(*ordinary, (2,), generator=generator).tolist() + image
    questions = [torch.randint(*ordinary, (n,), generator=generator).tolist() for n in (5, 1, 3)]
    question_ids, question_mask = pad_sequences(questions, 0, "left")
    input_ids = torch.cat([torch.tensor([start] * 3), question_ids], dim=1)
    attention_mask = torch.cat([torch.ones(3, len(start), dtype=torch.long), question_mask], dim=1)
    pixel_values = torch.randn(3, 3, tiny_config.max_image_size, tiny_config.max_image_size, generator=generator)
    pixel_values[2] = pixel_values[0]
    whole = decode(model, input_ids, attention_mask, pixel_values, 6)
    assert torch.equal(whole, hf_generate(model, input_ids, attention_mask, pixel_values, 6))
    with torch.inference_mode():
        prefix_embeds = model.embed_inputs(input_ids[:2, : len(start)], model.encode_images(pixel_values[:2]))
        prefix = DynamicCache(config=tiny_config.text_config)
        model.language_model(inputs_embeds=prefix_embeds, cache=prefix)
        prefix.reorder_cache(torch.tensor([0, 1, 0]))
        question_embeds = model.embed_inputs(question_ids, None)
    decoder = StaticCacheDecoder(model.language_model, model.generation_config)
    layers = [(layer.keys, layer.values) for layer in prefix.layers]
    assert torch.equal(decoder(question_embeds, attention_mask, 6, prefix=layers), whole)


def test_the_compiled_step_gives_the_same_tokens_and_is_reused_across_calls(tiny_config, model):
    inputs = prompts(tiny_config)
    reference = hf_generate(model, *inputs, 6)
    decoder = StaticCacheDecoder(model.language_model, model.generation_config)
    decoder.compile()
    assert model.language_model.config._attn_implementation == GROUPED_DECODE_SDPA  # 4 query heads on 2 kv heads
    assert torch.equal(decode(model, *inputs, 6, decoder=decoder), reference)
    cache = decoder.cache
    assert torch.equal(decode(model, *inputs, 6, decoder=decoder), reference)
    assert decoder.cache is cache  # same shape bucket: the same static cache, so no new compile


def test_compiled_as_eval_compiles_it_the_step_stays_right_when_batch_shapes_alternate(tiny_config, model):
    """An evaluation's last batch is smaller, and the next pass's first batch full again: each call must
    decode into the cache it was given. `compile_model` also compiles the tower with weights frozen into
    its graph, which must not freeze the step's cache into its graph."""
    compile_model(model)
    decoder = static_cache_decoder(model)
    for seed in range(3):
        full, small = prompts(tiny_config, seed=seed), prompts(tiny_config, lengths=((1, 2), (3, 4)), seed=seed)
        for inputs in (full, small):
            assert torch.equal(decode(model, *inputs, 5, decoder=decoder), hf_generate(model, *inputs, 5))


def test_logits_processors_it_does_not_apply_are_refused_by_name(model):
    model.generation_config.repetition_penalty = 1.3
    with pytest.raises(ValueError, match="repetition_penalty=1.3"):
        StaticCacheDecoder(model.language_model, model.generation_config)


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9), (1.5, 0.5)])
def test_sampling_draws_the_tokens_of_sampling_generate_under_the_same_seed(tiny_config, model, temperature, top_p):
    inputs = prompts(tiny_config)
    model.generation_config.eos_token_id = [7]
    sampled = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        reference = hf_generate(model, *inputs, 8, do_sample=True, temperature=temperature, top_p=top_p)
        torch.manual_seed(seed)
        ours = decode(model, *inputs, 8, sampling=Sampling(temperature=temperature, top_p=top_p))
        assert torch.equal(ours, reference)
        sampled.append(ours)
    assert not torch.equal(*sampled)  # the seed matters: these are draws, not the argmax
    assert not torch.equal(sampled[0], decode(model, *inputs, 8))


def test_sampling_keeps_to_the_configs_top_k_and_refuses_warpers_it_does_not_apply(tiny_config, model):
    inputs = prompts(tiny_config)
    model.generation_config.top_k = 1  # only the most likely token survives: sampling becomes greedy
    assert torch.equal(decode(model, *inputs, 8, sampling=Sampling(temperature=1.3)), decode(model, *inputs, 8))
    model.generation_config.min_p = 0.1
    with pytest.raises(ValueError, match="min_p=0.1"):
        decode(model, *inputs, 8, sampling=Sampling())


def prompts_decoded_alone(config, model, shapes):
    """One prompt per `((before, after), new_tokens)`: its embeddings, and the tokens it gets decoded alone."""
    embeds, alone = [], []
    for seed, (lengths, new_tokens) in enumerate(shapes):
        input_ids, attention_mask, pixel_values = prompts(config, lengths=(lengths,), seed=seed)
        with torch.inference_mode():
            embeds.append(model.embed_inputs(input_ids, model.encode_images(pixel_values)))
        alone.append(decode(model, input_ids, attention_mask, pixel_values, new_tokens)[0].tolist())
    return embeds, alone


def step_into(batch, rows, got):
    """One step of `batch`; each running row's token goes to its prompt's list (`rows`: row -> prompt)."""
    running = {row: prompt for row, prompt in rows.items() if batch.budget[row]}
    tokens = batch.step().tolist()
    for row, prompt in running.items():
        got[prompt].append(tokens[row])


@pytest.mark.parametrize("compiled", [False, True])
def test_prompts_that_join_a_running_batch_get_the_tokens_they_get_alone(lm_config, compiled):
    """As `serve` batches: two rows, four prompts. The second ends first and the third, longer than the
    write position so far, takes its row (moving the position forward); the fourth waits for a free row."""
    tiny_config, model = lm_config, make_model(lm_config)
    shapes = [((2, 5), 7), ((4, 1), 2), ((9, 9), 4), ((1, 2), 3)]  # (text before, after the image), new tokens
    embeds, alone = prompts_decoded_alone(tiny_config, model, shapes)
    decoder = StaticCacheDecoder(model.language_model, model.generation_config)
    if compiled:
        decoder.compile()
    batch = RunningBatch(decoder, rows=2, length=128)
    waiting, rows, got, jumps = list(range(len(shapes))), {}, [[] for _ in shapes], []
    while waiting or batch.active:
        while waiting and batch.fits([embeds[waiting[0]].shape[1]], [shapes[waiting[0]][1]]):
            before = batch.written
            rows[batch.join(embeds[waiting[0]], shapes[waiting[0]][1])] = waiting[0]
            jumps.append(batch.written > before > 0)
            waiting.pop(0)
        step_into(batch, rows, got)
    assert got == alone
    assert jumps == [False, False, True, False]  # the third prompt moved the write position forward


def test_a_running_batch_grows_rows_for_prompts_that_come_later(tiny_config, model):
    shapes = [((2, 5), 8), ((4, 1), 4), ((9, 2), 3)]
    embeds, alone = prompts_decoded_alone(tiny_config, model, shapes)
    batch = RunningBatch(StaticCacheDecoder(model.language_model, model.generation_config), rows=1, length=128)
    got = [[] for _ in shapes]
    rows = {batch.join(embeds[0], shapes[0][1]): 0}
    for step in range(8):
        if step == 3:
            assert not batch.free_rows
            batch.grow(3)
            rows |= {batch.join(embeds[i], shapes[i][1]): i for i in (1, 2)}
        step_into(batch, rows, got)
    assert got == alone and not batch.active


def test_a_prompt_that_would_outrun_the_cache_does_not_fit(tiny_config, model):
    input_ids, attention_mask, pixel_values = prompts(tiny_config, lengths=((2, 2),))
    with torch.inference_mode():
        embeds = model.embed_inputs(input_ids, model.encode_images(pixel_values))
    batch = RunningBatch(StaticCacheDecoder(model.language_model, model.generation_config), rows=2, length=128)
    room = 128 - embeds.shape[1]
    assert not batch.fits([embeds.shape[1]], [room + 1]) and batch.fits([embeds.shape[1]], [room])
    batch.join(embeds, room)
    assert batch.fits([1], [1]) and not batch.fits([1, 1], [1, 1])  # one row free, not two
    longer = embeds.shape[1] + 1  # would move the write position on, past the running row's room
    assert not batch.fits([longer], [1])
    with pytest.raises(ValueError, match="does not fit"):
        batch.join(torch.cat([embeds, embeds[:, :1]], dim=1), 1)


def hf_warped(model, logits, sampling):
    """`generate`'s own warpers for one setting (the static-cache decoder's uniform path)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    top_k = model.generation_config.top_k or 50
    warpers = [TemperatureLogitsWarper(sampling.temperature), TopKLogitsWarper(top_k)]
    return LogitsProcessorList([*warpers, TopPLogitsWarper(sampling.top_p)])(None, logits.float())


def test_rows_with_their_own_sampling_settings_are_warped_as_generate_warps_each_alone(model):
    decoder = StaticCacheDecoder(model.language_model, model.generation_config)
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0)) * 3
    samplings = [Sampling(0.7, 0.9), None, Sampling(1.5, 0.5), Sampling(1.0, 1.0)]
    warped = decoder.warp_rows(logits, samplings)
    for row, sampling in enumerate(samplings):
        if sampling is not None:
            alone = hf_warped(model, logits[row : row + 1], sampling)[0]
            assert torch.equal(torch.isinf(warped[row]), torch.isinf(alone))  # the same tokens are cut
            torch.testing.assert_close(warped[row].softmax(-1), alone.softmax(-1))
    torch.manual_seed(0)
    tokens = decoder.choose_rows(logits, samplings)
    assert tokens[1] == logits[1].argmax() and not torch.isinf(warped[[0, 2, 3], tokens[[0, 2, 3]]]).any()


def test_a_greedy_prompt_sharing_a_running_batch_with_sampled_ones_gets_its_greedy_tokens(tiny_config, model):
    shapes = [((2, 5), 8), ((4, 1), 8), ((3, 3), 8)]
    embeds, alone = prompts_decoded_alone(tiny_config, model, shapes)
    batch = RunningBatch(StaticCacheDecoder(model.language_model, model.generation_config), rows=3, length=128)
    settings = [Sampling(1.5, 0.9), None, Sampling(1.0, 1.0)]
    rows = {batch.join(embeds[i], shapes[i][1], settings[i]): i for i in range(3)}
    got = [[] for _ in shapes]
    torch.manual_seed(0)
    while batch.active:
        step_into(batch, rows, got)
    assert got[1] == alone[1]
    assert got[0] != alone[0] and got[2] != alone[2]  # the others drew
