"""The eval run: grading, report files, resuming after interruptions, configs, the AnswerBench oracle."""

import csv
import json
import re
from pathlib import Path

import pytest
import yaml
from fakes import FakeEngine, FakeGrader
from qedjax.benchmarks import IMOBENCH_DIR as IMOBENCH

from qedjax.benchmarks import BenchmarkConfig, load_benchmark
from qedjax.eval.run import EvalConfig, read_jsonl, run_eval
from qedjax.eval.scaffolds import RCConfig
from qedjax.rewards import AnswerGrader, Grade
from qedjax.rollout.engine import SamplingParams

REPO = Path(__file__).resolve().parents[1]
SAMPLING = SamplingParams(max_new_tokens=40, temperature=0.7, seed=3)


def write_answer_csv(path: Path, n: int = 6) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Problem ID", "Problem", "Short Answer", "Category"])
        for i in range(n):
            category = "Algebra" if i % 2 else "Geometry"
            writer.writerow([f"q{i}", f"Problem P{i}: compute {i} + 0.", str(i), category])
    return str(path)


def answering(kind, text, params, index):
    """Right for even problems, wrong for odd ones; the seed shows in the thinking."""
    i = int(re.search(r"Problem P(\d+)", text).group(1))
    answer = i if i % 2 == 0 else i + 100
    return f"<think>seed {params.seed}</think> The answer is \\boxed{{{answer}}}."


def by_answer(item):
    """A fake answer grader: 7 when the boxed answer equals the gold one."""
    boxed = re.search(r"\\boxed\{(\d+)\}", item.response).group(1)
    return 7.0 if boxed == item.references["answer"] else 0.0


def config(path: str, **kwargs) -> EvalConfig:
    bench = BenchmarkConfig(path=path, format="imo-answerbench")
    fields = dict(benchmark=bench, sampling=SAMPLING, samples=2, batch_size=4, grader="answer")
    fields.update(kwargs)
    return EvalConfig(**fields)


def test_run_eval_grades_and_reports(tmp_path):
    cfg = config(write_answer_csv(tmp_path / "a.csv"))
    engine, grader = FakeEngine(answering), FakeGrader(by_answer)
    summary = run_eval(cfg, engine, grader, tmp_path / "run", label="single")

    out = tmp_path / "run" / "eval" / "single"
    records = read_jsonl(out / "samples.jsonl")
    assert len(records) == 12 and len({r["key"] for r in records}) == 12
    assert [len(batch) for batch, _ in engine.calls] == [4, 4, 4]
    # The policy saw the boxed-answer instruction; the grader saw the plain problem and gold answer.
    assert all("\\boxed{...}" in text for _, text in engine.requests)
    assert grader.items[0].problem == "Problem P0: compute 0 + 0."
    assert grader.items[0].references == {"answer": "0"}
    first = records[0]
    fields = ("response", "score", "reward", "reason", "tokens", "calls", "lengths", "category", "sample")
    assert all(field in first for field in fields)
    assert summary["score"] == pytest.approx(50.0)
    assert summary["by_group"]["category=Geometry"]["score"] == 100.0  # even problems
    assert summary["by_group"]["category=Algebra"]["score"] == 0.0
    assert summary["stderr"] == pytest.approx(100 * (12 / 11 * 0.25) ** 0.5 / 12**0.5)
    assert summary["stderr_runs"] == 0.0  # both passes score 50%
    assert summary["tokens_per_problem"] == pytest.approx(sum(r["tokens"] for r in records) / 12)
    assert summary["length"]["response"]["n"] == 12
    for name in ("summary.json", "summary.md", "cost_vs_score.png", "config.json"):
        assert (out / name).exists()
    assert (tmp_path / "run" / "eval" / "cost_vs_score.png").exists()
    assert "| category=Algebra | 6 | 0.0 |" in (out / "summary.md").read_text()


def test_length_explosion_is_visible(tmp_path):
    def rambling(kind, text, params, index):
        return "<think>" + "again " * 100 if index % 2 else "<think>ok</think> \\boxed{0}"

    cfg = config(write_answer_csv(tmp_path / "a.csv"), samples=1)
    summary = run_eval(cfg, FakeEngine(rambling), FakeGrader(lambda item: 0.0), tmp_path / "run")
    length = summary["length"]
    assert length["completion"]["at_limit"] == pytest.approx(0.5)
    assert length["truncated_share"] == pytest.approx(0.5)
    assert length["response"]["max"] == SAMPLING.max_new_tokens


def test_interrupted_eval_resumes_without_repeating_work(tmp_path):
    path = write_answer_csv(tmp_path / "a.csv")
    cfg = config(path)
    reference = run_eval(cfg, FakeEngine(answering), FakeGrader(by_answer), tmp_path / "ref")

    # Killed during the second chunk's generation.
    with pytest.raises(RuntimeError, match="killed"):
        run_eval(cfg, FakeEngine(answering, fail_on_call=1), FakeGrader(by_answer), tmp_path / "run")
    assert len(read_jsonl(tmp_path / "run/eval/eval/samples.jsonl")) == 4

    # Killed while grading the second chunk (its responses are already stored).
    class DyingGrader(FakeGrader):
        def grade(self, items):
            if self.calls == 0:
                raise KeyboardInterrupt
            return super().grade(items)

    engine = FakeEngine(answering)
    with pytest.raises(KeyboardInterrupt):
        run_eval(cfg, engine, DyingGrader(by_answer), tmp_path / "run")
    assert len(engine.requests) == 4  # only the second chunk was generated
    assert len(read_jsonl(tmp_path / "run/eval/eval/responses.jsonl")) == 8

    engine, grader = FakeEngine(answering), FakeGrader(by_answer)
    resumed = run_eval(cfg, engine, grader, tmp_path / "run")
    assert len(engine.requests) == 4  # only the third chunk is generated
    assert len(grader.items) == 8  # chunks two and three are graded; chunk one is not regraded
    assert resumed == {**reference, "label": resumed["label"]}
    ref_records = {r["key"]: r for r in read_jsonl(tmp_path / "ref/eval/eval/samples.jsonl")}
    got_records = {r["key"]: r for r in read_jsonl(tmp_path / "run/eval/eval/samples.jsonl")}
    assert got_records == ref_records  # same seeds per chunk: the same responses as an unbroken run

    # Everything done: a rerun costs nothing.
    engine, grader = FakeEngine(answering), FakeGrader(by_answer)
    assert run_eval(cfg, engine, grader, tmp_path / "run") == resumed
    assert engine.calls == [] and grader.items == []


def test_transient_grading_failures_are_regraded_on_resume(tmp_path):
    cfg = config(write_answer_csv(tmp_path / "a.csv"), samples=1)
    def flaky_score(item):
        return Grade(0.0, 0.0, "judge_error") if "P3" in item.problem else by_answer(item)

    flaky = FakeGrader(flaky_score)
    first = run_eval(cfg, FakeEngine(answering), flaky, tmp_path / "run")
    assert first["reasons"] == {"ok": 5, "judge_error": 1}

    engine, grader = FakeEngine(answering), FakeGrader(by_answer)
    second = run_eval(cfg, engine, grader, tmp_path / "run")
    assert engine.calls == []  # nothing is generated again
    assert [item.problem for item in grader.items] == ["Problem P3: compute 3 + 0."]
    assert second["reasons"] == {"ok": 6} and second["n"] == 6


def test_resuming_with_another_config_is_refused(tmp_path):
    path = write_answer_csv(tmp_path / "a.csv")
    run_eval(config(path, samples=1), FakeEngine(answering), FakeGrader(by_answer), tmp_path / "run")
    with pytest.raises(ValueError, match="different eval config"):
        other = config(path, samples=1, scaffold="rc")
        run_eval(other, FakeEngine(answering), FakeGrader(by_answer), tmp_path / "run")


def test_scaffolds_share_the_cost_plot(tmp_path):
    path = write_answer_csv(tmp_path / "a.csv")
    for scaffold in ("single", "rc"):
        run_eval(config(path, samples=1, scaffold=scaffold), FakeEngine(answering), FakeGrader(by_answer),
                 tmp_path / "run", label=scaffold)
    summaries = [json.loads(p.read_text()) for p in sorted((tmp_path / "run/eval").glob("*/summary.json"))]
    assert [s["scaffold"] for s in summaries] == ["rc", "single"]
    rc, single = summaries
    assert rc["calls_per_problem"] == 5 and single["calls_per_problem"] == 1
    assert rc["tokens_per_problem"] > single["tokens_per_problem"]


def test_answers_rejected_by_the_check_can_be_confirmed_by_the_judge(tmp_path):
    cfg = config(write_answer_csv(tmp_path / "a.csv"), samples=1, confirm_with_judge=True)
    assert cfg.judge_style == "proofbench"
    judge = FakeGrader(lambda item: 7.0 if item.references["solution"] == "1" else 0.0)
    summary = run_eval(cfg, FakeEngine(answering), FakeGrader(by_answer), tmp_path / "run", judge=judge)
    # Only the three rejected answers go to the judge, with the gold answer as the reference.
    assert sorted(item.references["solution"] for item in judge.items) == ["1", "3", "5"]
    assert all("equivalent" in item.references["guidelines"] for item in judge.items)
    records = {r["id"]: r for r in read_jsonl(tmp_path / "run/eval/eval/samples.jsonl")}
    assert records["q1"]["score"] == 7.0 and records["q1"]["judge_confirmed"]
    assert records["q3"]["score"] == 0.0 and not records["q3"]["judge_confirmed"]
    assert summary["score"] == pytest.approx(100 * 4 / 6)
    with pytest.raises(ValueError, match="needs a judge"):
        run_eval(cfg, FakeEngine(answering), FakeGrader(by_answer), tmp_path / "other")


@pytest.mark.parametrize("name", ["eval-imo-proofbench.yaml", "eval-imo-answerbench.yaml"])
def test_yaml_configs_build_an_eval_config(name):
    from qedjax.config_io import build

    raw = yaml.safe_load((REPO / "configs" / name).read_text())
    cfg = build(EvalConfig, raw["eval"], "eval.")
    assert isinstance(cfg, EvalConfig)
    assert cfg.rc.turns == 3 and (cfg.rsa.population, cfg.rsa.block, cfg.rsa.rounds) == (8, 3, 3)
    dsm = cfg.dsm
    assert (dsm.pool, dsm.verifications, dsm.refine_top, dsm.worst_analyses, dsm.rounds) == (4, 4, 4, 2, 2)
    assert cfg.sampling.max_new_tokens == 49152 and cfg.grader in ("judge", "answer")
    # no path: the IMO-Bench CSV shipped with the package
    assert Path(cfg.benchmark.path).parent == IMOBENCH
    assert len(load_benchmark(cfg.benchmark)) == {"imo-proofbench": 60, "imo-answerbench": 400}[cfg.benchmark.format]


def test_answerbench_oracle_scores_the_gold_answers(tmp_path):
    """The harness end to end with the real answer grader: answering with the gold answer itself
    must score (nearly) 100%, or the loader, the prompts or the grading lose answers on the way."""
    bench = BenchmarkConfig(path=str(IMOBENCH / "answerbench_v2.csv"), format="imo-answerbench")
    gold = {p.problem: p.references["answer"] for p in load_benchmark(bench)}

    def oracle(kind, text, params, index):
        statement = text.split("Problem:\n", 1)[1].rsplit("\n\nAt the end", 1)[0]
        answer = gold[statement].strip().strip("$").strip().rstrip(".")
        return f"<think>known</think> The answer is $\\boxed{{{answer}}}$."

    sampling = SamplingParams(max_new_tokens=10_000)
    cfg = EvalConfig(benchmark=bench, sampling=sampling, batch_size=400, grader="answer")
    grader = AnswerGrader(timeout_s=20.0)
    summary = run_eval(cfg, FakeEngine(oracle), grader, tmp_path / "run", label="oracle")
    assert summary["n"] == 400
    assert summary["score"] >= 95.0, summary["reasons"]


def toy_digits(text: str) -> list[int]:
    return [int(d) for d in re.search(r"Add one to each digit: ([\d ]+)", text).group(1).split()]


def test_tiny_eval_on_the_demo_task(tmp_path):
    """The main job's tiny eval: the demo's eval.jsonl, format "rules", graded by the RuleGrader."""
    from qedjax import toy
    from qedjax.rewards import RuleGrader

    paths = toy.write_data(toy.ToyConfig(sft_rows=4, rl_problems=4, eval_problems=6), str(tmp_path / "toy"))

    def solve(kind, text, params, index):
        digits = toy_digits(text)
        return "<think>add one to each</think>\nAnswer: " + " ".join(str((d + 1) % 10) for d in digits)

    bench = BenchmarkConfig(path=paths["eval"], format="rules", name="toy")
    cfg = EvalConfig(benchmark=bench, scaffold="rc", rc=RCConfig(turns=2), sampling=SAMPLING, grader="rule")
    summary = run_eval(cfg, FakeEngine(solve), RuleGrader(), tmp_path / "run", label="tiny")
    assert summary["n"] == 6 and summary["score"] == 100.0 and summary["benchmark"] == "toy"
