"""The RL loop with a tiny model: sync and async modes, lag bounds, a failing judge, truncation."""

import http.server
import json
import threading

import pytest
import yaml

from qedjax import launch
from qedjax.metrics import read_metrics


def _config(tmp_path, name, **grpo):
    raw = {
        "run": {"dir": str(tmp_path / name), "seed": 0, "stages": ["grpo"]},
        "model": {"preset": "tiny"},
        "toy": {"sft_rows": 8, "rl_problems": 16, "eval_problems": 2},
        "grpo": {"init": "model", "steps": 3, "problems_per_step": 2, "group_size": 4,
                 "rc": {"enabled": True, "turns": 1, "states_per_problem": 2, "summary_max_new_tokens": 8},
                 "sampling": {"max_new_tokens": 12, "temperature": 1.0, "seed": 0},
                 "loss": {"clip_low": 0.2, "clip_high": 0.28},
                 "optim": {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0},
                 "checkpoint": {"every": 2, "keep": 1, "async_save": False}, **grpo},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path), tmp_path / name


def _grpo_rows(run_dir):
    return [r for r in read_metrics(str(run_dir), "grpo") if "reward_mean" in r]


@pytest.mark.slow
def test_sync_and_async_modes_run_and_lag_stays_bounded(tmp_path):
    path, run_dir = _config(tmp_path, "sync", rc={"enabled": True, "turns": 1, "states_per_problem": 2,
                                                  "summary_max_new_tokens": 8, "summarizer": "tiny"})
    launch.main(["--config", path])
    rows = _grpo_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # A summariser of its own (the "tiny" preset, its own random weights): 2 problems x 1 summary.
    assert all(r["summaries_attempted"] == 2 for r in rows)
    assert all(r["lag_max"] == 0 for r in rows)
    assert all(len(r["score_hist"]) == 8 and sum(r["score_hist"]) == 2 * 2 * 4 for r in rows)
    path, run_dir = _config(tmp_path, "async", mode="async", max_lag=1, steps=4)
    launch.main(["--config", path])
    rows = _grpo_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert max(r["lag_max"] for r in rows) <= 1
    assert all(r["dropped_stale"] == 0 for r in rows)
    # Resuming a finished stage does nothing.
    launch.main(["--config", path])
    assert len(_grpo_rows(run_dir)) == 4


def _rollouts_at(version: int):
    from qedjax.rollout.engine import Completion
    from qedjax.rollout.groups import Rollouts
    from qedjax.rollout.rc import RCState

    done = Completion("x", (1,), (0.0,), "stop", (1,), policy_version=version)
    return Rollouts(version=version, states=[RCState("p")], completions=[[done]], grades=[[]], summary_tokens=[],
                    times={}, problems=[None])


@pytest.mark.parametrize("max_lag", [0, 1, 5])
def test_async_producer_starts_no_batch_it_would_drop(max_lag):
    """A producer faster than the trainer: before every train step the test waits until the producer
    has started every batch it may (it then blocks), so it runs as far ahead as it ever can. No
    batch is stale when the trainer reaches it, and the lag reaches max_lag but never passes it."""
    import time

    from qedjax.rl import Producer, drop_stale

    version, made = 0, []
    producer = Producer(lambda: made.append(version) or _rollouts_at(version), max_lag)
    producer.start()
    dropped, lags = 0, []
    try:
        for step in range(23):
            ro = producer.get()
            deadline = time.monotonic() + 600  # a hang guard, not a measurement
            while len(made) < step + 1 + max_lag and time.monotonic() < deadline:
                time.sleep(0.001)
            assert len(made) == step + 1 + max_lag  # as far ahead as allowed, and no further
            ro, stale = drop_stale(ro, version, max_lag)
            dropped += stale
            lags += [version - c.policy_version for group in ro.completions for c in group]
            version += 1  # trained and published
    finally:
        producer.stop()
    assert dropped == 0
    assert max(lags) == max_lag and min(lags) >= 0


class _FlakyJudge:
    """OpenAI-compatible chat endpoint: every third request fails with HTTP 500, others score 5."""

    def __init__(self):
        self.count = 0
        self.lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # the model list the launcher's preflight asks for (none named: any model)
                body = json.dumps({"object": "list", "data": []}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                with owner.lock:
                    owner.count += 1
                    fail = owner.count % 3 == 0
                body = json.dumps({"choices": [{"message": {"content": "<score>5</score>"}}]}).encode()
                self.send_response(500 if fail else 200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()


def test_failing_judge_costs_only_its_samples_and_truncation_is_counted(tmp_path):
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"id": str(i), "problem": f"Show that {i} + 0 = {i}.",
                                            "marking_scheme": "7 points: a correct proof."}) + "\n"
                                for i in range(6)))
    judge = _FlakyJudge()
    try:
        path, run_dir = _config(tmp_path, "judge", grader="judge", steps=2, rc={"enabled": False},
                                problems={"path": str(problems), "format": "proofbench"},
                                sampling={"max_new_tokens": 4, "temperature": 1.0, "seed": 0})
        raw = yaml.safe_load(open(path))
        raw["judge"] = {"base_url": judge.url, "model": "judge", "max_retries": 0, "timeout_s": 10,
                        "backoff_s": 0.0, "concurrency": 4}
        raw.pop("toy")
        raw["model"]["tokenizer"] = str(_tokenizer(tmp_path))
        open(path, "w").write(yaml.safe_dump(raw))
        launch.main(["--config", path])
    finally:
        judge.close()
    rows = _grpo_rows(run_dir)
    assert len(rows) == 2
    # 4 new tokens never close the think block: every rollout is truncated, rewarded 0, never judged.
    assert all(r["truncation_rate"] == 1.0 and r["reward_mean"] == 0.0 for r in rows)
    assert all(r["grader_truncated"] == 8 for r in rows) and judge.count == 0
    # With room to answer, the judge is called: one in three calls fails, only those score 0.
    path2, run_dir2 = _config(tmp_path, "judge2", grader="judge", steps=2, rc={"enabled": False},
                              problems={"path": str(problems), "format": "proofbench"},
                              sampling={"max_new_tokens": 12, "temperature": 1.0, "seed": 0})
    raw["run"]["dir"] = str(run_dir2)
    raw["grpo"]["sampling"]["max_new_tokens"] = 12
    judge = _FlakyJudge()
    raw["judge"]["base_url"] = judge.url
    open(path2, "w").write(yaml.safe_dump(raw))
    try:
        _force_answers(lambda: launch.main(["--config", path2]))
    finally:
        judge.close()
    rows = _grpo_rows(run_dir2)
    failed = sum(r.get("grader_judge_error", 0) for r in rows)
    assert judge.count == 16 and failed == judge.count // 3
    for r in rows:
        ok = 8 - r.get("grader_judge_error", 0)
        assert r["reward_mean"] == pytest.approx(ok * (5 / 7) / 8)


def _tokenizer(tmp_path):
    from qedjax import toy

    out = tmp_path / "tok"
    if not out.exists():
        toy.build_tokenizer(str(out), vocab_size=512)
    return out


def _force_answers(fn):
    """Runs fn with an engine whose completions are complete answers (closed think block, stop)."""
    import dataclasses

    from qedjax.rollout import jax_engine

    real = jax_engine.JaxEngine.generate
    made = []

    def generate(self, requests, params, seeds=None):
        out = real(self, requests, params, seeds)
        made.extend(out)  # each answer distinct, so the judge's reply cache never answers for the server
        return [dataclasses.replace(c, text=f"<think>\nok\n</think>\n\nProof number {len(made) + i}.",
                                    finish_reason="stop") for i, c in enumerate(out)]

    jax_engine.JaxEngine.generate = generate
    try:
        return fn()
    finally:
        jax_engine.JaxEngine.generate = real
