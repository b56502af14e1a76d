"""MT-Bench judging against a real HTTP server on loopback that speaks the OpenAI chat-completions API."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import fail

from fanlora.cli import main
from fanlora.evaluation.judge import rating, verdict


class FakeJudge:
    """Answers like a judge: 'Rating: [[7]]' for a good answer, [[2]] otherwise; pairwise prefers 'good'."""

    def __init__(self, mode: str = "judge") -> None:
        self.mode, self.requests = mode, []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append(body)
                user = body["messages"][-1]["content"]
                text = judge.reply(user)
                out = json.dumps(
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
                        ],
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reply(self, user: str) -> str:
        if self.mode == "nonsense":
            return "I like turtles."
        if "[The Start of Assistant A's Answer]" in user or "### Assistant A:" in user:
            if "Assistant B" not in user:  # single multi-turn template names the assistant "A"
                return "Fine. Rating: [[7]]" if "good" in user.split("### Assistant A:")[-1] else "Rating: [[2]]"
            if "[The Start of Assistant A's Answer]\n" in user:
                first_a = user.split("[The Start of Assistant A's Answer]\n")[1]
            else:
                first_a = user.split("### Assistant A:\n")[-1]
            return "[[A]]" if first_a.startswith("good") else "[[B]]"
        answer = user.split("[The Start of Assistant's Answer]\n")[-1]
        return "Explanation. Rating: [[7]]" if answer.startswith("good") else "Rating: [[2]]"

    def close(self) -> None:
        self.server.shutdown()


def answers(directory: Path, text: str, n: int = 3) -> Path:
    """An answers directory as `fanlora evaluate --task mtbench` writes it (first n questions)."""
    directory.mkdir(parents=True)
    qs = [
        json.loads(line)
        for line in (Path(__file__).parent.parent / "fanlora/bundled/mt_bench/question.jsonl")
        .read_text()
        .splitlines()[:n]
    ]
    with open(directory / "predictions.jsonl", "w") as fh:
        for q in qs:
            fh.write(
                json.dumps(
                    {
                        "question_id": q["question_id"],
                        "category": q["category"],
                        "turns": q["turns"],
                        "choices": [{"index": 0, "turns": [f"{text} one", f"{text} two"]}],
                    }
                )
                + "\n"
            )
    (directory / "metrics.json").write_text(json.dumps({"task": "mtbench", "answers": n}))
    return directory


@pytest.fixture
def judge():
    j = FakeJudge()
    yield j
    j.close()


def test_parsers():
    assert rating("The answer is fine. Rating: [[7]]") == 7.0
    assert rating("Rating: [8.5]") == 8.5
    assert rating("no rating") is None and rating("Rating: [[42]]") is None
    assert verdict("... [[A]]") == "A" and verdict("[[C]]") == "tie" and verdict("hmm") is None


def test_grading_scores_every_turn_and_resumes(judge, tmp_path, capsys):
    good = answers(tmp_path / "good", "good")
    argv = ["judge", "--answers", str(good), "--judge-url", judge.url, "--judge-model", "j"]
    assert main(argv) == 0
    m = json.loads((good / "judge_metrics.json").read_text())
    assert m["score"] == 7.0 and m["judged"] == 6 and m["unrated"] == 0 and m["score_turn2"] == 7.0
    assert "RESULT mtbench_score=7.0000" in capsys.readouterr().out
    assert len(judge.requests) == 6 and judge.requests[0]["temperature"] == 0.0
    # a second run finds every judgment on disk and asks nothing
    lines = (good / "judgments.jsonl").read_text().splitlines()
    (good / "judgments.jsonl").write_text("\n".join(lines[:4]) + "\n")  # as if killed after 4
    assert main(argv) == 0
    assert len(judge.requests) == 8


def test_another_judge_is_asked_and_a_line_cut_by_a_kill_is_redone(judge, tmp_path):
    good = answers(tmp_path / "good", "good")
    argv = ["judge", "--answers", str(good), "--judge-url", judge.url]
    assert main([*argv, "--judge-model", "judge-a"]) == 0 and len(judge.requests) == 6
    assert main([*argv, "--judge-model", "judge-b"]) == 0 and len(judge.requests) == 12  # b is asked itself
    m = json.loads((good / "judge_metrics.json").read_text())
    assert m["judge"] == "judge-b" and m["judged"] == 6
    path = good / "judgments.jsonl"
    lines = path.read_text().splitlines()
    assert {json.loads(x)["judge"] for x in lines} == {"judge-a", "judge-b"}
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:25])  # killed while writing the last line
    assert main([*argv, "--judge-model", "judge-b"]) == 0
    assert len(judge.requests) == 13  # only the cut judgment is asked again
    assert all(json.loads(x) for x in path.read_text().splitlines())


def test_pairwise_judges_both_orders(judge, tmp_path):
    good, bad = answers(tmp_path / "good", "good"), answers(tmp_path / "bad", "bad")
    out = tmp_path / "pair"
    argv = [
        "judge",
        "--answers",
        str(good),
        "--against",
        str(bad),
        "--judge-url",
        judge.url,
        "--judge-model",
        "j",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    m = json.loads((out / "pairwise_metrics.json").read_text())
    assert (m["wins_a"], m["wins_b"], m["ties"]) == (6, 0, 0) and len(judge.requests) == 12


def test_unreachable_or_nonsense_judge_exits_2_and_keeps_answers(tmp_path, capsys):
    good = answers(tmp_path / "good", "good")
    before = (good / "predictions.jsonl").read_bytes()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    err = fail(
        capsys,
        [
            "judge",
            "--answers",
            str(good),
            "--judge-url",
            f"http://127.0.0.1:{port}/v1",
            "--judge-model",
            "j",
            "--timeout",
            "2",
        ],
    )
    assert "cannot be reached" in err and "are kept" in err
    nonsense = FakeJudge("nonsense")
    try:
        err = fail(capsys, ["judge", "--answers", str(good), "--judge-url", nonsense.url, "--judge-model", "j"])
    finally:
        nonsense.close()
    assert "has no rating" in err and "answers are kept" in err
    assert (good / "predictions.jsonl").read_bytes() == before and not (good / "judge_metrics.json").exists()
    err = fail(
        capsys, ["judge", "--answers", str(tmp_path / "none"), "--judge-url", "http://x/v1", "--judge-model", "j"]
    )
    assert "holds no MT-Bench answers" in err
