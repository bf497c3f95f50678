"""The RC comparison (tools/rc_compare.py) on the toy's long task: the mechanism, not the effect size.

A scripted teacher that works out three digits per call shows what the task is built for: one call
answers three of seven digits, an RC run carries the results through its summaries and reaches all
seven, and the report's mechanism numbers (per-turn scores, non-empty summaries, turns restating
their summary) say so. The shortened real run checks that the one command trains, evaluates every
model under both scaffolds and writes the table and the plot.
"""

import json
import os
import random
import subprocess
import sys

import pytest

from fakes import FakeEngine
from qedjax import toy
from qedjax.benchmarks import BenchmarkConfig
from qedjax.eval.run import EvalConfig, read_jsonl, run_eval
from qedjax.rewards import RuleGrader
from qedjax.rollout.engine import SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import rc_compare  # noqa: E402

WORK_PER_CALL = 3


def teacher(kind, text, params, index):
    """The long task's teacher, working at most WORK_PER_CALL digits per call (words are tokens)."""
    digits = toy.parse_problem(text)
    if kind == "rc_summarize":
        attempt = text.split("Reasoning of the latest attempt:", 1)[1].strip()
        return "<think> Summarising. </think> " + toy.so_far(toy.parse_found(attempt))
    known = []
    if kind == "rc_reason_summary":
        known = toy.parse_labelled(text.split("So far:", 1)[1].split(".", 1)[0])
    results = toy.target(digits)[len(known):len(known) + WORK_PER_CALL]
    thinking = toy.long_thinking(digits, known, results)
    return f"<think> {thinking} </think> " + toy.long_answer(known + results)


def test_long_task_data_teaches_turns_and_summaries(tmp_path):
    cfg = toy.ToyConfig(task="long", sft_rows=400, teacher_error_rate=0.0, summary_rows=0.5, summarize_rows=0.25)
    paths = toy.write_data(cfg, str(tmp_path))
    rows = [json.loads(line) for line in open(paths["sft"])]
    starts = [r for r in rows if r["problem"].startswith("Solve the problem")]
    continues = [r for r in rows if r["problem"].startswith("You have worked")]
    summaries = [r for r in rows if r["problem"].startswith("Write a short summary")]
    assert starts and continues and summaries
    for r in starts + continues:
        digits = toy.parse_problem(r["problem"])
        found = toy.parse_found(r["reasoning_content"])
        assert found == toy.target(digits)[:len(found)]  # no teacher errors here
        assert r["proof"] == toy.long_answer(found)
    for r in summaries:
        assert r["proof"].startswith("So far:")


def test_rc_carries_progress_that_one_call_cannot_make(tmp_path):
    cfg = toy.ToyConfig(task="long", sft_rows=4, rl_problems=4, eval_problems=6)
    paths = toy.write_data(cfg, str(tmp_path / "toy"))
    bench = BenchmarkConfig(path=paths["eval"], format="rules", name="toy-long")
    engine = FakeEngine(teacher)
    # the teacher's 3 digits of work (2 words each) plus the answer fit in 40 words
    base = EvalConfig(benchmark=bench, sampling=SamplingParams(max_new_tokens=40, temperature=1.0), grader="rule")
    out = {}
    for scaffold in ("single", "rc"):
        cfg_ = EvalConfig(**{**base.__dict__, "scaffold": scaffold})
        out[scaffold] = run_eval(cfg_, engine, RuleGrader(), tmp_path, label=f"teacher-{scaffold}")
    assert out["single"]["score"] == pytest.approx(100 * 3 / 7)
    assert out["rc"]["score"] == 100.0  # 3 turns: 3 + 3 + 1 digits
    assert out["rc"]["tokens_per_problem"] > out["single"]["tokens_per_problem"]
    from qedjax.benchmarks import load_benchmark

    problems = {p.id: p for p in load_benchmark(bench)}
    m = rc_compare.mechanism(read_jsonl(tmp_path / "eval" / "teacher-rc" / "samples.jsonl"), problems)
    assert [round(v, 1) for v in m["turn_scores"].values()] == [round(100 * 3 / 7, 1), round(100 * 6 / 7, 1), 100.0]
    assert m["summary_nonempty"] == {1: 1.0, 2: 1.0} and m["turn_truncated"] == {1: 0.0, 2: 0.0, 3: 0.0}
    assert m["restated_summary"] == m["continued_from_count"] == m["next_item_right"] == 1.0


def test_one_command_runs_the_comparison(tmp_path):
    """A shortened tools/rc_compare.py run: every stage runs and the report holds every number."""
    run_dir = tmp_path / "rc"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_COMPILATION_CACHE_DIR": os.path.join(ROOT, ".jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    args = [f"run.dir={run_dir}", "model.preset=tiny", "toy.vocab_size=512", "toy.sft_rows=64", "toy.rl_problems=8",
            "toy.eval_problems=4", "sft.steps=2", "sft.global_batch=4", "grpo.steps=1", "grpo.problems_per_step=2",
            "grpo.group_size=2", "grpo.sampling.max_new_tokens=8", "grpo.rc.summary_max_new_tokens=8",
            "eval.sampling.max_new_tokens=8", "eval.rc.summary_max_new_tokens=8", "eval.rc.turns=2", "eval.samples=1"]
    out = subprocess.run([sys.executable, "tools/rc_compare.py", "--seeds", "0", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1200)  # a hang guard
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((run_dir / "seed0" / "comparison.json").read_text())
    assert set(report["rows"]) == {f"{m}-{s}" for m in rc_compare.MODELS for s in rc_compare.SCAFFOLDS}
    for label, row in report["rows"].items():
        assert row["tokens_per_problem"] > 0 and 0 <= row["score"] <= 100
        if label.endswith("-rc"):
            assert list(row["turn_scores"]) == ["1", "2"] or list(row["turn_scores"]) == [1, 2]
            assert row["calls_per_problem"] == 3  # two turns and one summary
    t = report["training"]
    assert t["grpo"]["steps"] == t["grpo_rc"]["steps"] == 1
    assert t["grpo_rc"]["states_with_summary"] is not None and t["grpo"]["states_with_summary"] is None
    assert "rc: grpo_rc - grpo" in report["differences"]
    assert (run_dir / "seed0" / "eval" / "cost_vs_score.png").exists()
    assert (run_dir / "comparison.md").exists()
