"""Benchmark accuracy while a stage trains. The loss says little about whether answers are getting
right; every `every` steps (and at the end) the model answers a VQA set's first `limit` questions as
`llama3med eval` answers them (greedy, each image encoded once) and is scored as `eval` scores them.
The closed accuracy, open recall, closed yes/no AUROC (by P(yes)) and, for multiple-choice questions
(PMC-VQA's), the choice accuracy go into the Trainer's logs
(TensorBoard, the progress lines, the checkpoints' `trainer_state.json`) and, with the step, into
`OUTPUT_DIR/vqa_eval.jsonl`.

The first process answers alone while the others wait at the next step, so the weights must be whole
on it: not under FSDP or ZeRO-3, which keep a shard on each."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..data.benchmarks import load_benchmark
from ..eval.runner import generate_answers, rank_options
from ..eval.scoring import closed_auroc, score
from ..inference import release_decoder

VQA_EVAL_FILE = "vqa_eval.jsonl"
HEADLINES = ("closed_accuracy", "open_recall", "choice_accuracy")


class VQAEvalCallback(TrainerCallback):
    """Answers and scores the questions every `every` steps; `trainer` is the Trainer whose logs get
    the figures (set once it exists)."""

    def __init__(self, spec: dict, output_dir: str | Path):
        records = load_benchmark(
            spec.get("benchmark", "llava-med"), spec["data"], spec.get("split", "test"), spec.get("image_root")
        )
        self.records = records[: spec.get("limit", 200)]
        self.every = spec.get("every", 500)
        self.prompt = spec.get("prompt", "plain")
        self.system = spec.get("system")  # a system message before each question, as eval --system puts it
        self.max_new_tokens = spec.get("max_new_tokens", 32)
        self.batch_size = spec.get("batch_size", 16)
        self.rank_options = spec.get("rank_options", False)  # multiple choice: the likeliest option, as eval's
        self.path = Path(output_dir) / VQA_EVAL_FILE
        self.trainer = None

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.global_step % self.every and state.global_step < state.max_steps:
            return
        if not state.is_world_process_zero:
            return
        scores, ranked = self.evaluate(model, processing_class)
        figures = {f"vqa_{key}": scores[key] for key in HEADLINES if key in scores}
        if ranked is not None:
            figures.update(
                vqa_closed_auroc=ranked["auroc"], vqa_closed_brier=ranked["brier"], vqa_closed_ece=ranked["ece"]
            )
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps({"step": state.global_step, **figures, "scores": scores}) + "\n")
        if self.trainer is not None:
            should_log = control.should_log
            self.trainer.log(figures)
            # logging clears the flag, which would skip this step's loss on this process alone, and under
            # DDP the loss is gathered from every process: put it back
            control.should_log = should_log

    @torch.no_grad()
    def evaluate(self, model, processor) -> tuple[dict, dict | None]:
        """The scores over every question (`eval`'s `all` group) and the closed yes/no AUROC by P(yes),
        the model put back to training after."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under LoRA: adapters on
        was_training = base.training
        base.eval()
        answers, p_yes = {}, {}
        ranked = [r for r in self.records if self.rank_options and r.options]
        written = [r for r in self.records if not (self.rank_options and r.options)]
        try:
            for record, _, text, p in generate_answers(
                base, processor, written, self.prompt, self.batch_size, self.max_new_tokens, system=self.system
            ):
                answers[record.id] = text
                if p is not None:
                    p_yes[record.id] = p
            for record, _, text, _ in rank_options(
                base, processor, ranked, self.prompt, self.batch_size, system=self.system
            ):
                answers[record.id] = text
        finally:
            release_decoder(base)  # its KV cache is not held through training
            base.train(was_training)
        return score(self.records, answers)["all"], closed_auroc(self.records, p_yes)
