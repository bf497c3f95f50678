"""Scripted stand-ins for a rollout engine and a grader, so RC and eval tests run without a model.

`FakeEngine` answers each request with a function of (kind, text, params, index): `kind` names the
prompt template the request was rendered from (found by the template's fixed first line), `index`
is the request's position in its `generate` call. A token is a whitespace-separated word; a reply
longer than `max_new_tokens` words is cut there and finishes with "length", like a real engine.
Every call is recorded, so tests can count calls and requests per kind.

`FakeGrader` scores items with a function and records what it was asked.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from qedjax.rewards import Grade, GradeItem
from qedjax.rollout.engine import FINISH_LENGTH, FINISH_STOP, Completion, Request, SamplingParams

PROMPT_DIR = Path(__file__).resolve().parents[1] / "qedjax" / "prompts"


def _first_lines() -> dict[str, str]:
    lines = {}
    for path in sorted(PROMPT_DIR.glob("*.txt")):
        first = path.read_text().strip().splitlines()[0]
        if "{{" not in first:
            lines[path.stem] = first
    return lines


FIRST_LINES = _first_lines()


def request_text(request: Request) -> str:
    """The text of a request: the prompt itself, or the chat's message contents joined."""
    if isinstance(request, str):
        return request
    return "\n".join(message["content"] for message in request)


def prompt_kind(text: str) -> str | None:
    """The template a request starts with (e.g. "rc_reason", "eval_verify"), or None."""
    for name, first in FIRST_LINES.items():
        if text.startswith(first):
            return name
    return None


Responder = Callable[[str | None, str, SamplingParams, int], str]


def default_respond(kind: str | None, text: str, params: SamplingParams, index: int) -> str:
    """A well-formed reply of each kind: closed thinking, then an answer."""
    if kind == "eval_verify":
        return "<think>checking</think> No problems found. Score: 1"
    if kind == "eval_compare":
        return "<think>comparing</think> Better: 1"
    if kind in ("rc_summarize", "rc_summarize_append"):
        return f"<think>condensing</think> I tried something (request {index})."
    return f"<think>working on it</think> Proof number {index} seed {params.seed}."


class FakeEngine:
    """A RolloutEngine whose replies come from `respond`; records every call."""

    def __init__(self, respond: Responder = default_respond, fail_on_call: int | None = None):
        self.respond = respond
        self.fail_on_call = fail_on_call  # raise on this (0-based) generate call: an interrupted run
        self.calls: list[tuple[list[tuple[str | None, str]], SamplingParams]] = []
        self.version = 0

    def generate(self, requests: Sequence[Request], params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> list[Completion]:
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise RuntimeError("engine killed")
        batch = [(prompt_kind(request_text(r)), request_text(r)) for r in requests]
        self.calls.append((batch, params))
        if seeds is not None:  # each request its own stream: index 0 of a call with its seed
            return [self._complete(kind, text, replace(params, seed=s), 0) for (kind, text), s in zip(batch, seeds)]
        return [self._complete(kind, text, params, i) for i, (kind, text) in enumerate(batch)]

    def _complete(self, kind: str | None, text: str, params: SamplingParams, index: int) -> Completion:
        reply = self.respond(kind, text, params, index)
        words = reply.split()
        finish = FINISH_STOP
        if len(words) > params.max_new_tokens:
            words, finish = words[: params.max_new_tokens], FINISH_LENGTH
            reply = " ".join(words)
        return Completion(
            text=reply,
            tokens=tuple(range(len(words))),
            logprobs=(0.0,) * len(words),
            finish_reason=finish,
            prompt_tokens=tuple(range(len(text.split()))),
        )

    @property
    def requests(self) -> list[tuple[str | None, str]]:
        """Every request of every call, in order, as (kind, text)."""
        return [item for batch, _ in self.calls for item in batch]

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.requests if k == kind)

    def load_weights(self, version: int, weights=None) -> None:
        self.version = version

    def count_tokens(self, text: str) -> int:
        return len(text.split())


class FakeGrader:
    """A Grader whose 0..7 score (or whole Grade) comes from `score(item)`; records every item."""

    def __init__(self, score: Callable[[GradeItem], float | Grade]):
        self.score = score
        self.items: list[GradeItem] = []
        self.calls = 0

    def grade(self, items: Sequence[GradeItem]) -> list[Grade]:
        self.calls += 1
        self.items.extend(items)
        grades = []
        for item in items:
            value = self.score(item)
            if not isinstance(value, Grade):
                value = Grade(float(value), value / 7, "ok", "fake")
            grades.append(value)
        return grades
