"""The evaluation run: benchmark -> scaffold -> grader -> report, resumable.

`run_eval(cfg, engine, grader, run_dir, label=...)` writes under `run_dir/eval/<label>/`:

- `config.json`: the EvalConfig. Resuming under a label with a different config is an error, so a
  label's results always come from one config.
- `responses.jsonl`: one line per (problem, sample) once the scaffold has answered it.
- `samples.jsonl`: the per-problem records: response, score, reason, tokens, calls, lengths, ...
- `summary.json`, `summary.md`, `cost_vs_score.png` (report.py).

Work goes in chunks of `batch_size` (problem, sample) units; a chunk is one scaffold call (so the
engine sees full batches), then one grader call. Its records are appended only when it is done, so
an interrupted run resumes at the first unfinished chunk: answered units are not generated again,
graded units are not graded again, and units whose grading failed transiently (judge_error,
timeout) are graded again from their stored response. Each chunk samples with a seed derived from
the config's seed and the chunk's index in the full, fixed unit order, so a resumed run draws what
the uninterrupted run would have. The judge's own reply cache (JudgeConfig.cache_dir) additionally
saves calls when the same response is graded twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
from tqdm import tqdm

from qedjax import multihost
from qedjax.benchmarks import (
    BenchmarkConfig,
    Problem,
    is_answer_format,
    judge_style,
    load_benchmark,
)
from qedjax.eval.refine import DSMConfig, SelfCheckConfig, dsm, self_check
from qedjax.eval.report import write_report
from qedjax.eval.scaffolds import RCConfig, RSAConfig, ScaffoldResult, rc, rsa, single
from qedjax.rewards import Grade, Grader, GradeItem
from qedjax.rollout.engine import RolloutEngine, SamplingParams
from qedjax.rollout.rc import derive_seed, render_prompt

logger = logging.getLogger(__name__)

GRADERS = ("judge", "answer", "rule")
RETRY_REASONS = frozenset({"judge_error", "timeout"})  # transient: graded again on resume


def _default_sampling() -> SamplingParams:
    # Qwen3 thinking models' recommended decoding (temperature 0.6, top-p 0.95, top-k 20); the
    # response limit is the recipe's RC turn length (49,152 tokens, ALGORITHMS.md).
    return SamplingParams(max_new_tokens=49152, temperature=0.6, top_p=0.95, top_k=20, seed=0)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """One evaluation: which problems, which scaffold, how to sample and how to grade."""

    benchmark: BenchmarkConfig = dataclasses.field(default_factory=BenchmarkConfig)
    scaffold: str = "single"  # a key of SCAFFOLDS
    rc: RCConfig = dataclasses.field(default_factory=RCConfig)
    rsa: RSAConfig = dataclasses.field(default_factory=RSAConfig)
    dsm: DSMConfig = dataclasses.field(default_factory=DSMConfig)
    self_check: SelfCheckConfig = dataclasses.field(default_factory=SelfCheckConfig)
    sampling: SamplingParams = dataclasses.field(default_factory=_default_sampling)
    samples: int = 1  # independent runs of the scaffold per problem
    batch_size: int = 16  # (problem, sample) units per scaffold call; also the unit of resuming
    grader: str = "judge"  # which grader the launcher builds: "judge" | "answer" | "rule"
    confirm_with_judge: bool = False  # answer benchmarks: let the judge re-check answers marked wrong

    def __post_init__(self):
        if self.scaffold not in SCAFFOLDS:
            raise ValueError(f"eval.scaffold must be one of {sorted(SCAFFOLDS)}, got {self.scaffold!r}")
        if self.grader not in GRADERS:
            raise ValueError(f"eval.grader must be one of {GRADERS}, got {self.grader!r}")
        if self.samples < 1 or self.batch_size < 1:
            raise ValueError(f"eval.samples and eval.batch_size must be >= 1: {self}")

    @property
    def judge_style(self) -> str | None:
        """The JudgeConfig.style the launcher's judge needs: the proof benchmark's style; for answer
        benchmarks "proofbench" when answers are confirmed by the judge (the gold answer goes in as
        the reference solution), else None (no judge)."""
        if is_answer_format(self.benchmark.format):
            return "proofbench" if self.confirm_with_judge else None
        return judge_style(self.benchmark.format)


Scaffold = Callable[[EvalConfig, RolloutEngine, Sequence[str], SamplingParams], list[ScaffoldResult]]
# (cfg, engine, problem texts, sampling params[, summarizer]) -> one result per problem.
SCAFFOLDS: dict[str, Scaffold] = {
    "single": lambda cfg, engine, texts, params: single(engine, texts, params),
    "rc": lambda cfg, engine, texts, params, summarizer=None: rc(engine, texts, params, cfg.rc, summarizer),
    "rsa": lambda cfg, engine, texts, params: rsa(engine, texts, params, cfg.rsa),
    "dsm": lambda cfg, engine, texts, params: dsm(engine, texts, params, cfg.dsm),
    "self_check": lambda cfg, engine, texts, params: self_check(engine, texts, params, cfg.self_check),
}


def task_text(problem: Problem, fmt: str) -> str:
    """What the policy is asked: the statement, plus the boxed-answer instruction for answer problems."""
    if is_answer_format(fmt):
        return problem.problem + "\n\n" + render_prompt("eval_answer_suffix")
    return problem.problem


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file; a torn last line (a run killed mid-write) is skipped."""
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("skipping a torn line in %s", path)
    return records


def append_jsonl(path: Path, records: Iterable[Mapping]) -> None:
    """Appends records and flushes them to disk; first ends a torn last line so it stays alone."""
    torn = path.exists() and path.stat().st_size and path.read_bytes()[-1:] != b"\n"
    with open(path, "a", encoding="utf-8") as f:
        if torn:
            f.write("\n")
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _key(sample: int, problem: Problem) -> str:
    return f"{problem.id}#{sample}"


def _check_config(out_dir: Path, cfg: EvalConfig) -> None:
    path = out_dir / "config.json"
    current = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists, as stored
    if path.exists():
        stored = json.loads(path.read_text())
        if stored != current:
            raise ValueError(f"{out_dir} holds results of a different eval config; use another label")
    else:
        path.write_text(json.dumps(current, indent=2) + "\n")


def _generation_record(
    key: str, problem: Problem, sample: int, cfg: EvalConfig, result: ScaffoldResult
) -> dict:
    return {
        "key": key,
        "id": problem.id,
        "sample": sample,
        "category": problem.category,
        "level": problem.level,
        "scaffold": cfg.scaffold,
        "response": result.response,
        "response_tokens": result.response_tokens,
        "tokens": result.tokens,
        "calls": result.calls,
        "stages": dict(result.stages),
        "lengths": list(result.lengths),
        "truncated": result.truncated,
        "trace": dict(result.trace),
    }


def _grade(
    cfg: EvalConfig,
    grader: Grader,
    judge: Grader | None,
    problems: Sequence[Problem],
    responses: Sequence[dict],
) -> list[dict[str, Any]]:
    """Grades responses; returns per response {score, reward, reason, judge_confirmed}."""
    items = [GradeItem(p.problem, r["response"], p.references) for p, r in zip(problems, responses)]
    grades = list(grader.grade(items))
    confirmed = [False] * len(grades)
    if cfg.confirm_with_judge and judge is not None and is_answer_format(cfg.benchmark.format):
        # An answer the symbolic check rejects may still be right in a form it cannot parse.
        guidelines = render_prompt("eval_answer_guidelines")
        doubtful = [n for n, g in enumerate(grades) if g.reason == "ok" and g.score < 7]
        items = [
            GradeItem(
                problems[n].problem,
                responses[n]["response"],
                {"solution": problems[n].references["answer"], "guidelines": guidelines},
            )
            for n in doubtful
        ]
        for n, verdict in zip(doubtful, judge.grade(items) if items else []):
            if verdict.reason == "ok" and verdict.score >= 6:
                grades[n] = Grade(7.0, 1.0, "ok", verdict.raw)
                confirmed[n] = True
    return [
        {"score": g.score, "reward": g.reward, "reason": g.reason, "judge_confirmed": c}
        for g, c in zip(grades, confirmed)
    ]


def run_eval(
    cfg: EvalConfig,
    engine: RolloutEngine,
    grader: Grader,
    run_dir: str | os.PathLike,
    *,
    label: str = "eval",
    judge: Grader | None = None,
    problems: Sequence[Problem] | None = None,
    summarizer: RolloutEngine | None = None,
    progress: bool = True,
) -> dict:
    """Evaluates `engine` under `cfg`, resuming whatever `run_dir/eval/<label>/` already holds.

    Args:
        cfg: the evaluation config.
        engine: the policy's rollout engine.
        grader: a qedjax.rewards.Grader fitting the benchmark (judge for proofs, answer grader for
            answers).
        run_dir: the run directory.
        label: names this evaluation's directory and its point in the cost/score plot.
        judge: for answer benchmarks with `confirm_with_judge`, the judge that re-checks rejections.
        problems: the problems to use instead of loading `cfg.benchmark` (tests, callers that
            already hold them).
        summarizer: the RC scaffold's summariser engine when eval.rc.summarizer names a model.
        progress: show a progress bar of graded samples (the launcher: process 0 only).

    Returns:
        The summary: score (mean %), stderr, tokens_per_problem, by_group, length, ... (on process 0;
        {} on the others of a multi-process run, which generate along and write nothing)
    """
    lead = jax.process_index() == 0
    out_dir = Path(run_dir) / "eval" / label
    if lead:
        out_dir.mkdir(parents=True, exist_ok=True)
        _check_config(out_dir, cfg)
    problems = list(problems) if problems is not None else load_benchmark(cfg.benchmark)
    if cfg.confirm_with_judge and judge is None and is_answer_format(cfg.benchmark.format):
        raise ValueError("eval.confirm_with_judge needs a judge grader")
    # Sample-major, so the first pass over every problem finishes first.
    units = [(sample, p) for sample in range(cfg.samples) for p in problems]

    responses_path, samples_path = out_dir / "responses.jsonl", out_dir / "samples.jsonl"
    generated = {r["key"]: r for r in read_jsonl(responses_path)} if lead else {}
    graded = {r["key"]: r for r in read_jsonl(samples_path)} if lead else {}
    done = {k for k, r in graded.items() if r["reason"] not in RETRY_REASONS}
    # Several processes: each generation is one SPMD program, so every process must make the same
    # scaffold calls. Process 0 alone reads and writes the records and grades; the others learn from
    # it what a resumed run still has to generate, generate along, and wait (see the README).
    resume = multihost.broadcast_json({"generated": sorted(generated), "done": sorted(done)})
    have, done = set(resume["generated"]), set(resume["done"])
    wanted = {_key(*u) for u in units}
    bar = tqdm(total=len(units), initial=len(done & wanted), desc=f"eval {label}", unit="sample",
               disable=not (progress and lead), dynamic_ncols=True, mininterval=2.0)
    for chunk_index in range(0, len(units), cfg.batch_size):
        chunk = [u for u in units[chunk_index : chunk_index + cfg.batch_size] if _key(*u) not in done]
        if not chunk:
            continue
        fresh = [u for u in chunk if _key(*u) not in have]
        if fresh:
            seed = derive_seed(cfg.sampling.seed, "chunk", chunk_index)
            params = dataclasses.replace(cfg.sampling, seed=seed)
            texts = [task_text(p, cfg.benchmark.format) for _, p in fresh]
            extra = {"summarizer": summarizer} if summarizer is not None else {}
            results = SCAFFOLDS[cfg.scaffold](cfg, engine, texts, params, **extra)
            have.update(_key(*u) for u in fresh)
            if not lead:
                continue  # process 0 grades and writes
            records = [_generation_record(_key(s, p), p, s, cfg, r) for (s, p), r in zip(fresh, results)]
            append_jsonl(responses_path, records)
            generated.update((r["key"], r) for r in records)
        if not lead:
            continue
        answered = [generated[_key(*u)] for u in chunk]
        grades = _grade(cfg, grader, judge, [p for _, p in chunk], answered)
        records = [{**r, **g} for r, g in zip(answered, grades)]
        append_jsonl(samples_path, records)
        graded.update((r["key"], r) for r in records)
        before = len(done & wanted)
        done.update(r["key"] for r in records if r["reason"] not in RETRY_REASONS)
        bar.update(len(done & wanted) - before)
        logger.debug("eval %s: %d/%d graded", label, len(done & wanted), len(units))
    bar.close()

    if not lead:
        return {}
    final = [r for k, r in graded.items() if k in wanted]
    name = cfg.benchmark.name or cfg.benchmark.format
    return write_report(
        final,
        out_dir,
        label=label,
        benchmark=name,
        scaffold=cfg.scaffold,
        samples=cfg.samples,
        max_new_tokens=cfg.sampling.max_new_tokens,
    )
