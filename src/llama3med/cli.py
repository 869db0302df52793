"""`llama3med`: one command, one subcommand per job. Errors in the user's input end in one line."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

API_KEY_VARIABLE = "LLAMA3MED_API_KEY"  # `serve`'s key, kept out of the process list


def _scales(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"scales must be comma-separated integers, got {text!r}") from None


def _window(text: str):
    from .processing import parse_window

    try:
        return parse_window(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def cmd_build(args: argparse.Namespace) -> None:
    from .checkpoints import build, rescale, save
    from .model_card import write_model_card

    if args.source:
        if args.vision or args.llm or args.image_fit:
            raise ValueError(
                "--from takes the tower, the LM and the image fit from its model; leave out --vision, --llm and "
                "--image-fit"
            )
        model, processor = rescale(args.source, scales=args.scales, pyramid_resize=args.pyramid_resize)
        origin = (
            f"Made by `llama3med build --from` with the vision tower and the LM of `{args.source}`, encoding at "
            "new scales. Its projector is freshly initialised (its input width changes with the number of "
            "scales), so it answers nothing useful until at least the projector-alignment stage has run."
        )
        base_models = [args.source]
    elif args.vision and args.llm:
        given = {"pyramid_resize": args.pyramid_resize, "image_fit": args.image_fit}  # else build's defaults
        model, processor = build(
            args.vision,
            args.llm,
            scales=args.scales,
            vision_feature_layer=args.vision_feature_layer,
            projector_type=args.projector_type,
            **{name: value for name, value in given.items() if value is not None},
        )
        origin = (
            f"Assembled by `llama3med build` from the vision tower `{args.vision}` and the LM `{args.llm}`. Its "
            "projector is freshly initialised, so it answers nothing useful until the paper's two training stages "
            "(projector alignment on captions, then instruction tuning) have run."
        )
        base_models = [args.vision, args.llm]
    else:
        raise ValueError("build needs --vision and --llm, or --from MODEL_DIR")
    save(model, processor, args.out, max_shard_size=args.max_shard_size)
    write_model_card(args.out, model.config, origin, base_models=base_models)
    config = model.config
    print(
        f"built {args.out}: scales {config.scales}, {config.num_image_tokens} image tokens, "
        f"projector {config.image_feature_size} -> {config.text_config.hidden_size}"
    )


def _scales_said(scales: list[int]) -> str:
    return "at one scale" if len(scales) == 1 else "at the S2 scales " + "/".join(map(str, scales)) + " px"


def cmd_convert(args: argparse.Namespace) -> None:
    from .checkpoints import check_found, convert_llava, convert_original_llava, is_original_llava, save
    from .model_card import write_model_card
    from .processing.chat import LLAVA_CHAT_TEMPLATES

    check_found(args.llava, "checkpoint directory")
    if is_original_llava(args.llava):
        model, processor = convert_original_llava(args.llava, vision=args.vision, conv_mode=args.conv_mode)
        mode = next(m for m, t in LLAVA_CHAT_TEMPLATES.items() if t == processor.tokenizer.chat_template)
        origin = (
            f"Converted by `llama3med convert` from `{args.llava}`, a checkpoint of the original LLaVA code. It "
            f"computes what the original computes, {_scales_said(model.config.scales)}, and is prompted in "
            f"LLaVA's `{mode}` format."
        )
    elif args.vision or args.conv_mode:
        raise ValueError(f"{args.llava}: --vision and --conv-mode are for checkpoints of the original LLaVA code")
    else:
        model, processor = convert_llava(args.llava)
        origin = (
            f"Converted by `llama3med convert` from the transformers LLaVA checkpoint `{args.llava}`; at its one "
            "scale it computes the original's logits."
        )
    save(model, processor, args.out, max_shard_size=args.max_shard_size)
    write_model_card(args.out, model.config, origin, base_models=[args.llava])
    print(f"converted {args.llava} -> {args.out}")


def cmd_ask(args: argparse.Namespace) -> None:
    from .data.benchmarks import VQARecord, option_texts, prompt_text
    from .inference import ImageChat, question_messages
    from .processing import load_image

    question_messages(args.question, args.system)  # a bad question, image or output file fails before the model loads
    image = load_image(args.image, window=args.window, frame=args.frame)
    options = option_texts(args.option, "--option") if args.option else ()
    if args.heatmap:
        _check_image_output(args.heatmap, args.image, args.frame)
        _check_heat_map_options(args, "--heatmap")
    sampling_options = _seeded_sampling_options(args)
    if args.rank_options:
        _check_ranking_options(args, sampling_options)
    model, processor = _load_for_answering(_model_dir(args.model), _answering_device(args.device), args)
    shown = {"frame": args.frame, "window": args.window, "options": options}
    asked = VQARecord("ask", Path(args.image), args.question, "", "", "ask", **shown)
    if args.rank_options:
        _ask_ranking_options(model, processor, asked, args.heatmap, args.system)
        return
    chat = ImageChat(model, processor, image, system=args.system, p_yes=args.p_yes)
    text = chat.ask(prompt_text(asked, "plain"), max_new_tokens=args.max_new_tokens, **sampling_options)
    print(text)
    if args.p_yes:
        print(_p_yes_line(chat.p_yes))
    if args.heatmap:
        _save_heat_map(chat, args.heatmap, args.image, args.frame)


def _check_ranking_options(args: argparse.Namespace, sampling_options: dict) -> None:
    """`ask --rank-options` needs options, and scores them rather than writing an answer."""
    if not args.option:
        raise ValueError("--rank-options: give the answers to rank, each with --option")
    written = {"--p-yes": args.p_yes, "--temperature": sampling_options}
    if given := [flag for flag, value in written.items() if value]:
        raise ValueError(f"{', '.join(given)}: for a written answer; --rank-options scores the options instead")


def _ask_ranking_options(model, processor, asked, heat_map: str | None, system: str | None) -> None:
    """Print the likeliest option, then each option's probability among them ("P(lateral) 0.969"); with
    `heat_map`, where in the image the picked option came from. `system`: a system message before the
    question."""
    from .data.benchmarks import prompt_text
    from .eval.runner import rank_options
    from .eval.scoring import option_probabilities, picked_option
    from .explain import answer_relevance

    [(_, _, text, log_probs)] = rank_options(model, processor, [asked], system=system)
    print(text)
    for option, probability in zip(asked.options, option_probabilities(log_probs), strict=True):
        print(f"P({option}) {probability:.3f}")
    if heat_map:
        picked = picked_option(asked, log_probs)
        question = prompt_text(asked, "plain", options=False)
        explained = answer_relevance(model, processor, asked.image, question, picked, asked.window, asked.frame, system)
        _write_heat_map(heat_map, explained.heat_map(), asked.image, asked.frame, question, picked)


def _save_heat_map(chat, path: str, image: str, frame: int | None) -> None:
    """The heat map of `chat`'s last answer about `image` (shown at `frame`), to `path`."""
    from .explain import chat_relevance

    picture = chat_relevance(chat).heat_map()  # refuses a chat with no answer yet
    question, answer = (message["content"] for message in chat.messages[-2:])
    _write_heat_map(path, picture, image, frame, question, answer)


def _write_heat_map(path: str | Path, picture, image, frame: int | None, question: str, answer: str) -> None:
    """A heat map as the image file `path` names, or with a `.dcm` name as a DICOM Secondary Capture in
    the study of the DICOM image it explains (`dicom_export`), the question and answer in its comments."""
    from .data.conversations import write_atomically
    from .dicom_export import heat_map_comment, heat_map_dicom_bytes, shown_dicom

    if Path(path).suffix.lower() == ".dcm":
        comment = heat_map_comment(question, answer)
        write_atomically(Path(path), heat_map_dicom_bytes(picture, shown_dicom(image, frame), comment))
    else:
        picture.save(path)
    print(f"wrote {path}: where in the image the answer came from", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    from .inference import ImageChat
    from .processing import load_image

    image = load_image(args.image, window=args.window, frame=args.frame)  # a bad image fails before loading
    sampling_options = _seeded_sampling_options(args)
    model, processor = _load_for_answering(_model_dir(args.model), _answering_device(args.device), args)
    chat = ImageChat(model, processor, image, system=args.system, p_yes=args.p_yes)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        print(f"chatting about {args.image}; an empty line is skipped, Ctrl-D ends", file=sys.stderr)
        print(f"{HEAT_MAP_COMMAND} FILE.png draws where the last answer came from", file=sys.stderr)
    while True:
        try:
            question = input("you> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            break
        if not question.strip():
            continue
        command, *rest = question.split(maxsplit=1)
        if command == HEAT_MAP_COMMAND:
            _chat_heat_map(chat, rest[0].strip() if rest else "", args)
            continue
        if interactive:
            print("model> ", end="", flush=True)
        try:
            chat.ask(
                question,
                max_new_tokens=args.max_new_tokens,
                on_text=lambda text: print(text, end="", flush=True),
                **sampling_options,
            )
        except KeyboardInterrupt:  # stops this answer; the conversation goes on without the turn
            print(" [stopped]", flush=True)
            continue
        print(flush=True)
        if args.p_yes:
            print(_p_yes_line(chat.p_yes), flush=True)


def _chat_heat_map(chat, path: str, args: argparse.Namespace) -> None:
    """`chat`'s heat-map command: a mistake in it is said on stderr and the conversation goes on."""
    try:
        if not path:
            raise ValueError(f"{HEAT_MAP_COMMAND} needs a file name: {HEAT_MAP_COMMAND} FILE.png")
        _check_image_output(path, args.image, args.frame)
        _check_heat_map_options(args, HEAT_MAP_COMMAND)
        _save_heat_map(chat, path, args.image, args.frame)
    except (ValueError, OSError) as err:
        print(f"llama3med: error: {err}", file=sys.stderr, flush=True)


def _check_image_output(path: str, image: str, frame: int | None) -> None:
    """A heat map's file name: an image Pillow writes, or `.dcm` for a DICOM `image`, in a folder that exists."""
    from PIL import Image

    from .dicom_export import shown_dicom

    suffix = Path(path).suffix.lower()
    if suffix == ".dcm" and shown_dicom(image, frame) is None:
        raise ValueError(f"{path}: a DICOM heat map joins the study of a DICOM image, and {image} is not one")
    if suffix != ".dcm" and suffix not in Image.registered_extensions():
        raise ValueError(f"{path}: name an image file (.png, .jpg, .tif, ...) or .dcm (DICOM) for the heat map")
    if not Path(path).parent.is_dir():
        raise ValueError(f"{path}: no such folder {Path(path).parent}")


def _seeded_sampling_options(args: argparse.Namespace) -> dict[str, float]:
    """`ImageChat.ask`'s decoding options for `--temperature`, `--top-p` and `--seed`, torch's global
    generator seeded when sampling, so that the same command draws the same answers."""
    import torch

    sampling, seed = _sampling(args)
    if sampling is None:
        return {}
    torch.manual_seed(seed)
    return {"temperature": sampling.temperature, "top_p": sampling.top_p}


def _p_yes_line(p_yes: float | None) -> str:
    if p_yes is None:
        return "P(yes) n/a: no token of the model's vocabulary begins 'yes' or 'no'"
    return f"P(yes) {p_yes:.3f}"


def cmd_train(args: argparse.Namespace) -> None:
    from .train import load_recipe, train

    recipe = load_recipe(args.recipe, args.set)
    if args.strict:
        recipe.strict = True
    train(recipe, resume=args.resume)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # under torchrun: the Trainer started the group
        # torn down here, not by destructors at exit, where gloo's threads could abort a rank after a
        # finished run (seen once in CI: "terminate called without an active exception")
        dist.destroy_process_group()


def cmd_eval(args: argparse.Namespace) -> None:
    from .data.benchmarks import load_benchmark, without_options
    from .eval import choice_chance, closed_auroc, confidence_intervals, majority_baseline, score
    from .eval.report import comparison_rows, format_table, load_published, write_report
    from .eval.runner import answer_texts, check_run_settings, option_log_probs, yes_probabilities
    from .eval.scoring import choice_calibration
    from .inference import compile_model, peak_memory_gib

    _check_model_source_options(args)
    if args.heatmaps:
        _check_heat_map_options(args, "--heatmaps")
    elif args.heatmap_format != "png":
        raise ValueError("--heatmap-format: only with --heatmaps")
    records = load_benchmark(args.benchmark, args.data, args.split, args.image_root)
    if args.without_options:
        if args.rank_options:
            raise ValueError("--without-options and --rank-options: ranking needs the options")
        records = without_options(records)
    candidates, candidates_source = _candidate_answers(args, args.data, records)
    published = load_published(args.compare) if args.compare else None
    if args.limit:
        records = records[: args.limit]
    out = Path(args.out)
    inputs = {"benchmark": args.benchmark, "data": _resolved(args.data), "split": args.split}
    inputs["without_options"] = args.without_options
    if args.api_url:
        rows, settings = _answers_from_api(args, records, out, inputs)
        rank, world_size = 0, 1
        run_facts = {"model": settings["model"], "api_url": args.api_url}
    else:
        rank, world_size, device = _start_answering_processes(args)
        settings = _run_settings(args, device, **inputs)
        check_run_settings(out, settings)
        model, processor = _load_for_answering(args.model, device, args)
        if args.compile:
            compile_model(model)
        rows = _answer_in_processes(args, model, processor, records, out, rank, world_size)
        run_facts = {"model": str(args.model)}
        for key in ("dtype", "fp8", "load_4bit"):  # fp8, load_4bit: how the LM's linear layers were stored
            run_facts[key] = settings[key]
        if args.rank_options:
            run_facts["rank_options"] = True
        run_facts["peak_memory_gib"] = peak_memory_gib(device)  # rank 0's; the GPU's on a GPU
    if rank == 0:
        answers = answer_texts(rows)
        scores = score(records, answers, candidates=candidates)
        baseline = majority_baseline(records)
        report = {"benchmark": args.benchmark, **run_facts, "prompt": args.prompt, **_system_setting(args)}
        report["scores"] = scores
        if args.without_options:
            report["without_options"] = True
        if "sampling" in settings:  # else greedy
            report["sampling"] = settings["sampling"]
        report["majority_closed_baseline"] = baseline
        if chance := choice_chance(records):
            report["choice_chance"] = chance
        if scores["all"]["n_open"]:
            report["candidates"] = candidates_source
        report["intervals"] = confidence_intervals(records, answers)
        report["closed_auroc"] = closed_auroc(records, yes_probabilities(rows))
        if ranked := choice_calibration(records, option_log_probs(rows)):
            report["choice_calibration"] = ranked
        if published:
            report["published"] = published
        write_report(out, report)
        _write_answer_tables(records, rows, out)
        print(
            format_table(
                scores, baseline, report["intervals"], report["closed_auroc"], chance, report.get("choice_calibration")
            )
        )
        if published:
            print(f"\nbeside published results ({published['source']}):")
            print("\n".join("  ".join(row) for row in comparison_rows(report, published)))
        if args.heatmaps:  # why each answer, right or wrong, came out as it did
            _write_heat_maps(model, processor, records, out, args, args.heatmap_format == "dicom")
    _end_answering_processes(world_size)


def _answering_device(name: str | None):
    """The device `--device` names, checked to be on this machine; without it, the first GPU if there is
    one, else the CPU."""
    import torch

    from .inference import best_device

    if name is None:
        return best_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count or count == 0:
            raise ValueError(f"--device {name}: this machine has {count} CUDA GPU{'s' * (count != 1)}")
        torch.cuda.set_device(device)  # so that compiled graphs and memory figures are that GPU's
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: this machine has no Apple GPU (MPS)")
    return device


def _start_answering_processes(args: argparse.Namespace):
    """This process's rank, the number of processes and its device: one process, or one of torchrun's
    (each on its own GPU where there are GPUs, unless `--device cpu`), which answer whole images each and
    meet at the end."""
    import torch
    import torch.distributed as dist

    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and args.device not in (None, "cpu", "cuda"):
        raise ValueError(f"--device {args.device} under torchrun: each process takes its own GPU (LOCAL_RANK)")
    device = _answering_device(args.device)
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def _check_model_source_options(args: argparse.Namespace) -> None:
    """Refuse the options that do not apply to where the answers come from: a local --model's precision,
    compiling and batching with --api-url, the endpoint's options without it."""
    if args.api_url:
        local_only = {"--device": args.device, "--dtype": args.dtype, "--fp8": args.fp8, "--load-4bit": args.load_4bit}
        local_only.update({"--compile": args.compile, "--batch-size": args.batch_size})
        local_only["--rank-options"] = args.rank_options  # an endpoint gives no answer's likelihood
        given = [flag for flag, value in local_only.items() if value]
        if given:
            raise ValueError(f"{', '.join(given)}: for a local --model; the endpoint at --api-url decides its own")
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise ValueError(
                "--api-url runs in one process, not under torchrun; --concurrency sets how many ask at once"
            )
    else:
        given = [
            flag for flag, value in {"--api-model": args.api_model, "--concurrency": args.concurrency}.items() if value
        ]
        if given:
            raise ValueError(f"{', '.join(given)}: only with --api-url")


def _answers_from_api(
    args, records: list, out: Path, inputs: dict, own_images: bool = False
) -> tuple[dict[str, dict], dict[str, object]]:
    """Every answer row, in the records' order, from the endpoint `--api-url` names, and the run's settings
    (checked against those a resumed run began with). With `own_images` (the user's, not a public
    benchmark's) a public endpoint is named on stderr before anything is sent."""
    import urllib.parse

    from .data.web import is_public_host
    from .eval.api import ChatAPI, run_api
    from .eval.runner import check_run_settings, merge_answers

    host = urllib.parse.urlsplit(args.api_url).hostname or ""
    if own_images and is_public_host(host):
        print(
            f"llama3med: note: {host} is a public host and every image and question goes there; send patient data "
            "only where your data agreement allows",
            file=sys.stderr,
        )
    api = ChatAPI(args.api_url, args.api_model)
    settings = {
        "model": api.resolve_model(),
        "api_url": args.api_url,
        **inputs,
        "prompt": args.prompt,
        **_system_setting(args),
        "max_new_tokens": args.max_new_tokens,
        **_sampling_settings(args),
    }
    check_run_settings(out, settings)
    answers_path = out / "answers.jsonl"
    sampling, seed = _sampling(args)
    concurrency = args.concurrency or 8
    run_api(
        api,
        records,
        answers_path,
        args.prompt,
        args.max_new_tokens,
        concurrency,
        sampling=sampling,
        seed=seed,
        system=args.system,
    )
    return merge_answers(answers_path, records), settings


def _answer_in_processes(args, model, processor, records: list, out: Path, rank: int, world_size: int):
    """Answer what `out/answers.jsonl` lacks, this process's share of the images (in
    `answers.partN.jsonl` under torchrun); rank 0 then merges every answer into `answers.jsonl` in the
    records' order and returns them (the other ranks: None)."""
    import torch.distributed as dist

    from .eval.runner import merge_answers, run, unanswered_share

    answers_path = out / "answers.jsonl"
    sampling, seed = _sampling(args)
    run(
        model,
        processor,
        unanswered_share(records, answers_path, rank, world_size),
        answers_path if world_size == 1 else out / f"answers.part{rank}.jsonl",
        model_id=Path(args.model).name,
        prompt_style=args.prompt,
        batch_size=args.batch_size or 16,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        seed=seed,
        rank_choices=args.rank_options,
        system=args.system,
    )
    if world_size > 1:
        dist.barrier()
    return merge_answers(answers_path, records) if rank == 0 else None


def _end_answering_processes(world_size: int) -> None:
    """Under torchrun: wait for rank 0's last work, then tear the group down here rather than in
    destructors at exit."""
    import torch.distributed as dist

    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


def _candidate_answers(args: argparse.Namespace, data: str, records: list) -> tuple[list[str] | None, str]:
    """The candidate accuracy's answer set, and where it came from: `--candidates`, else the release's
    train split (as LLaVA-Med does), else the test set's own open answers."""
    from .data.benchmarks import load_candidate_answers, train_open_answers

    if args.candidates:
        return load_candidate_answers(args.candidates), f"file {args.candidates}"
    if answers := train_open_answers(args.benchmark, data, records, args.image_root):
        return answers, f"the train split's open answers ({len(set(answers))} distinct)"
    return None, "the test set's own open answers"


def cmd_answer(args: argparse.Namespace) -> None:
    from .data.benchmarks import folder_questions, load_questions
    from .eval.runner import check_run_settings
    from .inference import compile_model

    _check_model_source_options(args)
    if Path(args.questions).is_dir():
        if not args.question or args.image_root:
            raise ValueError(
                f"{args.questions} is a folder of images: give --question to ask about each (--image-root is for "
                "a questions file)"
            )
        records = folder_questions(args.questions, args.question, args.window, args.slice_step, args.option)
    elif args.question or args.slice_step or args.option:
        folder_only = {"--question": args.question, "--slice-step": args.slice_step, "--option": args.option}
        flags = ", ".join(flag for flag, value in folder_only.items() if value)
        raise ValueError(f"{flags}: for a folder of images; {args.questions} is a questions file")
    else:
        records = load_questions(args.questions, args.image_root, args.window)
    out = Path(args.out)
    inputs = {"questions": _resolved(args.questions), **({"question": args.question} if args.question else {})}
    if args.window is not None:
        inputs["window"] = args.window
    if args.slice_step is not None:
        inputs["slice_step"] = args.slice_step
    if args.option:
        inputs["options"] = args.option
    if args.heatmaps:
        _check_heat_map_options(args, "--heatmaps")
    elif args.heatmap_format != "png":
        raise ValueError("--heatmap-format: only with --heatmaps")
    if args.api_url:
        rows, _ = _answers_from_api(args, records, out, inputs, own_images=True)
        _write_answer_tables(records, rows, out)
        return
    rank, world_size, device = _start_answering_processes(args)
    check_run_settings(out, _run_settings(args, device, **inputs))
    model, processor = _load_for_answering(args.model, device, args)
    if args.compile:
        compile_model(model)
    if (rows := _answer_in_processes(args, model, processor, records, out, rank, world_size)) is not None:
        _write_answer_tables(records, rows, out)
        if args.heatmaps:
            _write_heat_maps(model, processor, records, out, args, args.heatmap_format == "dicom")
    _end_answering_processes(world_size)


def _check_heat_map_options(args: argparse.Namespace, flag: str) -> None:
    if getattr(args, "api_url", None):
        raise ValueError(f"{flag} needs the model itself (--model), not an endpoint")
    refusal = _heat_map_refusal(args, flag)
    if refusal:
        raise ValueError(refusal)


def _heat_map_refusal(args: argparse.Namespace, flag: str) -> str | None:
    """Why `flag` cannot draw heat maps with these options, or None."""
    if args.fp8 or args.load_4bit:
        return f"{flag} differentiates through the LM, which its fp8 and 4-bit layers cannot do"
    return None


def _write_heat_maps(model, processor, records: list, out: Path, args: argparse.Namespace, as_dicom: bool) -> None:
    """`out/heatmaps/ID.png` for each answered question, asked as `args` asked it (`--prompt`, `--system`)
    and drawn as `ask --heatmap` draws it, and `ID.json`, its
    relevance over the base grid in numbers, to compare with a mask; a map already drawn is kept, so an
    interrupted run picks up where it stopped. A ranked multiple-choice answer is explained as it was
    made: its option's text, after the question asked without the options. With `as_dicom`, a DICOM
    image's map is `ID.dcm` instead, a Secondary Capture in its study (`dicom_export`)."""
    import hashlib
    import io
    import json
    import re

    from tqdm import tqdm

    from .data.benchmarks import prompt_text
    from .data.conversations import write_atomically
    from .dicom_export import heat_map_comment, heat_map_dicom_bytes, shown_dicom
    from .eval.runner import read_answers
    from .eval.scoring import picked_option
    from .explain import ImageExplainer

    folder = out / "heatmaps"
    folder.mkdir(exist_ok=True)
    answers = read_answers(out / "answers.jsonl")
    explainer, explaining, source = None, None, None  # the image being explained, encoded once for its questions
    for record in tqdm(sorted(records, key=lambda r: r.image_key), desc="heat maps", unit="answer"):
        if explaining != record.image_key:
            explainer, explaining = None, record.image_key
            source = shown_dicom(record.image, record.frame) if as_dicom else None  # its DICOM file, if any
        name = re.sub(r"[^\w.@#-]+", "_", record.id)
        if name != record.id:  # a folder's ids hold paths: two could flatten to one name
            name += "-" + hashlib.sha1(record.id.encode()).hexdigest()[:8]
        path = folder / f"{name}.{'png' if source is None else 'dcm'}"
        if path.exists():
            continue
        if explainer is None:
            explainer = ImageExplainer(model, processor, record.image, record.window, record.frame)
        answer, question = answers[record.id]["text"], prompt_text(record, args.prompt)
        if scores := (answers[record.id].get("metadata") or {}).get("option_log_probs"):  # ranked: its option
            answer = picked_option(record, scores)
            question = prompt_text(record, args.prompt, options=False)
        explained = explainer(question, answer, args.system)
        numbers = {"question_id": record.id, "answer": answer, "relevance": explained.relevance.tolist()}
        write_atomically(path.with_suffix(".json"), json.dumps(numbers) + "\n")
        if source is not None:
            picture = heat_map_dicom_bytes(explained.heat_map(), source, heat_map_comment(question, answer))
        else:
            buffer = io.BytesIO()
            explained.heat_map().save(buffer, format="PNG")
            picture = buffer.getvalue()
        write_atomically(path, picture)  # last: the picture marks the answer explained
    print(f"wrote {len(records)} heat maps under {folder}", file=sys.stderr)


def _write_answer_tables(records: list, rows: dict[str, dict], out: Path) -> None:
    from .eval.report import write_answer_tables

    tables = write_answer_tables(records, rows, out)
    print(
        f"wrote {out / 'answers.jsonl'} and {' and '.join(map(str, tables))}: {len(records)} answers", file=sys.stderr
    )


def cmd_table(args: argparse.Namespace) -> None:
    from .eval.report import load_published, read_reports, render_table, results_table

    published = load_published(args.published) if args.published else None
    header, rows = results_table(read_reports(args.runs), published, intervals=args.intervals, auroc=args.auroc)
    print(render_table(header, rows, args.format))
    if published:
        print(f"\npublished rows: {published['source']}", file=sys.stderr)


def cmd_env(args: argparse.Namespace) -> None:
    import json

    from .environment import describe, format_facts

    facts = describe()
    print(json.dumps(facts, indent=1) if args.json else format_facts(facts))


def cmd_score(args: argparse.Namespace) -> None:
    import json

    from .data.benchmarks import load_benchmark, without_options
    from .eval import choice_chance, closed_auroc, confidence_intervals, paired_difference, score
    from .eval.report import difference_lines, format_table
    from .eval.runner import answer_texts, read_answers, yes_probabilities

    records = load_benchmark(args.benchmark, args.gt, args.split, args.image_root, check_images=False)
    if args.without_options:
        records = without_options(records)
    candidates, _ = _candidate_answers(args, args.gt, records)

    rows = read_answers(Path(args.pred))
    answers = answer_texts(rows)
    scores = score(records, answers, strict=args.strict, candidates=candidates)
    difference = None
    if args.against:
        baseline = answer_texts(read_answers(Path(args.against)))
        difference = paired_difference(records, answers, baseline, strict=args.strict)
    if args.json:
        print(json.dumps(scores if difference is None else {"scores": scores, "against": difference}, indent=1))
        return
    intervals = confidence_intervals(records, answers, strict=args.strict)
    ranked = closed_auroc(records, yes_probabilities(rows))
    print(format_table(scores, intervals=intervals, closed_auroc=ranked, chance=choice_chance(records)))
    if difference is not None:
        print(f"\n{args.pred} minus {args.against}:")
        print("\n".join(difference_lines(difference)))


def _teacher_spec(text: str) -> tuple[str, float]:
    kind, _, weight = text.partition(":")
    try:
        return kind, float(weight) if weight else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"teacher must be KIND or KIND:WEIGHT, got {text!r}") from None


def _is_local(url: str | None) -> bool:
    from urllib.parse import urlparse

    return url is not None and urlparse(url).hostname in ("localhost", "127.0.0.1", "::1")


def _confirm_paid_run() -> None:
    """Ask at the terminal before requests that cost money; refuse without one (pass --yes)."""
    if not sys.stdin.isatty():
        raise ValueError("a paid run needs confirmation: pass --yes")
    if input("Proceed? [y/N] ").strip().lower() not in ("y", "yes"):
        raise ValueError("cancelled")


def cmd_datagen(args: argparse.Namespace) -> None:
    import asyncio

    from .datagen import RetryPolicy, generate, load_prompt, make_teacher, read_captions
    from .datagen.pipeline import estimate_cost, read_done, rejects_path
    from .datagen.teachers import PRICES

    if not args.input or not args.out:
        raise ValueError("datagen needs --input and --out (or the 'mix' subcommand)")
    records = read_captions(args.input)
    if args.limit:
        records = records[: args.limit]
    prompt = load_prompt(args.prompt)
    teachers = []
    for kind, weight in args.teacher or [("anthropic", 1.0)]:
        model = args.anthropic_model if kind == "anthropic" else args.openai_model
        base_url = args.anthropic_base_url if kind == "anthropic" else args.base_url
        teachers.append((make_teacher(kind, model=model, api_key=args.api_key, base_url=base_url), weight))
    out = Path(args.out)
    done = read_done(out, rejects_path(out))
    pending = [r for r in records if r["id"] not in done]
    paid = any(t.name == "anthropic" or not _is_local(args.base_url) for t, _ in teachers)
    for teacher, _ in teachers:
        tokens, dollars = estimate_cost(pending, prompt, teacher.model, PRICES)
        cost = f"about ${dollars:,.2f}" if dollars is not None else "price unknown"
        print(
            f"{len(pending)} of {len(records)} records to do with {teacher.model}: ~{tokens:,} tokens, {cost} at most"
        )
    if pending and paid and not args.yes:
        _confirm_paid_run()
    policy = RetryPolicy(max_retries=args.max_retries)
    stats = asyncio.run(
        generate(records, out, teachers, prompt, args.concurrency, policy, args.max_requests, args.seed, done=done)
    )
    print(
        f"wrote {stats.written} conversations to {out}; rejected {dict(stats.rejected)}, failed {dict(stats.failed)}, "
        f"{stats.retries} retries, {stats.requests} requests, {stats.input_tokens + stats.output_tokens:,} tokens"
    )


def cmd_datagen_mix(args: argparse.Namespace) -> None:
    import json

    from .datagen import mix

    sources = []
    for text in args.source:
        path, _, ratio = text.rpartition(":") if ":" in text else (text, "", "1")
        try:
            sources.append((Path(path), float(ratio)))
        except ValueError:
            raise ValueError(f"--source must be FILE or FILE:RATIO, got {text!r}") from None
    stats = mix(sources, args.out, seed=args.seed, licenses=args.license)
    print(json.dumps(stats, indent=1))


def cmd_judge(args: argparse.Namespace) -> None:
    import asyncio
    import json

    from .data.conversations import read_appended_rows, write_atomically
    from .datagen import RetryPolicy, make_teacher
    from .datagen.pipeline import rejects_path
    from .eval.judge import (
        PROMPT_ID,
        format_summary,
        judge_answers,
        judge_prompt,
        pending_reviews,
        read_chat_questions,
        summarize_reviews,
    )
    from .eval.runner import check_run_settings, read_answers

    questions = read_chat_questions(args.questions)
    answers_path = Path(args.answers)
    if answers_path.is_dir():
        answers_path = answers_path / "answers.jsonl"
    if not answers_path.is_file():
        raise ValueError(f"{answers_path}: answers file not found")
    answers = {qid: str(row.get("text") or "") for qid, row in read_answers(answers_path).items()}
    out = Path(args.out)
    reviews = out / "reviews.jsonl"
    settings = {
        "questions": _resolved(args.questions),
        "judge": args.judge,
        "judge_model": args.judge_model,
        "prompt": PROMPT_ID,
        "both_orders": args.both_orders,
    }
    pending = pending_reviews(questions, answers, reviews, args.both_orders)  # before the settings: it checks
    check_run_settings(out, settings, made="reviews")
    if args.judge == "openai" and args.base_url is None and not (args.api_key or os.environ.get("OPENAI_API_KEY")):
        raise ValueError("a judge on OpenAI's API needs OPENAI_API_KEY (or --api-key); --base-url for another endpoint")
    judge = make_teacher(args.judge, model=args.judge_model, api_key=args.api_key, base_url=args.base_url)
    tokens = sum(len(judge_prompt(q, q.reference, answers[q.id])) // 4 + 250 for q, _ in pending)
    print(f"{len(pending)} reviews to do with {args.judge_model}: ~{tokens:,} tokens", file=sys.stderr)
    paid = args.judge == "anthropic" or not _is_local(args.base_url)
    if pending and paid and not args.yes:
        _confirm_paid_run()
    policy = RetryPolicy(max_retries=args.max_retries)
    stats = asyncio.run(
        judge_answers(questions, answers, reviews, judge, args.both_orders, args.concurrency, policy, args.max_requests)
    )
    rows = read_appended_rows(reviews)
    reviewed = len({row["question_id"] for row in rows})
    rejected = len(read_appended_rows(rejects_path(reviews)))
    summary = {
        "judge": args.judge_model,
        "prompt": PROMPT_ID,
        "both_orders": args.both_orders,
        "questions": len(questions),
        "reviewed": reviewed,
        "rejected": rejected,
        "groups": summarize_reviews(rows),
    }
    write_atomically(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    if reviewed < len(questions):
        print(
            f"reviewed {reviewed} of {len(questions)} questions: {stats.failed} requests failed this run (rerun to "
            f"ask again), {rejected} replies without readable scores (in {rejects_path(reviews)})",
            file=sys.stderr,
        )
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary["groups"], args.judge_model))


def _model_dir(model: str | None):
    from .checkpoints import DEMO_MODEL_DIR

    if model is not None:
        return model
    if not (DEMO_MODEL_DIR / "config.json").is_file():
        raise ValueError("no --model given and the built-in demo model is not installed")
    print("(demo model trained on synthetic phantoms; a research toy, not for diagnosis)", file=sys.stderr)
    return DEMO_MODEL_DIR


def _run_settings(args: argparse.Namespace, device, **inputs: object) -> dict[str, object]:
    """What an `eval` or `answer` run resumed in the same `--out` must share with the run that began it:
    the model, what it answers (`inputs`), the prompt, the decoding and the precision."""
    from .inference import inference_dtype

    return {
        "model": _resolved(args.model),
        **inputs,
        "prompt": args.prompt,
        **_system_setting(args),
        "max_new_tokens": args.max_new_tokens,
        **_sampling_settings(args),
        "dtype": str(inference_dtype(device, args.dtype)).removeprefix("torch."),
        "fp8": args.fp8,
        "load_4bit": args.load_4bit,
        "rank_options": args.rank_options,
    }


def _system_setting(args: argparse.Namespace) -> dict[str, object]:
    """`--system` as a run's settings and report record it: nothing without one, so that runs begun
    before it existed resume as they were."""
    return {"system": args.system} if args.system else {}


def _sampling_settings(args: argparse.Namespace) -> dict[str, object]:
    """`--temperature`, `--top-p` and `--seed` as a run's settings record them: nothing for greedy
    decoding, so that runs begun before sampling existed resume as they were."""
    if args.temperature < 0:
        raise ValueError(f"--temperature must be 0 (greedy) or more, got {args.temperature:g}")
    if args.temperature == 0:
        given = [flag for flag, value in {"--top-p": args.top_p, "--seed": args.seed}.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only with a --temperature above 0 (answers are greedy)")
        return {}
    top_p = 1.0 if args.top_p is None else args.top_p
    if not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be above 0 and at most 1, got {top_p:g}")
    return {"sampling": {"temperature": args.temperature, "top_p": top_p, "seed": args.seed or 0}}


def _sampling(args: argparse.Namespace):
    """The `Sampling` and seed that `--temperature`, `--top-p` and `--seed` ask for; (None, 0): greedy."""
    from .generation import Sampling

    chosen = _sampling_settings(args).get("sampling")
    return (None, 0) if chosen is None else (Sampling(chosen["temperature"], chosen["top_p"]), chosen["seed"])


def _resolved(path: str) -> str:
    """An existing path made absolute, so that a run resumed from another folder names it the same;
    anything else (a hub id) as given."""
    return str(Path(path).resolve()) if Path(path).exists() else path


def _load_for_answering(model_dir, device, args: argparse.Namespace):
    """The model and processor on `device` at the precision `--dtype` names, or the device's default,
    the LM's linear layers in fp8 with `--fp8` or in 4-bit NF4 with `--load-4bit`."""
    from .checkpoints import load, nf4_quantization
    from .inference import inference_dtype

    if args.fp8 and args.load_4bit:
        raise ValueError("--fp8 and --load-4bit are two ways to store the LM's linear layers; choose one")
    if args.fp8:
        from .fp8 import check_fp8_device, quantize_language_model_fp8

        check_fp8_device(device)  # before minutes of loading
    dtype = inference_dtype(device, args.dtype)
    quantization = nf4_quantization(dtype) if args.load_4bit else None
    model, processor = load(model_dir, device, dtype, quantization_config=quantization)
    if args.fp8:
        quantize_language_model_fp8(model.language_model)
    return model, processor


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from .inference import compile_model
    from .serve import Engine, Settings, create_app

    api_key = args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    tls = _tls_files(args.ssl_certfile, args.ssl_keyfile)
    model_dir = _model_dir(args.model)
    model, processor = _load_for_answering(model_dir, _answering_device(args.device), args)
    if args.compile:
        compile_model(model)
    settings = Settings(
        model_id=args.model_id or ("llama3med-demo" if args.model is None else Path(model_dir).name),
        api_key=api_key,
        allow_dirs=[Path(d).resolve() for d in args.allow_dir],
        allow_remote=args.allow_remote,
        remote_hosts=tuple(args.allow_remote_host),
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_tokens=args.max_tokens,
        request_timeout=args.request_timeout,
        system=args.system,
        no_heat_maps=_heat_map_refusal(args, "a heat map"),
    )
    engine = Engine(
        model,
        processor,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        feature_cache_bytes=int(args.image_cache_mb * 2**20),
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for warning in _exposure_warnings(args.host, tls=tls is not None, api_key=api_key is not None):
        print(f"llama3med: warning: {warning}", file=sys.stderr)
    scheme = "https" if tls else "http"
    print(
        f"serving {settings.model_id} on {scheme}://{args.host}:{args.port} (web page at /, API at /v1)",
        file=sys.stderr,
    )
    uvicorn.run(
        create_app(engine, settings),
        host=args.host,
        port=args.port,
        access_log=False,
        log_level="warning",
        ssl_certfile=tls[0] if tls else None,
        ssl_keyfile=tls[1] if tls else None,
    )


def _tls_files(certfile: str | None, keyfile: str | None) -> tuple[str, str] | None:
    """The certificate and key `serve` speaks HTTPS with, both given or neither, checked before the
    model loads."""
    if (certfile is None) != (keyfile is None):
        raise ValueError("--ssl-certfile and --ssl-keyfile go together: give both, or neither for plain HTTP")
    if certfile is None:
        return None
    for path in (certfile, keyfile):
        if not Path(path).is_file():
            raise ValueError(f"{path}: no such file")
    return certfile, keyfile


def _exposure_warnings(host: str, *, tls: bool, api_key: bool) -> list[str]:
    """What a server reachable from other machines lacks: images and questions are patient data."""
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if local:
        return []
    warnings = []
    if not tls:
        warnings.append(
            f"serving on {host} over plain HTTP: images, questions, answers and the API key cross the network "
            "unencrypted; give --ssl-certfile and --ssl-keyfile"
        )
    if not api_key:
        warnings.append(f"serving on {host} without an API key: anyone who can reach it can use it; give --api-key")
    return warnings


def cmd_data_phantoms(args: argparse.Namespace) -> None:
    from .data.phantoms import write_phantom_set

    counts = write_phantom_set(args.out, args.n, args.seed, size=args.size, image_format=args.format)
    print(f"wrote {args.out}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))


def cmd_data_llava_med_images(args: argparse.Namespace) -> None:
    from .data.pmc import FAILED_FILE, fetch_llava_med_images, read_image_list

    prefix = None
    if args.url_prefix is not None:
        old, sep, new = args.url_prefix.partition("=")
        if not sep or not old:
            raise ValueError(f"--url-prefix takes OLD=NEW, got {args.url_prefix!r}")
        prefix = (old, new)
    figures = read_image_list(args.image_list)
    counts = fetch_llava_med_images(
        figures,
        args.out,
        archives=args.archives,
        url_prefix=prefix,
        cloud_url=args.cloud_url,
        concurrency=args.concurrency,
    )
    print(
        f"{args.out}: {counts['written']} figures written, {counts['present']} already there, "
        f"{counts['failed']} failed" + (f" (see {Path(args.out) / FAILED_FILE})" if counts["failed"] else "")
    )


def cmd_data_vqa_conversations(args: argparse.Namespace) -> None:
    from .data.benchmarks import CONVERSATIONS_FILE, load_benchmark, write_benchmark_conversations

    if args.split == "test":
        print("llama3med: warning: the test split: a model tuned on it cannot be evaluated on it", file=sys.stderr)
    records = load_benchmark(args.benchmark, args.data, args.split, args.image_root)
    counts = write_benchmark_conversations(records, args.out, args.prompt, args.system)
    print(
        f"{Path(args.out) / CONVERSATIONS_FILE}: {counts['conversations']} conversations "
        f"({counts['images written']} images written); train with image_root: {args.out}"
    )


def cmd_data_pmc_search(args: argparse.Namespace) -> None:
    from .data.europe_pmc import search_pmcids

    counts = search_pmcids(args.query, args.out, limit=args.limit, search_url=args.search_url)
    print(
        f"{args.out}: {counts['pmcids']} PMCIDs of open-access articles ({counts['matched']} matched)"
        + (", found by an earlier run" if counts["already done"] else "")
    )


def cmd_data_pmc_articles(args: argparse.Namespace) -> None:
    from .data.pmc_articles import FAILED_FILE, fetch_pmc_articles, read_pmcids

    pmcids = read_pmcids(args.pmcids)
    if not pmcids:
        raise ValueError(f"no PMCID in {' '.join(args.pmcids)}")
    counts = fetch_pmc_articles(pmcids, args.out, cloud_url=args.cloud_url, concurrency=args.concurrency)
    print(
        f"{args.out}: {counts['fetched']} articles fetched ({counts['figures']} figure images), "
        f"{counts['present']} already there, {counts['failed']} failed"
        + (f" (see {Path(args.out) / FAILED_FILE})" if counts["failed"] else "")
    )


def cmd_data_pmc_figures(args: argparse.Namespace) -> None:
    from .data.pmc_figures import FAILED_FILE, FIGURES_FILE, extract_pmc_figures

    counts = extract_pmc_figures(args.articles, args.out, kinds=args.kind)
    out = Path(args.out)
    print(
        f"{out / FIGURES_FILE}: {counts['figures']} figures from {counts['articles']} articles "
        f"({counts['without image or caption']} figures without an image or caption passed over, "
        + (f"{counts['of other kinds']} of other kinds, " if args.kind else "")
        + f"{counts['already done']} articles done before, {counts['failed']} unreadable"
        + (f": see {out / FAILED_FILE})" if counts["failed"] else ")")
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_candidates_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--candidates",
        default=None,
        help="open-answer set for the candidate accuracy, e.g. LLaVA-Med's train_open_answers.json "
        "(default: the release's train-split open answers, else the test set's own)",
    )


def _add_compile_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the tower and the greedy decoding step: faster after a one-time compile (seconds)",
    )


def _add_cloud_option(p: argparse.ArgumentParser) -> None:
    from .data.pmc_cloud import CLOUD_URL

    p.add_argument(
        "--cloud-url", default=CLOUD_URL, help="the PMC Cloud's bucket, or a mirror of it (default: %(default)s)"
    )


def _add_prompt_option(p: argparse.ArgumentParser) -> None:
    from .data.benchmarks import PROMPT_STYLES

    p.add_argument(
        "--prompt",
        choices=PROMPT_STYLES,
        default="plain",
        help="question wording: plain, or short (asks for a single word or phrase)",
    )


def _add_batch_answering_options(p: argparse.ArgumentParser) -> None:
    _add_prompt_option(p)
    _add_system_option(p)
    p.add_argument("--batch-size", type=_positive, default=None, help="questions decoded together (default: 16)")
    p.add_argument("--max-new-tokens", type=_positive, default=64)
    _add_sampling_options(p, "0: greedy (the default); above 0, sampled, as LLaVA-Med's model_vqa does at 0.2")
    p.add_argument(
        "--rank-options",
        action="store_true",
        help="multiple-choice questions: answer with the option the model scores likeliest as its whole answer to "
        "the question asked alone, instead of reading the letter it writes (for models not taught to answer with "
        "letters)",
    )
    _add_loading_options(p)
    _add_compile_option(p)


def _add_heat_maps_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--heatmaps",
        action="store_true",
        help="also write OUT/heatmaps/QUESTION_ID.png (and .json, its numbers) for each answer: " + HEAT_MAP_HELP,
    )
    p.add_argument(
        "--heatmap-format",
        choices=("png", "dicom"),
        default="png",
        help="with --heatmaps: dicom writes a DICOM image's map as QUESTION_ID.dcm, a Secondary Capture in its "
        "study for the PACS (other images' stay PNG)",
    )


def _add_model_or_api_options(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model directory")
    source.add_argument(
        "--api-url",
        help="instead of --model: an OpenAI-compatible endpoint to ask (llama3med serve, vLLM, a hosted model), "
        "e.g. http://gpu-host:8000/v1; its key from $OPENAI_API_KEY",
    )
    p.add_argument("--api-model", default=None, help="with --api-url: the model to ask (default: the one it serves)")
    p.add_argument(
        "--concurrency", type=_positive, default=None, help="with --api-url: questions in flight at once (default: 8)"
    )


def _add_image_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, help="image file, or a directory holding one DICOM series")
    p.add_argument(
        "--frame",
        type=int,
        default=None,
        help="a slice of a NIfTI volume or a DICOM series, from 0 at the feet, a multi-frame DICOM's frame, "
        "or a TIFF stack's page (default: the middle one)",
    )
    p.add_argument("--window", type=_window, default=None, help="DICOM/NIfTI window: CENTRE,WIDTH or a CT preset")


def _add_system_option(
    p: argparse.ArgumentParser,
    help: str = "a system message before each question (as the model was tuned with, or an API model's instructions)",
) -> None:
    p.add_argument("--system", default=None, help=help)


def _add_answering_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory (default: the built-in phantom demo model)")
    _add_system_option(p)
    p.add_argument("--max-new-tokens", type=_positive, default=128, help="the most tokens an answer may have")
    _add_sampling_options(p, "0: greedy (the default); above 0, sampled")
    p.add_argument(
        "--p-yes",
        action="store_true",
        help="after each answer, a line 'P(yes) 0.934': the model's probability of starting it with yes rather "
        "than no, as eval gives it for closed questions",
    )
    _add_loading_options(p)


def _add_sampling_options(p: argparse.ArgumentParser, temperature_help: str) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help=temperature_help)
    p.add_argument("--top-p", type=float, default=None, help="with --temperature: the nucleus (default: 1)")
    p.add_argument("--seed", type=int, default=None, help="with --temperature: the draws' seed (default: 0)")


def _add_loading_options(p: argparse.ArgumentParser) -> None:
    """Where the model runs and in what precision its weights are held."""
    p.add_argument(
        "--device",
        default=None,
        help="where the model runs: cpu, cuda, cuda:N, mps (default: the first GPU if there is one, else the CPU)",
    )
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="weights' precision (default: bfloat16 on a GPU, float32 on a CPU; bfloat16 is faster on CPUs "
        "with AMX, which `llama3med env` names)",
    )
    p.add_argument(
        "--fp8",
        action="store_true",
        help="the LM's linear layers in fp8, for GPUs of compute capability 8.9+ (e.g. H100): half their "
        "memory; answers move a little, compare scores",
    )
    p.add_argument(
        "--load-4bit",
        action="store_true",
        help="the LM's linear layers in 4-bit NF4 (bitsandbytes; an 8B LM in about 6 GB instead of 16, for "
        "smaller GPUs): answers move a little, compare scores",
    )


HEAT_MAP_HELP = (
    "the image as the model saw it with a heat map of where the answer came from (each image token's gradient "
    "x input for the answer): an aid for reading it, not a localisation"
)
HEAT_MAP_COMMAND = "/heatmap"  # a chat line `/heatmap FILE.png`


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .config import PYRAMID_RESIZES
    from .data.benchmarks import BENCHMARKS
    from .data.europe_pmc import SEARCH_URL
    from .data.phantoms import PHANTOM_FORMATS
    from .data.pmc_figures import IMAGING_KINDS
    from .eval.report import TABLE_FORMATS
    from .processing.chat import LLAVA_CHAT_TEMPLATES
    from .processing.processor import IMAGE_FITS

    parser = argparse.ArgumentParser(
        prog="llama3med", description="Llama3-Med: high-resolution biomedical vision-language assistants."
    )
    parser.add_argument("--version", action="version", version=f"llama3med {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("build", help="assemble a new model from a vision tower and an LLM, or re-scale one")
    p.add_argument("--vision", default=None, help="SigLIP/CLIP model dir (or hub id)")
    p.add_argument("--llm", default=None, help="causal LM dir (or hub id), e.g. Llama-3-8B-Instruct")
    p.add_argument(
        "--from",
        dest="source",
        default=None,
        help="instead of --vision and --llm: a Llama3-Med dir (e.g. a converted LLaVA-Med) whose tower and LM "
        "encode at --scales, with a fresh projector",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--scales", type=_scales, default=None, help="e.g. 384,768,1152 (default: 1x,2x,3x the tower's)")
    p.add_argument("--vision-feature-layer", type=int, default=-2, help="with --vision (--from keeps its own)")
    p.add_argument(
        "--projector-type",
        choices=["mlp2x_gelu", "linear"],
        default="mlp2x_gelu",
        help="with --vision (--from: its own)",
    )
    p.add_argument(
        "--pyramid-resize",
        choices=list(PYRAMID_RESIZES),
        default=None,
        help="how the smaller scales are made: bilinear_antialiased (default; --from: its own) or bicubic, as "
        "S2's and the paper's code resize",
    )
    p.add_argument(
        "--image-fit",
        choices=list(IMAGE_FITS),
        default=None,
        help="with --vision: how an image becomes a square, pad (default: with the mean colour), resize (stretched) "
        "or crop (the centre)",
    )
    p.add_argument("--max-shard-size", default="5GB")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("convert", help="import a LLaVA or LLaVA-Med checkpoint (S2 ones too)")
    p.add_argument(
        "--llava",
        required=True,
        help="a transformers LlavaForConditionalGeneration dir, or a checkpoint of the original LLaVA code "
        "(LLaVA-1.5, LLaVA-Med v1.5)",
    )
    p.add_argument(
        "--vision", default=None, help="original LLaVA: its CLIP tower's dir (default: the mm_vision_tower it names)"
    )
    p.add_argument(
        "--conv-mode",
        choices=sorted(LLAVA_CHAT_TEMPLATES),
        default=None,
        help="original LLaVA: the conversation format it was trained with (default: mistral_instruct for "
        "Mistral LMs, vicuna_v1 for Llama ones)",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--max-shard-size", default="5GB")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("ask", help="answer a question about one image (DICOM, NIfTI, PNG, JPEG, ...)")
    p.add_argument("question", help="the question, e.g. 'Is there a lesion?'")
    _add_image_options(p)
    _add_answering_options(p)
    p.add_argument("--heatmap", metavar="FILE.png", default=None, help="also write " + HEAT_MAP_HELP)
    p.add_argument(
        "--option",
        action="append",
        default=[],
        help="an answer to choose from (repeat, 2 to 8): the question is asked with them lettered",
    )
    p.add_argument(
        "--rank-options",
        action="store_true",
        help="answer with the --option the model finds likeliest as its whole answer, then each option's "
        "probability, 'P(lateral) 0.969'",
    )
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser(
        "chat",
        help="a multi-turn chat about one image in the terminal, answers streamed",
        description=f"A multi-turn chat about one image, a question a line. A line '{HEAT_MAP_COMMAND} FILE.png' "
        "writes the last answer's heat map: " + HEAT_MAP_HELP + ".",
    )
    _add_image_options(p)
    _add_answering_options(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("train", help="run a training stage from a recipe (tower, pretrain or finetune)")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/llama3med-8b/pretrain.yaml")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. training.learning_rate=1e-4",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from the latest checkpoint in the output directory (or the one given)",
    )
    p.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping it")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="zero-shot VQA with the LLaVA-Med protocol; resumable")
    _add_model_or_api_options(p)
    p.add_argument("--benchmark", choices=BENCHMARKS, default="llava-med", help="dataset and its layout")
    p.add_argument(
        "--data",
        required=True,
        help="the dataset's file or folder as released, or a Hugging Face dataset id (see docs/evaluation.md)",
    )
    p.add_argument("--split", default="test")
    p.add_argument("--image-root", default=None, help="image folder (default: the data file's images/ or folder)")
    p.add_argument("--out", required=True, help="output directory: answers.jsonl, report.md, report.json")
    p.add_argument("--limit", type=_positive, default=None, help="first N questions only")
    _add_batch_answering_options(p)
    p.add_argument(
        "--without-options",
        action="store_true",
        help="multiple-choice questions asked without their options and scored as open ones against the right "
        "option's text (PMC-VQA's blank setting)",
    )
    _add_heat_maps_option(p)
    p.add_argument(
        "--compare",
        default=None,
        metavar="FILE",
        help="published results (YAML/JSON: source, rows of model, benchmark, open, closed) to print beside ours",
    )
    _add_candidates_option(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("answer", help="answer a file of questions about images, batched and resumable")
    p.add_argument(
        "questions",
        help="JSON/JSONL of {question_id, image, text} (LLaVA-Med's model_vqa input), or a folder of images to "
        "ask --question about",
    )
    p.add_argument(
        "--question",
        action="append",
        default=[],
        help="with a folder: the question to ask about every image in it (repeatable)",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        help="with a folder: an option each --question chooses among (repeat, 2 to 8; with --rank-options, a "
        "zero-shot classification of the folder with each option's probability)",
    )
    p.add_argument(
        "--window",
        type=_window,
        default=None,
        help="DICOM/NIfTI window for every image without its own: CENTRE,WIDTH or a CT preset",
    )
    p.add_argument(
        "--slice-step",
        type=_positive,
        default=None,
        metavar="N",
        help="with a folder: ask about every Nth slice of each series and volume, from the feet (1: every slice), "
        "instead of its middle one",
    )
    _add_model_or_api_options(p)
    p.add_argument("--image-root", default=None, help="image folder (default: the file's images/ or folder)")
    p.add_argument("--out", required=True, help="output directory: answers.jsonl (LLaVA-Med's answer format)")
    _add_batch_answering_options(p)
    _add_heat_maps_option(p)
    p.set_defaults(func=cmd_answer)

    p = sub.add_parser("score", help="score an answers.jsonl against references (LLaVA-Med protocol)")
    p.add_argument("--gt", required=True, help="the benchmark's file or folder, or a Hugging Face dataset id")
    p.add_argument("--benchmark", choices=BENCHMARKS, default="llava-med")
    p.add_argument("--split", default="test")
    p.add_argument("--pred", required=True, help="answers.jsonl")
    p.add_argument("--image-root", default=None)
    p.add_argument("--strict", action="store_true", help="closed: compare the first yes/no word only")
    p.add_argument(
        "--without-options",
        action="store_true",
        help="multiple-choice questions scored as open ones against the right option's text (answers of an "
        "eval --without-options)",
    )
    _add_candidates_option(p)
    p.add_argument(
        "--against",
        metavar="ANSWERS",
        help="another run's answers.jsonl on the same questions: the difference, with a paired 95 %% interval",
    )
    p.add_argument("--json", action="store_true", help="print JSON (with --against: {scores, against})")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("table", help="the results table of several eval runs: open and closed per benchmark")
    p.add_argument("runs", nargs="+", help="eval --out folders (or their report.json)")
    p.add_argument("--format", choices=TABLE_FORMATS, default="markdown")
    p.add_argument("--intervals", action="store_true", help="each figure with its 95 %% interval")
    p.add_argument("--auroc", action="store_true", help="a column per benchmark: closed yes/no AUROC by P(yes)")
    p.add_argument("--published", default=None, metavar="FILE", help="published rows to add (eval --compare's format)")
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("datagen", help="turn figure captions into conversations with teacher LLMs")
    p.add_argument("--input", help="captions: PMC-15M style JSONL or LLaVA caption JSON")
    p.add_argument("--out", help="output JSONL (appended; rejects go to OUT.rejected.jsonl)")
    p.add_argument(
        "--teacher", type=_teacher_spec, action="append", help="anthropic or openai, optionally :WEIGHT; repeat to mix"
    )
    p.add_argument("--anthropic-model", default=None, help="default: claude-3-opus-20240229")
    p.add_argument("--openai-model", default=None, help="default: meta-llama/Meta-Llama-3-70B-Instruct")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    p.add_argument("--anthropic-base-url", default=None, help=argparse.SUPPRESS)
    p.add_argument("--api-key", default=None, help="default: ANTHROPIC_API_KEY / OPENAI_API_KEY")
    p.add_argument("--prompt", choices=["conversation", "vqa", "description"], default="conversation")
    p.add_argument("--concurrency", type=_positive, default=8)
    p.add_argument("--max-retries", type=int, default=5)
    p.add_argument("--max-requests", type=_positive, default=None, help="request budget for this run")
    p.add_argument("--limit", type=_positive, default=None, help="first N records only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--yes", action="store_true", help="skip the confirmation before a paid run")
    p.set_defaults(func=cmd_datagen)
    datagen = p.add_subparsers(dest="datagen_command", required=False, metavar="[mix]")
    p = datagen.add_parser("mix", help="mix conversation sets by ratio into one finetune set, with stats")
    p.add_argument("--source", action="append", required=True, help="FILE[:RATIO], repeatable")
    p.add_argument("--out", required=True, help="output JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--license",
        action="append",
        default=[],
        metavar="TEXT",
        help="keep only records whose license contains TEXT (repeatable), e.g. creativecommons.org/licenses/by/",
    )
    p.set_defaults(func=cmd_datagen_mix)

    p = sub.add_parser("judge", help="LLaVA-Med's visual-chat score: a judge LLM grades answers against references")
    p.add_argument(
        "questions",
        help="LLaVA-Med's llava_med_eval_qa50_qa.jsonl: question_id, text, gpt4_answer, fig_label, fig_caption, "
        "in_text_mention, type, domain",
    )
    p.add_argument("--answers", required=True, help="answers.jsonl (or an answer --out folder) to the same questions")
    p.add_argument("--out", required=True, help="folder: reviews.jsonl (appended; resumable) and summary.json")
    p.add_argument("--judge", choices=["openai", "anthropic"], default="openai", help="the judge's API")
    p.add_argument(
        "--judge-model",
        required=True,
        help="the judge LLM, e.g. gpt-4o (LLaVA-Med's gpt-4-0314 is retired; scores compare under one judge only)",
    )
    p.add_argument("--base-url", default=None, help="the API's endpoint, e.g. http://localhost:8000/v1 for vLLM")
    p.add_argument("--api-key", default=None, help="default: OPENAI_API_KEY / ANTHROPIC_API_KEY")
    p.add_argument(
        "--both-orders",
        action="store_true",
        help="grade each answer twice, shown first and second, and average: cancels a judge's taste for a position",
    )
    p.add_argument("--concurrency", type=_positive, default=8)
    p.add_argument("--max-retries", type=int, default=5)
    p.add_argument("--max-requests", type=_positive, default=None, help="request budget for this run")
    p.add_argument("--yes", action="store_true", help="skip the confirmation before a paid run")
    p.add_argument("--json", action="store_true", help="print summary.json instead of the table")
    p.set_defaults(func=cmd_judge)

    p = sub.add_parser("serve", help="OpenAI-compatible API and web page for asking about images")
    p.add_argument("--model", default=None, help="model directory (default: the built-in phantom demo model)")
    p.add_argument("--model-id", default=None, help="name clients use (default: the directory's name)")
    _add_system_option(
        p, "the system message of chats that send none (the page's included), as the model was tuned with"
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require Authorization: Bearer KEY (all but /health and the page); default: ${API_KEY_VARIABLE}, "
        "which unlike a flag other users of the machine cannot read in the process list",
    )
    p.add_argument("--ssl-certfile", default=None, help="PEM certificate (chain): serve HTTPS, with --ssl-keyfile")
    p.add_argument("--ssl-keyfile", default=None, help="PEM private key of --ssl-certfile")
    p.add_argument("--allow-dir", action="append", default=[], help="directory file:// images may come from")
    p.add_argument("--allow-remote", action="store_true", help="fetch http(s) image URLs from public hosts")
    p.add_argument(
        "--allow-remote-host",
        action="append",
        default=[],
        metavar="HOST",
        help="fetch http(s) image URLs from this host, even a private one such as an intranet server (repeatable)",
    )
    p.add_argument("--max-batch", type=_positive, default=8, help="requests decoding together (batch rows)")
    p.add_argument("--max-queue", type=_positive, default=32, help="queued+running requests before 429")
    p.add_argument("--max-tokens", type=_positive, default=512, help="cap on max_tokens")
    p.add_argument("--max-body-mb", type=float, default=20.0)
    p.add_argument(
        "--image-cache-mb",
        type=float,
        default=512.0,
        help="memory (on the model's device) for the features of recent images, reused when a file is sent again "
        "(0: off)",
    )
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds")
    _add_loading_options(p)
    _add_compile_option(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("env", help="versions, GPUs and optional parts on this machine, for bug reports")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_env)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True, metavar="WHAT")
    p = data.add_parser("phantoms", help="synthetic CT/MR phantoms with lesions, captions and VQA")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=_positive, default=100, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="a test set should use another seed than training")
    p.add_argument("--size", type=_positive, default=1152, help="image side in pixels")
    p.add_argument("--format", choices=PHANTOM_FORMATS, default="dcm", help="DICOM, PNG or NIfTI")
    p.set_defaults(func=cmd_data_phantoms)
    p = data.add_parser("pmc-search", help="PMCIDs of the open-access articles a Europe PMC search finds; resumable")
    p.add_argument("query", help='Europe PMC query, e.g. \'"computed tomography" AND LICENSE:"cc by"\'')
    p.add_argument("--out", required=True, help="file of PMCIDs, one a line: what pmc-articles reads")
    p.add_argument("--limit", type=_positive, default=None, help="at most this many PMCIDs")
    p.add_argument("--search-url", default=SEARCH_URL, help="Europe PMC's REST search (default: %(default)s)")
    p.set_defaults(func=cmd_data_pmc_search)
    p = data.add_parser(
        "pmc-articles", help="open-access articles' JATS XML and figure images from the PMC Cloud; resumable"
    )
    p.add_argument("pmcids", nargs="+", help="PMCIDs (PMC6149739, or PMC6149739.2 for a version) or files of them")
    p.add_argument("--out", required=True, help="article folder, one folder per PMCID: what pmc-figures reads")
    _add_cloud_option(p)
    p.add_argument("--concurrency", type=_positive, default=8, help="articles fetched at once")
    p.set_defaults(func=cmd_data_pmc_articles)
    p = data.add_parser(
        "pmc-figures", help="figures, captions and citing sentences out of PMC articles, for datagen; resumable"
    )
    p.add_argument("articles", help="folder of PMC article packages (PMC*.tar.gz) or article folders (JATS + images)")
    p.add_argument("--out", required=True, help="output folder: figures.jsonl and images/")
    p.add_argument(
        "--kind",
        action="append",
        default=[],
        choices=IMAGING_KINDS,
        help="keep only figures whose caption names this kind of image (repeatable), as LLaVA-Med kept five",
    )
    p.set_defaults(func=cmd_data_pmc_figures)
    p = data.add_parser(
        "llava-med-images", help="LLaVA-Med's figure images, from the PMC Cloud or article packages; resumable"
    )
    p.add_argument("image_list", help="LLaVA-Med's llava_med_image_urls.jsonl (pair_id, pmc_tar_url, image_file_path)")
    p.add_argument("--out", required=True, help="image folder: <pair_id>.jpg, as LLaVA-Med's conversations name them")
    p.add_argument(
        "--archives",
        default=None,
        help="folder of article packages (PMC*.tar.gz) read when they are there (and --url-prefix downloads kept)",
    )
    p.add_argument(
        "--url-prefix",
        default=None,
        metavar="OLD=NEW",
        help="download the packages, rewriting the start of each URL to a mirror of PMC's old layout "
        "(PMC removed the originals in 2026); without it, figures come from the PMC Cloud",
    )
    _add_cloud_option(p)
    p.add_argument("--concurrency", type=_positive, default=8, help="articles fetched at once")
    p.set_defaults(func=cmd_data_llava_med_images)
    p = data.add_parser(
        "vqa-conversations", help="a VQA benchmark's train split as conversations to fine-tune on, worded as eval asks"
    )
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    p.add_argument("--data", required=True, help="the release: a folder, a file or a Hugging Face dataset id")
    p.add_argument("--split", default="train")
    p.add_argument("--image-root", default=None, help="image folder when not the release's own")
    _add_prompt_option(p)
    _add_system_option(p, "a system message opening each conversation, for eval --system to ask with")
    p.add_argument("--out", required=True, help="output folder: conversations.json and images/")
    p.set_defaults(func=cmd_data_vqa_conversations)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars would bury the answer
    # bitsandbytes, which the Trainer imports through peft, warns on every AVX512-BF16 CPU that an optional
    # kernel package is missing, whether or not anything runs in 4 bits
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        args.func(args)
    except (ValueError, OSError, RuntimeError) as err:
        print(f"llama3med: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
