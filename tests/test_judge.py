"""LLaVA-Med's visual-chat evaluation: the model answers LLaVA-Med's chat questions, a judge LLM grades
each answer and the reference from the figure's caption, and the relative score is reported by
question type and image domain. The judge here is a local server speaking the OpenAI and Anthropic
wire protocols that grades by a rule: the share of an answer's words the caption holds."""

import asyncio
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import chat_reply, send_json
from llama3med.checkpoints import DEMO_MODEL_DIR
from llama3med.cli import main
from llama3med.data.phantoms import write_phantom_set
from llama3med.datagen import AnthropicTeacher, OpenAITeacher, RetryPolicy
from llama3med.eval.judge import (
    BadReview,
    judge_answers,
    parse_scores,
    read_chat_questions,
    summarize_reviews,
)

SECRET = "sk-judge-DO-NOT-LEAK"


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def rule_score(answer: str, caption: str) -> int:
    """The judge's grade: 1 plus 9 times the share of the answer's words that the caption holds."""
    said, known = words(answer), set(words(caption))
    return 1 + round(9 * sum(w in known for w in said) / len(said)) if said else 1


def between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0].strip()


class JudgeServer(ThreadingHTTPServer):
    """Grades the two answers in each prompt by `rule_score`; `bias` is added to Assistant 1's grade
    (a judge's taste for the first position); a question holding CASE:garbage gets a reply without
    scores and one holding CASE:ratelimited a 429 the first time."""

    daemon_threads = True

    def __init__(self, bias: int = 0):
        super().__init__(("127.0.0.1", 0), JudgeHandler)
        self.bias = bias
        self.requests: list[dict] = []
        self.limited: set[str] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class JudgeHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        server: JudgeServer = self.server
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        prompt = body["messages"][-1]["content"]
        question = between(prompt, "[Question]", "[Assistant 1]")
        with server.lock:
            server.requests.append(body)
            first_time = question not in server.limited
            server.limited.add(question)
        if "CASE:ratelimited" in question and first_time:
            return self.reply(
                429, {"error": {"type": "rate_limit_error", "message": "slow down"}}, {"retry-after": "0"}
            )
        caption = between(prompt, "Caption:", "\n")
        first = rule_score(between(prompt, "[Assistant 1]", "[End of Assistant 1]"), caption)
        second = rule_score(between(prompt, "[Assistant 2]", "[End of Assistant 2]"), caption)
        text = f"{min(10, first + server.bias)} {second}\nAssistant 1 says more of what the caption says."
        if "CASE:garbage" in question:
            text = "Both answers are fine."
        payload = chat_reply(self.path, body["model"], text, 300, 20)
        self.reply(200, payload)

    def reply(self, status: int, payload: dict, headers: dict | None = None):
        send_json(self, status, payload, headers)


@pytest.fixture()
def judge_server():
    server = JudgeServer()
    yield server
    server.shutdown()


def chat_question(qid, image, text, reference, caption, kind, domain, **extra):
    """A record as LLaVA-Med's llava_med_eval_qa50_qa.jsonl writes it."""
    flags = {name: name == domain for name in ("chest_xray", "mri", "histology", "gross", "ct_scan")}
    record = {"question_id": qid, "pair_id": f"PMC{qid}_F1", "image": image, "text": text}
    record |= {"gpt4_answer": reference, "fig_label": "Figure 1", "fig_caption": caption, "type": kind}
    return record | {"in_text_mention": f"Case {qid} is shown in Figure 1.", "domain": flags} | extra


def write_chat_questions(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def phantom_chat_questions(folder, n: int = 4) -> list[dict]:
    """Per phantom: a detailed description (reference: its caption) and a conversation question."""
    write_phantom_set(folder, n=n, seed=3, size=96, image_format="png")
    truth = [json.loads(line) for line in (folder / "phantoms.jsonl").read_text().splitlines()]
    captions = json.loads((folder / "captions.json").read_text())
    records = []
    for index, (phantom, captioned) in enumerate(zip(truth, captions, strict=True)):
        caption = captioned["conversations"][1]["value"]
        domain = "ct_scan" if phantom["modality"] == "CT" else "mri"
        modality = "CT" if phantom["modality"] == "CT" else "MRI"
        records.append(
            chat_question(
                2 * index, phantom["image"], "Describe the image.", caption, caption, "detailed_description", domain
            )
        )
        records.append(
            chat_question(
                2 * index + 1,
                phantom["image"],
                "Which modality was used, CT or MRI?",
                f"This is an axial {modality} image.",
                caption,
                "conversation",
                domain,
            )
        )
    return records


def test_llava_med_s_chat_questions_read_as_published(tmp_path):
    path = tmp_path / "qa50.jsonl"
    record = chat_question(7, "a.jpg", "<image>\nWhat is shown?", "A cyst.", "CT of a renal cyst.", "conversation", "")
    record["domain"] = {"chest_xray": False, "mri": True, "histology": False, "gross": False, "ct_scan": True}
    write_chat_questions(path, [record])

    (question,) = read_chat_questions(path)
    assert question.id == "7" and question.question == "What is shown?" and question.reference == "A cyst."
    assert question.caption == "Figure 1: CT of a renal cyst."
    assert question.context == "Case 7 is shown in Figure 1."
    assert question.type == "conversation" and question.domain == "mri"  # its summary takes the first flagged

    write_chat_questions(path, [{**record, "gpt4_answer": " "}])
    with pytest.raises(ValueError, match=r"qa50.jsonl: record 7: needs 'gpt4_answer'"):
        read_chat_questions(path)
    write_chat_questions(path, [record, record])
    with pytest.raises(ValueError, match="record 7: duplicate question_id"):
        read_chat_questions(path)


def test_a_judge_s_two_scores_are_read_from_its_first_line_as_judges_write_them():
    assert parse_scores("8 6\nAssistant 1 is more precise.") == (8.0, 6.0)
    assert parse_scores("\n7.5, 9\n") == (7.5, 9.0)
    assert parse_scores("Assistant 1: 8 Assistant 2: 3") == (8.0, 3.0)
    for reply in ("Both are good.", "8\n6", "8 6 7", "0 5", "8 11"):
        with pytest.raises(BadReview):
            parse_scores(reply)


def test_the_relative_score_is_the_mean_ratio_by_type_domain_and_overall():
    def review(qid, kind, domain, reference, model, order="reference_first"):
        return {"question_id": qid, "type": kind, "domain": domain, "order": order} | {
            "reference_score": reference,
            "model_score": model,
        }

    reviews = [
        review("0", "conversation", "ct_scan", 8, 4),
        review("1", "conversation", "mri", 5, 5),
        review("2", "detailed_description", "ct_scan", 10, 8),
        review("2", "detailed_description", "ct_scan", 6, 8, order="model_first"),  # averaged: 8 and 8
    ]
    summary = summarize_reviews(reviews)
    assert list(summary) == ["conversation", "detailed_description", "mri", "ct_scan", "overall"]
    assert summary["conversation"] == {"n": 2, "reference_score": 6.5, "model_score": 4.5, "relative_score": 75.0}
    assert summary["detailed_description"]["relative_score"] == 100.0
    assert summary["ct_scan"]["relative_score"] == 75.0  # (4/8 + 8/8) / 2, not 12/18
    assert summary["overall"]["n"] == 3 and summary["overall"]["relative_score"] == pytest.approx(250 / 3)


def test_the_demo_model_s_answers_are_judged_resumably_and_summarised(judge_server, tmp_path, capsys):
    records = phantom_chat_questions(tmp_path / "data")
    records[1]["text"] += " CASE:ratelimited"
    records[3]["text"] += " CASE:garbage"
    questions = tmp_path / "data" / "qa50.jsonl"
    write_chat_questions(questions, records)
    answers = tmp_path / "answers"
    assert (
        main(
            ["answer", str(questions), "--model", str(DEMO_MODEL_DIR), "--out", str(answers), "--max-new-tokens", "40"]
        )
        == 0
    )
    given = {str(r["question_id"]): r["text"] for r in map(json.loads, (answers / "answers.jsonl").open())}
    out = tmp_path / "judged"
    judge = ["judge", str(questions), "--answers", str(answers), "--out", str(out), "--judge-model", "judge-llm"]
    judge += ["--base-url", f"{judge_server.url}/v1", "--api-key", SECRET, "--concurrency", "3"]
    capsys.readouterr()

    assert main(judge) == 0
    printed = capsys.readouterr()
    assert "reviewed 7 of 8 questions" in printed.err and "1 replies without readable scores" in printed.err
    first = judge_server.requests[0]
    assert first["model"] == "judge-llm" and first["temperature"] == 0.0  # greedy: a rerun grades alike
    record = records[2]  # the second phantom's description
    prompt = next(r["messages"][-1]["content"] for r in judge_server.requests if "Case 2 " in str(r["messages"]))
    assert f"Caption: Figure 1: {record['fig_caption']}\nMentioned in the article: Case 2 is shown" in prompt
    assert between(prompt, "[Assistant 1]", "[End of Assistant 1]") == record["gpt4_answer"]  # reference first
    assert between(prompt, "[Assistant 2]", "[End of Assistant 2]") == given[str(record["question_id"])]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["judge"] == "judge-llm" and summary["reviewed"] == 7 and summary["rejected"] == 1
    graded = [r for r in records if "garbage" not in r["text"]]
    ratios = {
        str(r["question_id"]): rule_score(given[str(r["question_id"])], f"Figure 1: {r['fig_caption']}")
        / rule_score(r["gpt4_answer"], f"Figure 1: {r['fig_caption']}")
        for r in graded
    }
    overall = summary["groups"]["overall"]
    assert overall["n"] == 7 and overall["relative_score"] == pytest.approx(100 * sum(ratios.values()) / 7)
    descriptions = [str(r["question_id"]) for r in graded if r["type"] == "detailed_description"]
    assert summary["groups"]["detailed_description"]["relative_score"] == pytest.approx(
        100 * sum(ratios[q] for q in descriptions) / len(descriptions)
    )
    assert f"{'overall':<22}{7:>5}" in printed.out and f"{overall['relative_score']:.1f}" in printed.out

    asked = len(judge_server.requests)
    assert main([*judge, "--json"]) == 0  # resumed: everything is reviewed or rejected, nothing asked again
    assert len(judge_server.requests) == asked
    assert json.loads(capsys.readouterr().out)["groups"] == summary["groups"]
    for path in out.iterdir():
        assert SECRET not in path.read_text()
    assert main([a.replace("judge-llm", "another-llm") for a in judge]) == 1  # one judge per --out
    assert "its reviews were made with other settings (judge_model 'judge-llm' -> 'another-llm')" in (
        capsys.readouterr().err
    )

    rows = [json.loads(line) for line in (answers / "answers.jsonl").read_text().splitlines()]
    rows[0]["text"] = "Something else entirely."
    (answers / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(judge) == 1
    assert "review of question 0 graded another answer" in capsys.readouterr().err
    (answers / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))
    assert main([*judge[:4], "--out", str(tmp_path / "fresh"), *judge[6:]]) == 1
    assert "no answer to 1 of 8 questions (first: 0)" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_judging_in_both_orders_cancels_a_judge_s_taste_for_the_first_answer(kind, tmp_path):
    caption = "Axial CT of the abdomen showing a large lesion in the liver."
    records = [
        chat_question(i, "a.png", f"Question {i}?", reference, caption, "conversation", "ct_scan")
        for i, reference in enumerate(["A large lesion in the liver.", "An axial CT with a liver lesion."])
    ]
    write_chat_questions(tmp_path / "qa50.jsonl", records)
    questions = read_chat_questions(tmp_path / "qa50.jsonl")
    answers = {q.id: q.reference for q in questions}  # the model answers exactly as the reference does
    server = JudgeServer(bias=2)
    try:
        if kind == "openai":
            judge = OpenAITeacher(model="judge-llm", api_key=SECRET, base_url=f"{server.url}/v1")
        else:
            judge = AnthropicTeacher(model="judge-llm", api_key=SECRET, base_url=server.url)

        def relative(out: str, both: bool) -> float:
            asyncio.run(
                judge_answers(questions, answers, tmp_path / out, judge, both, retry=RetryPolicy(0), progress=False)
            )
            rows = [json.loads(line) for line in (tmp_path / out).read_text().splitlines()]
            return summarize_reviews(rows)["overall"]["relative_score"]

        assert relative("one.jsonl", both=False) < 100  # the reference, shown first, is favoured
        assert relative("both.jsonl", both=True) == 100.0
        sampled = [request.get("temperature") for request in server.requests]
        assert sampled == [0.0] * 6 if kind == "openai" else [None] * 6  # Anthropic's API takes none
        assert len(server.requests) == 2 + 4
    finally:
        server.shutdown()
