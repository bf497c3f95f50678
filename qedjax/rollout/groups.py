"""GRPO's groups of rollouts, shared by the RL loop (qedjax.rl) and rollout workers (qedjax.rollout.worker).

The grpo config section, the seeded problem order (ProblemSampler), the record of one step's
rollouts (Rollouts), steps 2-3 of an RL step (sample_groups: RC states, then a group of rollouts per
state; run by the trainer or by a worker) and step 4 (grade_rollouts: every rollout graded alone
against its plain problem; run by the trainer). The steps are numbered as in qedjax.rl.
"""

from __future__ import annotations

import collections
import dataclasses
import random
import time
from typing import Sequence

import jax
import numpy as np

from qedjax import grpo
from qedjax.benchmarks import BenchmarkConfig, Problem
from qedjax.checkpoint import CheckpointConfig
from qedjax.optim import OptimConfig
from qedjax.rewards import MAX_SCORE, Grade, Grader, GradeItem
from qedjax.rollout.engine import Completion, RolloutEngine, SamplingParams
from qedjax.rollout.rc import RCState, derive_seed, run_rc, summary_stats


@dataclasses.dataclass(frozen=True)
class RCTrainConfig:
    enabled: bool = False
    turns: int = 3  # reasoning turns of the RC rollout that makes the states (3 -> 4 states)
    states_per_problem: int = 2
    mode: str = "replace"
    # Who writes the summaries: a model of its own, frozen (a local Hugging Face directory, e.g. the
    # release's Qwen3-4B-Instruct-2507, or a qedjax preset with random weights, for tests), or
    # "frozen" (a frozen copy of the starting policy) or "policy" (the current policy).
    summarizer: str = "frozen"
    # The summary call's own sampling (the release's: T 0.7, top-p 0.8, top-k 20, 2,048 tokens).
    summary_max_new_tokens: int = 2048
    summary_temperature: float = 0.7
    summary_top_p: float = 0.8
    summary_top_k: int = 20

    def summary_params(self, seed: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.summary_max_new_tokens, temperature=self.summary_temperature,
                              top_p=self.summary_top_p, top_k=self.summary_top_k, seed=seed)


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    problems: BenchmarkConfig = BenchmarkConfig()
    init: str = "sft"  # "sft": the SFT stage's result | "model": the model section | a checkpoint dir
    steps: int = 100
    problems_per_step: int = 64
    group_size: int = 16
    rc: RCTrainConfig = RCTrainConfig()
    sampling: SamplingParams = SamplingParams(max_new_tokens=49152, temperature=0.8)
    loss: grpo.LossConfig = grpo.LossConfig()
    optim: OptimConfig = OptimConfig(lr=1e-6, schedule="constant", warmup_ratio=0.0, weight_decay=0.01,
                                     clip_norm=0.3)
    grader: str = "rule"  # "judge" (rubric style) | "answer" | "rule"
    answer_timeout_s: float = 1.0  # the answer grader's symbolic-comparison limit (the release's 1 s)
    mode: str = "sync"  # "sync" | "async"
    max_lag: int = 5
    micro_batches: int = 1
    skip_zero_variance: bool = True  # leave groups with equal rewards (advantage 0) out of the batch
    filter_solved: bool = False  # stop sampling problems the policy solved in every rollout of a group
    filter_unsolved: bool = False  # ... or failed in every rollout
    checkpoint: CheckpointConfig = CheckpointConfig(every=10, keep=2)
    # A step where every grader call failed (judge down: errors, timeouts) trains on nothing but zeros:
    # each such step prints a warning, and this many in a row stop the run with a checkpoint (0: never).
    max_failed_grading_steps: int = 3
    log_every: int = 1

    def __post_init__(self):
        if self.mode not in ("sync", "async"):
            raise ValueError(f"grpo.mode must be 'sync' or 'async', got {self.mode!r}")
        if not self.sampling.temperature > 0:
            raise ValueError(f"grpo.sampling.temperature must be > 0, got {self.sampling.temperature}: the trainer "
                             f"divides logits by it (greedy rollouts have no logprobs to train on)")
        if not self.answer_timeout_s > 0:
            raise ValueError(f"grpo.answer_timeout_s must be > 0, got {self.answer_timeout_s}")
        if self.group_size < 2:
            raise ValueError("grpo.group_size must be >= 2 (advantages are relative to the group)")
        if self.rc.enabled and self.rc.states_per_problem > self.rc.turns + 1:
            raise ValueError(f"grpo.rc.states_per_problem ({self.rc.states_per_problem}) exceeds the "
                             f"{self.rc.turns + 1} states of {self.rc.turns} turns")
        if not self.rc.summarizer:
            raise ValueError("grpo.rc.summarizer must be 'policy', 'frozen', a model directory or a preset")
        try:
            self.rc.summary_params(0)
        except ValueError as e:
            raise ValueError(f"grpo.rc.summary_*: {e}") from None
        if self.max_failed_grading_steps < 0:
            raise ValueError(f"grpo.max_failed_grading_steps must be >= 0 (0: never stop), got "
                             f"{self.max_failed_grading_steps}")

    @property
    def sequences_per_step(self) -> int:
        states = self.rc.states_per_problem if self.rc.enabled else 1
        return self.problems_per_step * states * self.group_size


@dataclasses.dataclass
class Rollouts:
    """One step's worth of graded groups, and how they were made."""

    version: int
    states: list[RCState]  # one per group
    completions: list[list[Completion]]
    grades: list[list[Grade]]
    summary_tokens: list[int]
    times: dict[str, float]
    problems: list[Problem]
    summary_stats: dict[str, float] = dataclasses.field(default_factory=dict)  # rc.summary_stats of the RC runs
    workers: dict[str, int] = dataclasses.field(default_factory=dict)  # groups each rollout worker made (none: here)


class ProblemSampler:
    """Seeded epochs over the problems, skipping those the difficulty filter removed.

    Producers (the async thread, the workers' dispatcher) take batches ahead of the trainer; `taken`
    holds the cursor after each take, oldest first, and the trainer pops one per batch it consumes
    (`consumed`), so that a checkpoint records the trainer's position and a resumed run takes the
    batches prefetched before the stop again instead of skipping them.
    """

    def __init__(self, problems: Sequence[Problem], seed: int):
        self.problems = list(problems)
        self.seed = seed
        self.cursor = 0
        self.removed: set[str] = set()
        self.taken: collections.deque[int] = collections.deque()
        self.consumed_cursor = 0

    def take(self, n: int) -> list[Problem]:
        active = [p for p in self.problems if p.id not in self.removed]
        if not active:
            raise RuntimeError("the difficulty filter removed every problem")
        out = []
        while len(out) < n:
            epoch, at = divmod(self.cursor, len(self.problems))
            order = list(range(len(self.problems)))
            random.Random(self.seed * 1000003 + epoch).shuffle(order)
            p = self.problems[order[at]]
            self.cursor += 1
            if p.id not in self.removed:
                out.append(p)
        self.taken.append(self.cursor)
        return out

    def consumed(self) -> None:
        """The trainer consumed the oldest batch taken."""
        self.consumed_cursor = self.taken.popleft()

    def state(self) -> dict:
        """Where the trainer is: the cursor after the last consumed batch (not the prefetched ones)."""
        return {"cursor": self.consumed_cursor, "removed": sorted(self.removed)}

    def restore(self, state: dict) -> None:
        self.cursor = self.consumed_cursor = int(state.get("cursor", 0))
        self.removed = set(state.get("removed", ()))
        self.taken.clear()


def sample_groups(cfg: GRPOConfig, engine: RolloutEngine, summarizer: RolloutEngine, problems: list[Problem],
                  step: int, seed: int, first: int = 0) -> Rollouts:
    """Steps 2-3 of the module docstring: states, then a group of rollouts per state (ungraded).

    Runs wherever the engine runs: in the trainer process, or on a rollout worker
    (qedjax.rollout.worker), which makes a few of a step's problems (a work item) and ships them back
    to the trainer for grading. `first` is the position in the step of `problems[0]`. Every random
    draw of the problem at position j (its RC run, which states it keeps, each rollout of its groups)
    is seeded by (seed, step, j), so a step's Rollouts are the same however its problems are split into
    items and whichever worker makes each (`merge_rollouts` puts the items back together).
    """
    t0 = time.perf_counter()
    version = engine.version
    where = range(first, first + len(problems))
    summary_tokens: list[int] = []
    stats: dict[str, float] = {}
    if cfg.rc.enabled:
        params = dataclasses.replace(cfg.sampling, seed=derive_seed(seed, "rc", step))
        results = run_rc(engine, [p.problem for p in problems], turns=cfg.rc.turns, params=params,
                         summarizer=summarizer, summary_params=cfg.rc.summary_params(params.seed),
                         mode=cfg.rc.mode, summarize_last=True, seeds=[derive_seed(seed, "rc", step, j) for j in where])
        stats = summary_stats(results)
        states, owners, keys = [], [], []
        for j, problem, result in zip(where, problems, results):
            rng = random.Random(derive_seed(seed, "states", step, j))
            for q, state in enumerate(rng.sample(list(result.states), cfg.rc.states_per_problem)):
                states.append(state)
                owners.append(problem)
                keys.append((j, q))
                summary_tokens.append(engine.count_tokens(state.summary) if state.summary else 0)
    else:
        states, owners, keys = [RCState(p.problem) for p in problems], list(problems), [(j, 0) for j in where]
    t_states = time.perf_counter()
    g = cfg.group_size
    requests = [s.messages() for s in states for _ in range(g)]
    seeds = [derive_seed(seed, "group", step, j, q, k) for j, q in keys for k in range(g)]
    flat = engine.generate(requests, dataclasses.replace(cfg.sampling, seed=derive_seed(seed, "group", step)), seeds)
    return Rollouts(version=version, states=states, completions=[flat[i * g:(i + 1) * g] for i in range(len(states))],
                    grades=[], summary_tokens=summary_tokens, problems=owners, summary_stats=stats,
                    times={"states_s": t_states - t0, "generate_s": time.perf_counter() - t_states})


def merge_rollouts(parts: Sequence[Rollouts]) -> Rollouts:
    """One step's Rollouts from its work items' (in problem order): groups concatenated, summary
    counts added (their mean length weighted by calls), times the longest item's (items run side by
    side on several workers), version the oldest."""
    if len(parts) == 1:
        return parts[0]
    stats: dict[str, float] = {}
    calls = sum(p.summary_stats.get("summaries_attempted", 0) for p in parts)
    for p in parts:
        for k, v in p.summary_stats.items():
            if k == "summary_tokens_mean":
                v = v * p.summary_stats.get("summaries_attempted", 0) / max(calls, 1)
            stats[k] = stats.get(k, 0) + v
    times: dict[str, float] = {}
    for p in parts:
        for k, v in p.times.items():
            times[k] = max(times.get(k, 0.0), v)
    return Rollouts(version=min(p.version for p in parts), states=[s for p in parts for s in p.states],
                    completions=[c for p in parts for c in p.completions], grades=[g for p in parts for g in p.grades],
                    summary_tokens=[t for p in parts for t in p.summary_tokens], times=times,
                    problems=[x for p in parts for x in p.problems], summary_stats=stats)


def grade_rollouts(ro: Rollouts, grader: Grader) -> Rollouts:
    """Step 4: every rollout graded alone against its plain problem.

    In a multi-process run every process holds the same rollouts (the sampler is one SPMD
    program); process 0 grades them and sends the scores to the others, so a judge is called once.
    """
    t0 = time.perf_counter()
    flat = [c for group in ro.completions for c in group]
    owners = [p for p, group in zip(ro.problems, ro.completions) for _ in group]
    if jax.process_count() == 1:
        grades = grade_all(grader, owners, flat)
    else:
        from jax.experimental import multihost_utils

        mine = grade_all(grader, owners, flat) if jax.process_index() == 0 else None
        scores = np.asarray([g.score for g in mine] if mine else [0.0] * len(flat), np.float32)
        scores = np.asarray(multihost_utils.broadcast_one_to_all(scores))
        grades = mine or [Grade(float(x), float(x) / MAX_SCORE, "ok", "") for x in scores]
    at, out = 0, []
    for group in ro.completions:
        out.append(grades[at:at + len(group)])
        at += len(group)
    return dataclasses.replace(ro, grades=out, times={**ro.times, "grade_s": time.perf_counter() - t0})


def grade_all(grader: Grader, owners: list[Problem], completions: list[Completion]) -> list[Grade]:
    """Grades each rollout (owners[i] is completion i's problem); length-truncated ones get 0 uncalled."""
    out: list[Grade | None] = [None] * len(completions)
    items, where = [], []
    for i, (p, c) in enumerate(zip(owners, completions)):
        if c.truncated:
            out[i] = Grade(0.0, 0.0, "truncated", "hit the token limit")
        else:
            items.append(GradeItem(p.problem, c.text, p.references))
            where.append(i)
    for i, grade in zip(where, grader.grade(items) if items else []):
        out[i] = grade
    return out
