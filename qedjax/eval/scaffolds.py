"""Test-time scaffolds over the rollout-engine interface: single sample, RC and RSA.

The verification-based scaffolds (DSM, self-check) live in refine.py. Every scaffold takes a batch of
problems and returns one `ScaffoldResult` per problem, with the final response and what it cost:
generated tokens (prompts are not counted, as in the paper's tokens-per-problem) and generation
requests per stage. Each phase of a scaffold is one `engine.generate` call over all problems of the
batch, so vLLM and the JAX sampler see full batches; the seed of each phase is derived from the
sampling seed and the phase (`derive_seed`), so phases differ and runs reproduce.

The policy is always prompted through `RCState(problem).messages()`: a single sample is RC's first
turn, so single-sample, RC, RSA and DSM start from the same kind of attempt.

RSA (Venkatraman et al. 2026): a population of N attempts; in each of T rounds the population is
cut into N blocks of K (the windows of a random cyclic order, so every candidate sits in exactly K
blocks) and every block is merged into one new attempt; the final answer is picked by a
single-elimination pairwise tournament (N - 1 comparisons, byes for odd brackets).
"""

from __future__ import annotations

import collections
import dataclasses
import random
import re
from typing import Any, Mapping, Sequence

from qedjax.rollout.engine import Completion, Message, Request, RolloutEngine, SamplingParams
from qedjax.rollout.rc import MODES, RCState, derive_seed, is_truncated, render_prompt, run_rc, summary_stats
from qedjax.text import split_thinking


@dataclasses.dataclass(frozen=True)
class RCConfig:
    """RC at test time; 3 turns was the paper's best cost/score trade-off (ALGORITHMS.md)."""

    turns: int = 3
    mode: str = "replace"  # "replace" | "append"
    # "policy": the model under test summarises (the paper's test time), or a model of its own (a local
    # Hugging Face directory or a preset, as grpo.rc.summarizer), frozen, on its own engine.
    summarizer: str = "policy"
    summary_max_new_tokens: int = 0  # 0: the policy's max_new_tokens
    # The summary call's sampling; None: the policy's (the release's summariser: 0.7 / 0.8 / 20).
    summary_temperature: float | None = None
    summary_top_p: float | None = None
    summary_top_k: int | None = None

    def __post_init__(self):
        if self.turns < 1 or self.mode not in MODES or self.summary_max_new_tokens < 0:
            raise ValueError(f"rc needs turns >= 1, mode in {MODES}, summary_max_new_tokens >= 0: {self}")
        if not self.summarizer:
            raise ValueError("rc.summarizer must be 'policy', a model directory or a preset")

    def summary_params(self, params: SamplingParams) -> SamplingParams:
        """The summary call's sampling params, from the policy's `params`."""
        changes = {"temperature": self.summary_temperature, "top_p": self.summary_top_p, "top_k": self.summary_top_k}
        changes = {k: v for k, v in changes.items() if v is not None}
        if self.summary_max_new_tokens:
            changes["max_new_tokens"] = self.summary_max_new_tokens
        return dataclasses.replace(params, **changes)


@dataclasses.dataclass(frozen=True)
class RSAConfig:
    """RSA with the paper's QED-Nano setting: N=8, K=3, T=3 (ALGORITHMS.md)."""

    population: int = 8  # N
    block: int = 3  # K: candidates per aggregation block, and blocks per candidate
    rounds: int = 3  # T: aggregation rounds after the initial population

    def __post_init__(self):
        if self.population < 1 or not 1 <= self.block <= self.population or self.rounds < 0:
            raise ValueError(f"rsa needs population >= 1, 1 <= block <= population, rounds >= 0: {self}")


@dataclasses.dataclass(frozen=True)
class ScaffoldResult:
    """One problem's outcome under a scaffold."""

    response: str  # the final response, thinking included (graders strip it)
    response_tokens: int  # generated tokens of the final response
    tokens: int  # all generated tokens spent on the problem
    calls: int  # all generation requests made for the problem
    stages: Mapping[str, int]  # requests per stage ("generate", "aggregate", "compare", ...)
    lengths: tuple[int, ...]  # generated tokens of every completion, in request order
    truncated: int  # completions that hit the token limit or never closed their thinking
    trace: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # scaffold detail, JSON-able


@dataclasses.dataclass
class Tally:
    """What a scaffold spent on one problem so far (mutable while the scaffold runs)."""

    stages: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    lengths: list[int] = dataclasses.field(default_factory=list)
    truncated: int = 0

    def add(self, stage: str, completion: Completion) -> None:
        self.stages[stage] += 1
        self.lengths.append(len(completion.tokens))
        self.truncated += is_truncated(completion)

    def result(self, final: Completion, trace: Mapping[str, Any] | None = None) -> ScaffoldResult:
        return ScaffoldResult(
            response=final.text,
            response_tokens=len(final.tokens),
            tokens=sum(self.lengths),
            calls=sum(self.stages.values()),
            stages=dict(self.stages),
            lengths=tuple(self.lengths),
            truncated=self.truncated,
            trace=dict(trace or {}),
        )


Job = tuple[int, str, Request]  # (problem index in the batch, stage, request)


def generate(
    engine: RolloutEngine, jobs: Sequence[Job], params: SamplingParams, tallies: Sequence[Tally]
) -> list[Completion]:
    """One `engine.generate` call over `jobs`, charged to each job's problem.

    Args:
        engine: the policy engine.
        jobs: (problem index, stage name, request) per request.
        params: sampling params of this phase.
        tallies: one per problem of the batch.

    Returns:
        One completion per job, in order ([] and no engine call for no jobs).
    """
    if not jobs:
        return []
    completions = engine.generate([request for _, _, request in jobs], params)
    for (index, stage, _), completion in zip(jobs, completions):
        tallies[index].add(stage, completion)
    return completions


def user(content: str) -> list[Message]:
    return [{"role": "user", "content": content}]


def reseed(params: SamplingParams, *tags: object) -> SamplingParams:
    """`params` with the seed of the phase named by `tags`."""
    return dataclasses.replace(params, seed=derive_seed(params.seed, *tags))


def solution_text(completion: Completion) -> str:
    """The written solution of an attempt (its answer part), or "" when it was cut off."""
    split = split_thinking(completion.text)
    return split.answer if split.closed else ""


def single(engine: RolloutEngine, problems: Sequence[str], params: SamplingParams) -> list[ScaffoldResult]:
    """One sample per problem.

    Args:
        engine: the policy.
        problems: problem statements.
        params: sampling params.

    Returns:
        One result per problem.
    """
    tallies = [Tally() for _ in problems]
    jobs = [(i, "generate", RCState(p).messages()) for i, p in enumerate(problems)]
    return [t.result(c) for t, c in zip(tallies, generate(engine, jobs, params, tallies))]


def rc(
    engine: RolloutEngine,
    problems: Sequence[str],
    params: SamplingParams,
    cfg: RCConfig = RCConfig(),
    summarizer: RolloutEngine | None = None,
) -> list[ScaffoldResult]:
    """The reasoning-cache loop; the last turn is graded.

    Args:
        engine: the policy (and the summariser unless `summarizer` is given).
        problems: problem statements.
        params: sampling params of the reasoning turns.
        cfg: turns, summary mode and the summary call's sampling.
        summarizer: the summariser's engine when it is a model of its own.

    Returns:
        One result per problem; stages "reason" (turns) and "summarize" (turns - 1); the trace holds
        the summaries and `summary_stats` (attempted, empty, failed by reason, mean length).
    """
    results = run_rc(
        engine, problems, turns=cfg.turns, params=params, summarizer=summarizer,
        summary_params=cfg.summary_params(params), mode=cfg.mode
    )
    out = []
    for result in results:
        tally = Tally()
        for turn in result.turns:
            tally.add("reason", turn.completion)
            if turn.summary_completion is not None:
                tally.add("summarize", turn.summary_completion)
        trace = {
            "summaries": [t.new_summary for t in result.turns[:-1]],
            "turn_responses": [t.completion.text for t in result.turns[:-1]],  # the last is the response
            "truncated_turns": [t.state.turn for t in result.turns if t.truncated],
            "summary_stats": summary_stats([result]),
        }
        out.append(tally.result(result.turns[-1].completion, trace))
    return out


def blocks(n: int, k: int, rng: random.Random) -> list[tuple[int, ...]]:
    """n blocks of k distinct indices in range(n), every index in exactly k blocks.

    The blocks are the k-windows of a random cyclic order: index perm[j] lies in the windows that
    start at j, j-1, ..., j-k+1 (mod n), and a window holds k distinct indices since k <= n.

    Args:
        n: population size.
        k: block size (1 <= k <= n).
        rng: source of the random order.

    Returns:
        The n blocks.
    """
    order = rng.sample(range(n), n)
    return [tuple(order[(start + j) % n] for j in range(k)) for start in range(n)]


def aggregate_request(problem: str, candidates: Sequence[Completion]) -> list[Message]:
    """RSA's merge request for one block of candidates."""
    no_solution = render_prompt("eval_no_solution")
    listed = "\n\n".join(
        render_prompt("eval_rsa_candidate", index=str(j + 1), solution=solution_text(c) or no_solution)
        for j, c in enumerate(candidates)
    )
    return user(render_prompt("eval_rsa_aggregate", problem=problem, candidates=listed))


_BETTER = re.compile(r"Better\W{0,4}([12])\b", re.IGNORECASE)


def preferred(completion: Completion) -> int | None:
    """Which solution (1 or 2) a comparison picked: its last "Better: N" line after the thinking."""
    matches = _BETTER.findall(solution_text(completion))
    return int(matches[-1]) if matches else None


def tournament(
    engine: RolloutEngine,
    problems: Sequence[str],
    pools: Sequence[Sequence[Completion]],
    params: SamplingParams,
    tallies: Sequence[Tally],
) -> list[int]:
    """Single-elimination pairwise tournament per problem; each bracket round is one engine call.

    A candidate with no written solution loses its match without a call (two such: the first
    advances), and an unreadable verdict advances the first of the pair, so the pick is always
    defined.

    Args:
        engine: the judge of the comparisons (the policy).
        problems: problem statements.
        pools: candidates per problem.
        params: sampling params; each bracket round gets its own seed.
        tallies: per problem; comparisons are charged as stage "compare".

    Returns:
        The index of the winner in each pool.
    """
    brackets = [list(range(len(pool))) for pool in pools]
    round_ = 0
    while any(len(b) > 1 for b in brackets):
        jobs, matches, advancing = [], [], []
        for i, bracket in enumerate(brackets):
            nxt: list[int | None] = []
            for a, b in zip(bracket[::2], bracket[1::2]):
                text_a, text_b = solution_text(pools[i][a]), solution_text(pools[i][b])
                if not text_a or not text_b:
                    nxt.append(b if text_b and not text_a else a)
                    continue
                prompt = render_prompt("eval_compare", problem=problems[i], first=text_a, second=text_b)
                jobs.append((i, "compare", user(prompt)))
                matches.append((i, len(nxt), a, b))
                nxt.append(None)
            if len(bracket) % 2:
                nxt.append(bracket[-1])  # a bye
            advancing.append(nxt)
        completions = generate(engine, jobs, reseed(params, "tournament", round_), tallies)
        for (i, slot, a, b), completion in zip(matches, completions):
            advancing[i][slot] = b if preferred(completion) == 2 else a
        brackets = advancing
        round_ += 1
    return [b[0] for b in brackets]


def rsa(
    engine: RolloutEngine, problems: Sequence[str], params: SamplingParams, cfg: RSAConfig = RSAConfig()
) -> list[ScaffoldResult]:
    """Recursive self-aggregation with a tournament pick.

    Args:
        engine: the policy (it also aggregates and compares).
        problems: problem statements.
        params: sampling params; every round and tournament round gets its own seed.
        cfg: population N, block size K, rounds T.

    Returns:
        One result per problem. Requests per problem: N "generate", T * N "aggregate" and up to
        N - 1 "compare" (fewer when cut-off candidates lose without a comparison).
    """
    n, k = cfg.population, cfg.block
    tallies = [Tally() for _ in problems]
    jobs = [(i, "generate", RCState(p).messages()) for i, p in enumerate(problems) for _ in range(n)]
    flat = generate(engine, jobs, params, tallies)
    pools = [flat[i * n : (i + 1) * n] for i in range(len(problems))]
    for round_ in range(cfg.rounds):
        jobs = []
        for i, problem in enumerate(problems):
            rng = random.Random(derive_seed(params.seed, "rsa-blocks", round_, i))
            for block in blocks(n, k, rng):
                jobs.append((i, "aggregate", aggregate_request(problem, [pools[i][j] for j in block])))
        flat = generate(engine, jobs, reseed(params, "rsa", round_), tallies)
        pools = [flat[i * n : (i + 1) * n] for i in range(len(problems))]
    winners = tournament(engine, problems, pools, params, tallies)
    return [t.result(pool[w], {"winner": w}) for t, pool, w in zip(tallies, pools, winners)]
