"""Rewards: the Grader protocol and the three graders the RL loop and evaluation use.

Every grader maps a batch of `GradeItem`s to `Grade`s on the same 0..7 scale (reward = score / 7),
so the RL loop cannot tell a judge model from an answer check or a rule:

- `JudgeGrader`: a judge model behind an OpenAI-compatible API (qedjax.judge does the HTTP) reads the
  problem, a marking scheme (style "rubric", used for RL) or a reference solution with grading
  guidelines (style "proofbench", IMO-ProofBench), and the proof; it answers with a score tag.
- `AnswerGrader`: 7 when the last `\\boxed{...}` is equivalent to the gold answer (qedjax.answers).
- `RuleGrader`: deterministic regex checkpoints for synthetic tasks such as the embedded demo's.

Before any grader looks at a response, `prepare_response` keeps only what follows `</think>` (an
unclosed think block is a truncated response, worth 0) and cuts any self-evaluation section the
policy appended, so a proof cannot talk its way into points.

Graders never raise for a bad response or a failed call: that item gets reward 0 and a reason.
They do raise ValueError for bad data (a missing reference field, a rubric whose points do not add
up to 7), since grading around it would silently score every sample of that problem wrong.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import importlib.resources
import json
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Protocol

from qedjax import answers
from qedjax.judge import JudgeConfig, complete_all
from qedjax.text import split_thinking

logger = logging.getLogger(__name__)

MAX_SCORE = 7
REASONS = ("ok", "no_answer", "truncated", "parse_error", "judge_error", "timeout")

__all__ = [
    "MAX_SCORE",
    "REASONS",
    "AnswerGrader",
    "Grade",
    "GradeItem",
    "Grader",
    "JudgeConfig",
    "JudgeGrader",
    "RuleGrader",
    "make_grader",
    "parse_score",
    "prepare_response",
    "render_judge_prompt",
]


@dataclasses.dataclass(frozen=True)
class GradeItem:
    problem: str
    response: str  # the full policy response, thinking included
    # Per grader: "marking_scheme" (rubric judge), "solution" + "guidelines" (ProofBench judge),
    # "answer" (answer grader), "rubric" (rule grader, JSON).
    references: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Grade:
    score: float  # 0..MAX_SCORE
    reward: float  # score / MAX_SCORE
    reason: str  # one of REASONS
    raw: str = ""  # judge text, or a short explanation, kept for inspection


class Grader(Protocol):
    def grade(self, items: Sequence[GradeItem]) -> list[Grade]:
        """One Grade per item, in order; a bad response or a failed call is a Grade, not an error."""
        ...


def _scored(score: float, raw: str) -> Grade:
    return Grade(score=float(score), reward=float(score) / MAX_SCORE, reason="ok", raw=raw)


_UNGRADABLE = {"truncated": "the think block was never closed", "no_answer": "nothing to grade after the thinking"}


def _failed(reason: str, raw: str = "") -> Grade:
    return Grade(score=0.0, reward=0.0, reason=reason, raw=raw or _UNGRADABLE.get(reason, ""))


# A heading-like line that opens a self-evaluation: "## Self-Evaluation", "**Self assessment:**", ...
_SELF_EVALUATION = re.compile(
    r"^[ \t>]*(?:#{1,6}[ \t]*)?(?:\*\*|__)?[ \t]*self[- ]?(?:evaluation|assessment|grading|verification)\b",
    re.IGNORECASE | re.MULTILINE,
)


def prepare_response(response: str) -> tuple[str | None, str]:
    """Cuts a response down to the part that is graded.

    Args:
        response: the full policy response, thinking included.

    Returns:
        (text, "ok") with the thinking and any trailing self-evaluation section removed, or
        (None, "truncated") for an unclosed think block, or (None, "no_answer") when nothing is left.
    """
    split = split_thinking(response)
    if not split.closed:
        return None, "truncated"
    text = split.answer
    heading = _SELF_EVALUATION.search(text)
    if heading:
        text = text[: heading.start()]
    text = text.strip()
    if not text:
        return None, "no_answer"
    return text, "ok"


# ---------------------------------------------------------------- judge grader

# The reference fields each prompt style needs, besides the problem and the proof.
STYLE_FIELDS = {"rubric": ("marking_scheme",), "proofbench": ("solution", "guidelines")}
_SCORE_TAG = {"rubric": "score", "proofbench": "points"}


@functools.cache
def _template(style: str) -> str:
    return (importlib.resources.files("qedjax") / "prompts" / f"judge_{style}.txt").read_text("utf-8")


def _require_fields(style: str, values: Mapping[str, object], problem: str) -> None:
    for field, value in values.items():
        if not isinstance(value, str) or not value.strip():
            raise ValueError(
                f"judge prompt ({style}) needs a non-empty {field!r}; it is missing or empty "
                f"for problem {str(problem)[:80]!r}"
            )


def render_judge_prompt(style: str, problem: str, proof: str, references: Mapping[str, str]) -> str:
    """Fills the judge prompt of `style` with the problem, the proof and the reference fields.

    Args:
        style: "rubric" (needs references["marking_scheme"]) or "proofbench" (needs
            references["solution"] and references["guidelines"]).
        problem: the problem statement.
        proof: the graded text (already passed through prepare_response).
        references: the item's reference fields.

    Returns:
        The prompt text.

    Raises:
        ValueError: a field is missing or empty, or the template lacks a field's slot; a prompt
            never goes out with a field silently left out.
    """
    values = {"problem": problem, "proof": proof}
    values.update({field: references.get(field) for field in STYLE_FIELDS[style]})
    _require_fields(style, values, problem)
    template = _template(style)
    slots = set(re.findall(r"\{\{(\w+)\}\}", template))
    if slots != set(values):
        raise ValueError(f"judge_{style}.txt has slots {sorted(slots)}, expected {sorted(values)}")
    # One pass with a function: text inserted for one slot is never scanned for further slots.
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], template)


def parse_score(style: str, text: str) -> float | None:
    """The score in the judge's last score tag, or None when there is no valid one.

    Rubric replies end with `<score>N</score>`, ProofBench replies with `<points>N out of 7</points>`.
    The last tag wins (a judge may quote the format while reasoning); a value outside 0..7, a
    non-number, or an unfinished think block gives None.
    """
    split = split_thinking(text)
    if not split.closed:
        return None
    tag = _SCORE_TAG[style]
    tags = re.findall(rf"<{tag}>(.*?)</{tag}>", split.answer, re.IGNORECASE | re.DOTALL)
    if not tags:
        return None
    number = re.fullmatch(
        rf"\s*\**\s*(\d+(?:\.\d+)?)\s*(?:(?:/|out\s+of)\s*{MAX_SCORE})?\s*\**\s*\.?\s*", tags[-1], re.IGNORECASE
    )
    if number is None:
        return None
    score = float(number.group(1))
    return score if 0 <= score <= MAX_SCORE else None


class JudgeGrader:
    """Grades proofs with a judge model; see qedjax.judge for the transport and JudgeConfig."""

    def __init__(self, config: JudgeConfig = JudgeConfig()):
        self.config = config
        _template(config.style)  # a missing prompt file fails here, not in the middle of a run

    def grade(self, items: Sequence[GradeItem]) -> list[Grade]:
        """Grades a batch; a failed or unparseable judge call costs only its own item.

        Raises:
            ValueError: an item lacks a reference field the prompt style needs.
        """
        style = self.config.style
        grades: list[Grade | None] = [None] * len(items)
        prompts, slots = [], []
        for item in items:  # bad data is reported even when this batch's sample is truncated
            fields = {"problem": item.problem, **{f: item.references.get(f) for f in STYLE_FIELDS[style]}}
            _require_fields(style, fields, item.problem)
        for i, item in enumerate(items):
            text, reason = prepare_response(item.response)
            if text is None:
                grades[i] = _failed(reason)
            else:
                prompts.append(render_judge_prompt(style, item.problem, text, item.references))
                slots.append(i)
        replies = complete_all(self.config, prompts) if prompts else []
        for i, reply in zip(slots, replies):
            if reply.text is None:
                grades[i] = _failed(reply.error, reply.detail)
                continue
            score = parse_score(style, reply.text)
            grades[i] = _failed("parse_error", reply.text) if score is None else _scored(score, reply.text)
        failed = sum(1 for i in slots if grades[i].reason != "ok")
        if failed:
            logger.info("judge: %d of %d calls gave no score", failed, len(slots))
        return grades


# ---------------------------------------------------------------- answer grader


class AnswerGrader:
    """7 points when the last box (after the thinking) matches references["answer"], else 0."""

    def __init__(self, timeout_s: float = 5.0):
        self.timeout_s = timeout_s

    def grade(self, items: Sequence[GradeItem]) -> list[Grade]:
        """Grades a batch, running comparisons on all of qedjax.answers' helper processes at once.

        Raises:
            ValueError: an item has no references["answer"].
        """
        for item in items:
            if not str(item.references.get("answer", "")).strip():
                raise ValueError(f"answer grader needs references['answer'] for problem {item.problem[:80]!r}")
        if len(items) <= 1:
            return [self._grade_one(item) for item in items]
        with concurrent.futures.ThreadPoolExecutor(max_workers=answers.pool_size()) as pool:
            return list(pool.map(self._grade_one, items))

    def _grade_one(self, item: GradeItem) -> Grade:
        text, reason = prepare_response(item.response)
        if text is None:
            return _failed(reason)
        predicted = answers.last_boxed(text)
        if predicted is None:
            return _failed("no_answer", "no \\boxed{...} in the answer")
        raw = f"boxed: {predicted}"
        try:
            correct = answers.compare_answers(predicted, item.references["answer"], timeout_s=self.timeout_s)
        except TimeoutError:
            return _failed("timeout", raw)
        except RuntimeError as exc:
            return _failed("judge_error", f"{raw} ({exc})")
        return _scored(MAX_SCORE if correct else 0, raw)


# ---------------------------------------------------------------- rule grader


@dataclasses.dataclass(frozen=True)
class _Rule:
    pattern: re.Pattern
    points: int
    description: str


@functools.lru_cache(maxsize=4096)
def _parse_rubric(rubric_json: str, problem: str) -> tuple[tuple[_Rule, ...], tuple[_Rule, ...]]:
    """Checkpoints and deductions of a rule rubric, validated (a group's samples share one parse)."""
    where = f"rule rubric of problem {problem[:80]!r}"
    try:
        spec = json.loads(rubric_json)
        checkpoints = tuple(
            _Rule(re.compile(c["pattern"]), int(c["points"]), c.get("description", "")) for c in spec["checkpoints"]
        )
        deductions = tuple(
            _Rule(re.compile(d["pattern"]), int(d["points"]), d.get("description", ""))
            for d in spec.get("deductions", [])
        )
    except (ValueError, KeyError, TypeError, re.error) as exc:
        raise ValueError(f"{where} is malformed: {exc}") from exc
    total = sum(c.points for c in checkpoints)
    if total != MAX_SCORE:
        raise ValueError(f"{where}: checkpoint points sum to {total}, not {MAX_SCORE}")
    return checkpoints, deductions


class RuleGrader:
    """Deterministic checkpoint scoring from references["rubric"] (JSON), on the judge's 0..7 scale.

    The rubric is `{"checkpoints": [{"pattern": REGEX, "points": int, "description": str}, ...],
    "deductions": [{"pattern": REGEX, "points": int}, ...]}` (deductions optional). A checkpoint
    scores when its pattern is found in the graded text; the score is the checkpoint points minus
    the points of the deductions found, clipped to 0..7.
    """

    def grade(self, items: Sequence[GradeItem]) -> list[Grade]:
        """Grades a batch.

        Raises:
            ValueError: a rubric is missing, malformed, or its checkpoints do not sum to 7.
        """
        rubrics = []
        for item in items:
            if "rubric" not in item.references:
                raise ValueError(f"rule grader needs references['rubric'] for problem {item.problem[:80]!r}")
            rubrics.append(_parse_rubric(item.references["rubric"], item.problem))
        return [self._grade_one(item, *rubric) for item, rubric in zip(items, rubrics)]

    @staticmethod
    def _grade_one(item: GradeItem, checkpoints, deductions) -> Grade:
        text, reason = prepare_response(item.response)
        if text is None:
            return _failed(reason)
        earned = [c for c in checkpoints if c.pattern.search(text)]
        lost = [d for d in deductions if d.pattern.search(text)]
        score = min(max(sum(c.points for c in earned) - sum(d.points for d in lost), 0), MAX_SCORE)
        raw = "earned: " + "; ".join(c.description or c.pattern.pattern for c in earned)
        if lost:
            raw += " | deducted: " + "; ".join(d.description or d.pattern.pattern for d in lost)
        return _scored(score, raw)


_GRADERS = {
    "judge": lambda **kwargs: JudgeGrader(JudgeConfig(**kwargs)),
    "answer": AnswerGrader,
    "rule": RuleGrader,
}


def make_grader(kind: str, **kwargs) -> Grader:
    """Builds a grader by name.

    Args:
        kind: "judge" (kwargs are JudgeConfig fields), "answer" (timeout_s) or "rule" (none).

    Returns:
        The grader.
    """
    if kind not in _GRADERS:
        raise ValueError(f"unknown grader {kind!r}; expected one of {sorted(_GRADERS)}")
    return _GRADERS[kind](**kwargs)
