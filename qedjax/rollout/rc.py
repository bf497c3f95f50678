"""The reasoning-cache (RC) loop: reason, summarise the reasoning, reason again from the summary.

A turn prompts the policy with the problem and the current summary (none on the first turn). The
thinking part of its response is then summarised by a summariser engine (the policy itself at test
time; a frozen instruct model in training) and the new summary replaces the old one, or is appended
to it in "append" mode. The next turn starts from the new summary, so each turn sees a short state
instead of the whole transcript (Wu et al. 2026, "Reasoning Cache").

Every turn makes one `policy.generate` call over all problems of the batch and, when a summary is
made, one `summarizer.generate` call, so an engine sees full batches.

Decisions worth knowing:
- Only the thinking is summarised. A response without a think block (a non-thinking model) is
  summarised whole, since then the reasoning is the answer.
- A turn is truncated when the engine stopped at `max_new_tokens` or the think block never closed.
  It is still summarised (the partial reasoning is worth keeping), but the summariser is told the
  attempt was cut off, and `RCTurn.truncated` marks it; nothing pretends it was complete.
- The summary is the answer part of the summariser's response. If that is empty (a thinking
  summariser that ran out of tokens) the previous summary is kept, so a failed summary never wipes
  the state; `summary_outcome` names what happened and `summary_stats` counts it, so states that
  silently repeat the previous summary show up in the metrics.
- Seeds: turn 0 samples with `params.seed` itself, so RC's first turn equals a single sample with the
  same params; later turns and every summary use seeds derived from `(seed, role, turn)`, so turns
  differ and runs reproduce.
- "append" mode asks the summariser about the latest attempt only and appends that paragraph to the
  earlier summaries; "replace" (the paper's) asks for a merged summary that replaces the old one.
- `summarize_last=True` also summarises the last turn, which yields the state a further turn would
  start from: 3 turns then give the 4 training states of ALGORITHMS.md (no summary, summaries 1..3).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from pathlib import Path
from typing import Sequence

from qedjax.rollout.engine import Completion, Message, RolloutEngine, SamplingParams
from qedjax.text import split_thinking

PROMPT_DIR = Path(__file__).resolve().parents[1] / "prompts"
MODES = ("replace", "append")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@functools.lru_cache(maxsize=None)
def _template(name: str) -> str:
    return (PROMPT_DIR / f"{name}.txt").read_text().strip()


def render_prompt(name: str, **values: str) -> str:
    """Fills the template `qedjax/prompts/<name>.txt`.

    Placeholders are `{{key}}`. Substitution is a single pass, so a value that itself contains
    `{{...}}` (or LaTeX braces) is inserted verbatim, never expanded.

    Args:
        name: template file name without `.txt`.
        **values: one string per placeholder of the template.

    Returns:
        The filled prompt.

    Raises:
        KeyError: the template has a placeholder with no value.
    """
    template = _template(name)

    def fill(match: re.Match) -> str:
        key = match.group(1)
        if key not in values:
            raise KeyError(f"prompt {name!r} needs a value for {{{{{key}}}}}")
        return values[key]

    return _PLACEHOLDER.sub(fill, template)


def derive_seed(seed: int, *tags: object) -> int:
    """A seed for a sub-step (a turn, a round, a role) that differs from `seed` and its siblings.

    With no tags it is `seed` itself. Hashing rather than adding offsets keeps seeds of different
    sub-steps from colliding (seed + turn would give turn 1 of seed 0 the seed of turn 0 of seed 1).

    Args:
        seed: the parent seed.
        *tags: anything with a stable repr naming the sub-step, e.g. ("reason", 2).

    Returns:
        A non-negative 31-bit seed.
    """
    if not tags:
        return seed
    digest = hashlib.sha256(repr((seed, *tags)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclasses.dataclass(frozen=True)
class RCState:
    """What a turn (and a GRPO group in RC training) is conditioned on."""

    problem: str
    summary: str = ""  # "" on the first turn
    turn: int = 0  # 0-based

    def messages(self) -> list[Message]:
        """The chat request for the policy, built from the rc_reason* templates."""
        if self.summary:
            content = render_prompt("rc_reason_summary", problem=self.problem, summary=self.summary)
        else:
            content = render_prompt("rc_reason", problem=self.problem)
        return [{"role": "user", "content": content}]


@dataclasses.dataclass(frozen=True)
class RCTurn:
    """One reasoning turn and the summary made after it."""

    state: RCState
    completion: Completion  # the policy's response
    truncated: bool  # hit max_new_tokens or never closed its think block
    summary_completion: Completion | None  # None when no summary was made after this turn
    new_summary: str  # the summary after this turn ("" if none was made)


@dataclasses.dataclass(frozen=True)
class RCResult:
    """All turns of one problem."""

    problem: str
    turns: tuple[RCTurn, ...]

    @property
    def final_response(self) -> str:
        """The last turn's full response (thinking included): what gets graded."""
        return self.turns[-1].completion.text

    @property
    def final_answer(self) -> str:
        """The last turn's answer part (after the think block); "" when it was cut off."""
        return split_thinking(self.final_response).answer

    @property
    def states(self) -> tuple[RCState, ...]:
        """Every state reached: one per turn, plus the next turn's state when the last turn was
        summarised (`summarize_last`)."""
        states = tuple(t.state for t in self.turns)
        last = self.turns[-1]
        if last.summary_completion is not None:
            states += (RCState(self.problem, last.new_summary, last.state.turn + 1),)
        return states

    @property
    def policy_tokens(self) -> int:
        return sum(len(t.completion.tokens) for t in self.turns)

    @property
    def summary_tokens(self) -> int:
        return sum(len(t.summary_completion.tokens) for t in self.turns if t.summary_completion is not None)

    @property
    def tokens(self) -> int:
        """All generated tokens (policy and summariser); prompts are not counted."""
        return self.policy_tokens + self.summary_tokens

    @property
    def calls(self) -> int:
        """Generation requests made for this problem (policy turns plus summaries)."""
        return len(self.turns) + sum(1 for t in self.turns if t.summary_completion is not None)


def is_truncated(completion: Completion) -> bool:
    """Whether a response stopped early: at the token limit, or with its think block still open."""
    return completion.truncated or not split_thinking(completion.text).closed


def summary_request(state: RCState, completion: Completion, *, mode: str = "replace") -> list[Message]:
    """The summariser's chat request for the response `completion` to `state`.

    Args:
        state: the state the response answered.
        completion: the policy's response.
        mode: "replace" (merge with the previous summary) or "append" (latest attempt only).

    Returns:
        A one-message chat.
    """
    split = split_thinking(completion.text)
    attempt = split.thinking or split.answer  # no think block: the whole response is the reasoning
    note = "\n" + render_prompt("rc_truncated_note") + "\n" if is_truncated(completion) else ""
    template = "rc_summarize" if mode == "replace" else "rc_summarize_append"
    content = render_prompt(
        template,
        problem=state.problem,
        summary=state.summary or render_prompt("rc_no_summary"),
        attempt=attempt,
        note=note,
    )
    return [{"role": "user", "content": content}]


def next_summary(previous: str, summary_completion: Completion, *, mode: str = "replace") -> str:
    """The summary after a turn, from the summariser's response (see the module docstring)."""
    summary = split_thinking(summary_completion.text).answer
    if not summary:
        return previous
    if mode == "append" and previous:
        return previous + "\n\n" + summary
    return summary


SUMMARY_FAILURES = ("unclosed_think", "length")


def summary_outcome(completion: Completion) -> str:
    """What a summary call gave: "ok" (a summary; it may have been cut at the token limit), "empty"
    (the summariser finished with nothing after its thinking), or a failure: "unclosed_think" (its
    think block never closed, so no summary) or "length" (it closed the think block only at the
    token limit, with nothing after it). Only "ok" changes the state."""
    split = split_thinking(completion.text)
    if split.answer:
        return "ok"
    if not split.closed:
        return "unclosed_think"
    return "length" if completion.truncated else "empty"


def summary_stats(results: Sequence[RCResult]) -> dict[str, float]:
    """Counts over every summary call of `results`: attempted, ok, empty, failed by reason, cut off
    at the limit (partial summary kept), and the mean generated length of a summary call in tokens."""
    calls = [t.summary_completion for r in results for t in r.turns if t.summary_completion is not None]
    outcomes = [summary_outcome(c) for c in calls]
    out: dict[str, float] = {"summaries_attempted": len(calls), "summaries_ok": outcomes.count("ok"),
                             "summaries_empty": outcomes.count("empty")}
    out.update({f"summaries_failed_{why}": outcomes.count(why) for why in SUMMARY_FAILURES})
    out["summaries_cut_off"] = sum(1 for c, o in zip(calls, outcomes) if o == "ok" and c.truncated)
    if calls:
        out["summary_tokens_mean"] = sum(len(c.tokens) for c in calls) / len(calls)
    return out


def _generate(engine: RolloutEngine, requests, params: SamplingParams, seeds):
    """engine.generate, passing per-request seeds only when there are any (engines written before the
    seeds argument still serve the batch-seeded callers)."""
    if seeds is None:
        return engine.generate(requests, params)
    return engine.generate(requests, params, seeds)


def run_rc(
    policy: RolloutEngine,
    problems: Sequence[str],
    *,
    turns: int,
    params: SamplingParams,
    summarizer: RolloutEngine | None = None,
    summary_params: SamplingParams | None = None,
    mode: str = "replace",
    summarize_last: bool = False,
    seeds: Sequence[int] | None = None,
) -> list[RCResult]:
    """Runs `turns` reasoning turns on every problem, batched across problems.

    Args:
        policy: the engine that reasons.
        problems: problem statements (repeats allowed: each entry is its own run).
        turns: reasoning turns per problem (>= 1).
        params: the policy's sampling params; the seed is varied per turn (module docstring).
        summarizer: the engine that summarises; defaults to `policy`.
        summary_params: the summariser's sampling params; defaults to `params`.
        mode: "replace" or "append".
        summarize_last: also summarise the last turn (to get the state after it).
        seeds: one seed per problem, replacing the params' seeds: problem i's turns and summaries then
            draw from streams of seeds[i] alone, so its run is the same in any batch (rollout workers
            split a step's problems over several calls).

    Returns:
        One RCResult per problem, in order.
    """
    if turns < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    summarizer = summarizer if summarizer is not None else policy
    summary_params = summary_params if summary_params is not None else params
    states = [RCState(problem) for problem in problems]
    history: list[list[RCTurn]] = [[] for _ in problems]
    for turn in range(turns):
        # Turn 0 keeps params.seed, so RC's first turn is exactly a single sample.
        reason_seed = derive_seed(params.seed, "reason", turn) if turn else params.seed
        own = None if seeds is None else [derive_seed(s, "reason", turn) if turn else s for s in seeds]
        completions = _generate(policy, [s.messages() for s in states], dataclasses.replace(params, seed=reason_seed),
                                own)
        summaries: list[Completion | None] = [None] * len(states)
        if turn < turns - 1 or summarize_last:
            requests = [summary_request(s, c, mode=mode) for s, c in zip(states, completions)]
            summary_seed = derive_seed(summary_params.seed, "summarize", turn)
            seeded = dataclasses.replace(summary_params, seed=summary_seed)
            own = None if seeds is None else [derive_seed(s, "summarize", turn) for s in seeds]
            summaries = list(_generate(summarizer, requests, seeded, own))
        for i, (state, completion, summary) in enumerate(zip(states, completions, summaries)):
            new_summary = next_summary(state.summary, summary, mode=mode) if summary is not None else ""
            history[i].append(RCTurn(state, completion, is_truncated(completion), summary, new_summary))
            states[i] = RCState(state.problem, new_summary, turn + 1)
    return [RCResult(problem, tuple(turns_)) for problem, turns_ in zip(problems, history)]


def rc_states(
    policy: RolloutEngine,
    problems: Sequence[str],
    *,
    turns: int,
    params: SamplingParams,
    summarizer: RolloutEngine | None = None,
    summary_params: SamplingParams | None = None,
    mode: str = "replace",
) -> list[tuple[RCState, ...]]:
    """The states of an RC run for RC training: `turns` reasoning turns, each summarised, give
    `turns + 1` states per problem (no summary, then summaries 1..turns).

    Args:
        policy, problems, turns, params, summarizer, summary_params, mode: as in `run_rc`.

    Returns:
        Per problem, its `turns + 1` states in turn order.
    """
    results = run_rc(
        policy,
        problems,
        turns=turns,
        params=params,
        summarizer=summarizer,
        summary_params=summary_params,
        mode=mode,
        summarize_last=True,
    )
    return [result.states for result in results]
