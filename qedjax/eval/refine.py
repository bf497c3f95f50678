"""Verification-driven scaffolds: DSM (DeepSeekMath-V2 style) and self-check.

Both rest on a verification: a reviewer reads a proof, lists its problems and scores it 1 (complete
and rigorous), 0.5 (minor, repairable gaps) or 0 (wrong or missing an essential step).

By default the reviewer is the policy itself (self-verification, the eval_verify prompt). For tests
and oracle ablations a `Grader` can review instead: its 0..7 score maps to 7 -> 1, 5..6 -> 0.5,
below 5 -> 0 (the ProofBench levels 7 / 6 / 1 / 0 become 1 / 0.5 / 0 / 0) and its raw judge text is
the analysis. A grader that sees reference solutions is an oracle, so it is not an eval setting.

A proof whose attempt was cut off (no written answer) scores 0 without a review call; a review
without a readable verdict scores 0 too.

DSM: a pool of `pool` proofs, each reviewed `verifications` times; while no proof averages 1 and
rounds remain, the best `refine_top` proofs of the whole pool so far are each rewritten with their
`worst_analyses` lowest-scored reviews, and the rewrites are reviewed and join the pool. The answer
is the proof with the best mean score (ties go to the later, more refined one).

Self-check (the release's generate / verify / improve loop): one proof, reviewed once per
iteration. A passing review (score 1) adds to a run of consecutive passes, and `accept_passes` in a
row accept the proof. A failing review resets the run, counts one error and has the proof rewritten
with that review; `reject_errors` errors reject it, and `max_iterations` reviews stop the loop. The
answer is the accepted version, otherwise the best-scored one.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

from qedjax.eval.scaffolds import (
    Job,
    ScaffoldResult,
    Tally,
    generate,
    reseed,
    solution_text,
    user,
)
from qedjax.rewards import Grader, GradeItem
from qedjax.rollout.engine import Completion, RolloutEngine, SamplingParams
from qedjax.rollout.rc import RCState, render_prompt


@dataclasses.dataclass(frozen=True)
class DSMConfig:
    """DSM with the paper's setting (ALGORITHMS.md)."""

    pool: int = 4  # initial proofs
    verifications: int = 4  # reviews per proof
    refine_top: int = 4  # proofs rewritten per round
    worst_analyses: int = 2  # lowest-scored reviews shown to each rewrite
    rounds: int = 2  # refinement rounds at most

    def __post_init__(self):
        if min(self.pool, self.verifications, self.refine_top, self.worst_analyses) < 1 or self.rounds < 0:
            raise ValueError(f"dsm needs counts >= 1 and rounds >= 0: {self}")


@dataclasses.dataclass(frozen=True)
class SelfCheckConfig:
    """Self-check with the release's limits (QED-Nano's released eval code)."""

    accept_passes: int = 5  # consecutive passing reviews that accept a proof
    reject_errors: int = 10  # failing reviews (each followed by a rewrite) that reject it
    max_iterations: int = 30  # reviews at most

    def __post_init__(self):
        if min(self.accept_passes, self.reject_errors, self.max_iterations) < 1:
            raise ValueError(f"self_check needs accept_passes, reject_errors and max_iterations >= 1: {self}")


@dataclasses.dataclass(frozen=True)
class Verdict:
    score: float  # 0, 0.5 or 1
    analysis: str


@dataclasses.dataclass
class Candidate:
    completion: Completion
    verdicts: list[Verdict]

    @property
    def mean(self) -> float:
        return sum(v.score for v in self.verdicts) / max(len(self.verdicts), 1)


_SCORE = re.compile(r"Score\W{0,4}(1/2|0\.5|\.5|1(?:\.0+)?|0(?:\.0+)?)(?![\d.])", re.IGNORECASE)


def parse_score(review: Completion) -> float | None:
    """The score of a self-verification: its last "Score: X" line after the thinking, or None."""
    matches = _SCORE.findall(solution_text(review))
    if not matches:
        return None
    value = matches[-1]
    return 0.5 if value in ("1/2", "0.5", ".5") else float(value)


def grade_to_score(score: float) -> float:
    """A grader's 0..7 score on the review scale (module docstring)."""
    return 1.0 if score >= 7 else 0.5 if score >= 5 else 0.0


def review(
    engine: RolloutEngine,
    jobs: Sequence[tuple[int, str, Completion]],
    repeats: int,
    params: SamplingParams,
    tallies: Sequence[Tally],
    grader: Grader | None = None,
    references: Sequence[Mapping[str, str]] | None = None,
) -> list[list[Verdict]]:
    """Reviews every proof `repeats` times, in one engine call (or one grader call).

    Args:
        engine: the policy (the reviewer unless `grader` is given).
        jobs: (problem index, problem, proof attempt) per proof.
        repeats: reviews per proof.
        params: sampling params of this phase.
        tallies: per problem; self-reviews are charged as stage "verify".
        grader: a qedjax.rewards.Grader to review instead of the policy.
        references: per problem index, the grader's references.

    Returns:
        Per job, its `repeats` verdicts.
    """
    if grader is not None and references is None:
        raise ValueError("a grader reviewer needs the references of every problem")
    verdicts: list[list[Verdict]] = [[] for _ in jobs]
    missing = Verdict(0.0, render_prompt("eval_no_solution"))
    pending = [(j, i, problem, solution_text(c)) for j, (i, problem, c) in enumerate(jobs)]
    for j, _, _, proof in pending:
        if not proof:
            verdicts[j] = [missing] * repeats
    pending = [p for p in pending if p[3]]
    if grader is not None:
        items = [GradeItem(problem, proof, references[i]) for _, i, problem, proof in pending]
        grades = grader.grade([item for item in items for _ in range(repeats)])
        for n, (j, *_rest) in enumerate(pending):
            mine = grades[n * repeats : (n + 1) * repeats]
            verdicts[j] = [Verdict(grade_to_score(g.score), g.raw) for g in mine]
        return verdicts
    requests: list[Job] = [
        (i, "verify", user(render_prompt("eval_verify", problem=problem, proof=proof)))
        for _, i, problem, proof in pending
        for _ in range(repeats)
    ]
    completions = generate(engine, requests, params, tallies)
    cut_off = render_prompt("eval_review_cut_off")
    for n, (j, *_rest) in enumerate(pending):
        for completion in completions[n * repeats : (n + 1) * repeats]:
            score = parse_score(completion)
            # A review without a verdict counts 0: a proof nobody could vouch for is not trusted.
            # Its raw thinking is not passed on as an analysis (it can be the whole token budget).
            analysis = solution_text(completion) or cut_off
            verdicts[j].append(Verdict(0.0 if score is None else score, analysis))
    return verdicts


def refine_request(problem: str, completion: Completion, verdicts: Sequence[Verdict]) -> list[dict]:
    """A rewrite request showing the proof and the given reviews of it."""
    analyses = "\n\n".join(
        render_prompt("eval_review", index=str(n + 1), analysis=v.analysis) for n, v in enumerate(verdicts)
    )
    proof = solution_text(completion)
    return user(render_prompt("eval_refine", problem=problem, proof=proof, analyses=analyses))


def worst(verdicts: Sequence[Verdict], k: int) -> list[Verdict]:
    """The k lowest-scored reviews (the earlier one first among equals)."""
    return sorted(verdicts, key=lambda v: v.score)[:k]


def best(candidates: Sequence[Candidate]) -> int:
    """Index of the best mean score; ties go to the later (more refined) candidate."""
    return max(range(len(candidates)), key=lambda n: (candidates[n].mean, n))


def ranked(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Best mean score first; among equals the later (more refined) candidate first."""
    order = sorted(range(len(candidates)), key=lambda n: (candidates[n].mean, n), reverse=True)
    return [candidates[n] for n in order]


def dsm(
    engine: RolloutEngine,
    problems: Sequence[str],
    params: SamplingParams,
    cfg: DSMConfig = DSMConfig(),
    *,
    grader: Grader | None = None,
    references: Sequence[Mapping[str, str]] | None = None,
) -> list[ScaffoldResult]:
    """Pool, review, refine the best with their worst reviews, stop when a proof averages 1.

    Args:
        engine: the policy (it also reviews unless `grader` is given).
        problems: problem statements.
        params: sampling params; each phase gets its own seed.
        cfg: pool size, reviews per proof, refinement width, reviews shown, rounds.
        grader: optional reviewer in place of self-verification (module docstring).
        references: the grader's references, one mapping per problem.

    Returns:
        One result per problem. trace: "means" (mean review score of every proof in creation
        order), "rounds" (refinement rounds run), "solved" (a proof averaged 1), "pick".
    """
    tallies = [Tally() for _ in problems]
    jobs = [(i, "generate", RCState(p).messages()) for i, p in enumerate(problems) for _ in range(cfg.pool)]
    flat = generate(engine, jobs, params, tallies)
    proofs = [(i // cfg.pool, problems[i // cfg.pool], c) for i, c in enumerate(flat)]
    seeded = reseed(params, "dsm-verify", 0)
    verdicts = review(engine, proofs, cfg.verifications, seeded, tallies, grader, references)
    pools: list[list[Candidate]] = [[] for _ in problems]
    for (i, _, completion), v in zip(proofs, verdicts):
        pools[i].append(Candidate(completion, v))
    rounds = [0] * len(problems)
    for round_ in range(1, cfg.rounds + 1):
        active = [i for i, pool in enumerate(pools) if max(c.mean for c in pool) < 1]
        if not active:
            break
        jobs = []
        for i in active:
            for c in ranked(pools[i])[: cfg.refine_top]:
                request = refine_request(problems[i], c.completion, worst(c.verdicts, cfg.worst_analyses))
                jobs.append((i, "refine", request))
        flat = generate(engine, jobs, reseed(params, "dsm-refine", round_), tallies)
        proofs = [(i, problems[i], c) for (i, _, _), c in zip(jobs, flat)]
        seeded = reseed(params, "dsm-verify", round_)
        verdicts = review(engine, proofs, cfg.verifications, seeded, tallies, grader, references)
        for (i, _, completion), v in zip(proofs, verdicts):
            pools[i].append(Candidate(completion, v))
        for i in active:
            rounds[i] = round_
    out = []
    for i, pool in enumerate(pools):
        pick = best(pool)
        means = [c.mean for c in pool]
        trace = {"means": means, "rounds": rounds[i], "solved": means[pick] >= 1, "pick": pick}
        out.append(tallies[i].result(pool[pick].completion, trace))
    return out


def self_check(
    engine: RolloutEngine,
    problems: Sequence[str],
    params: SamplingParams,
    cfg: SelfCheckConfig = SelfCheckConfig(),
    *,
    grader: Grader | None = None,
    references: Sequence[Mapping[str, str]] | None = None,
) -> list[ScaffoldResult]:
    """Generate, then review once per iteration: passes in a row accept, failures are rewritten.

    Args:
        engine: the policy (it also reviews unless `grader` is given).
        problems: problem statements.
        params: sampling params; each phase gets its own seed.
        cfg: passes to accept, errors to reject, iterations at most.
        grader: optional reviewer in place of self-verification.
        references: the grader's references, one mapping per problem.

    Returns:
        One result per problem. trace: "means" per version, "outcome" ("accepted", "rejected" or
        "stopped"), "passed" (accepted), "iterations", "errors", "pick".
    """
    tallies = [Tally() for _ in problems]
    jobs = [(i, "generate", RCState(p).messages()) for i, p in enumerate(problems)]
    current = dict(enumerate(generate(engine, jobs, params, tallies)))
    versions = [[Candidate(current[i], [])] for i in range(len(problems))]
    passes, errors, iterations = [0] * len(problems), [0] * len(problems), [0] * len(problems)
    outcome = ["stopped"] * len(problems)
    for iteration in range(cfg.max_iterations):
        active = sorted(current)
        if not active:
            break
        proofs = [(i, problems[i], current[i]) for i in active]
        seeded = reseed(params, "check-verify", iteration)
        verdicts = review(engine, proofs, 1, seeded, tallies, grader, references)
        refine = []
        for i, (verdict,) in zip(active, verdicts):
            iterations[i] += 1
            versions[i][-1].verdicts.append(verdict)
            if verdict.score >= 1:
                passes[i] += 1
                if passes[i] >= cfg.accept_passes:
                    outcome[i] = "accepted"
                    del current[i]
                continue
            passes[i] = 0
            errors[i] += 1
            if errors[i] >= cfg.reject_errors:
                outcome[i] = "rejected"
                del current[i]
            elif iteration + 1 < cfg.max_iterations:  # a rewrite only if it will be reviewed
                refine.append((i, "refine", refine_request(problems[i], current[i], [verdict])))
        rewrites = generate(engine, refine, reseed(params, "check-refine", iteration), tallies) if refine else []
        for (i, _, _), completion in zip(refine, rewrites):
            current[i] = completion
            versions[i].append(Candidate(completion, []))
    out = []
    for i, chain in enumerate(versions):
        pick = len(chain) - 1 if outcome[i] == "accepted" else best(chain)
        trace = {"means": [c.mean for c in chain], "outcome": outcome[i], "passed": outcome[i] == "accepted",
                 "iterations": iterations[i], "errors": errors[i], "pick": pick}
        out.append(tallies[i].result(chain[pick].completion, trace))
    return out
