"""Final-answer checking for answer problems (IMO-AnswerBench): is the last `\\boxed{...}` right?

The candidate's answer is the content of the last complete `\\boxed{...}` after the thinking block.
It is compared with the gold short answer in three layers:

1. Cleaning both sides the same way: `$...$` and `\\(...\\)` delimiters, `\\left`/`\\right`, spacing
   commands, `\\text{...}` wrappers, `\\dfrac`, degree signs and trailing punctuation go.
2. Structure: a top-level list (`2026, 2030`, `a and b`) or a set (`\\{2026, 2030\\}`) is an unordered
   collection of items that must match one to one (`2030, 2026` matches, `2026` alone does not);
   tuples and intervals stay whole (their order matters). An item `f(x) = ...` or `n = ...` is
   compared through its right-hand side. Items with words in them (`odd $n$`, `All powers of 2`)
   are compared as normalised text, since a symbolic parser reads `odd` as the product o*d*d.
3. Symbolic equivalence of math items with math-verify (sympy).

Sympy can hang on adversarial input (`2^{2^{2^{100}}}`), and math-verify's own timeout relies on
SIGALRM, which only works in the main thread, while graders run on worker threads. So every
symbolic comparison runs in a small pool of helper processes (`python -m qedjax.answers`) that are
killed and replaced when a comparison outlives its time limit; this module itself never imports
sympy.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import re
import select
import subprocess
import sys
import threading

from qedjax.text import split_thinking

logger = logging.getLogger(__name__)

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed(text: str) -> str | None:
    """Returns the content of the last complete `\\boxed{...}` in `text` (nested braces allowed).

    Escaped braces `\\{` and `\\}` inside the box do not count towards the nesting. A box whose
    closing brace never comes (a cut-off response) is skipped in favour of an earlier complete one.

    Args:
        text: any text; usually the answer part of a response.

    Returns:
        The stripped box content, or None when there is no complete, non-empty box.
    """
    positions = sorted(
        m.start() for command in _BOX_COMMANDS for m in re.finditer(re.escape(command) + r"\s*\{", text)
    )
    for start in reversed(positions):
        open_brace = text.index("{", start)
        content = _balanced(text, open_brace)
        if content is not None and content.strip():
            return content.strip()
    return None


def _balanced(text: str, open_brace: int) -> str | None:
    """The text between the brace at `open_brace` and its matching closing brace, or None."""
    depth = 0
    i = open_brace
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # an escaped character (`\{`, `\}`, `\\`) never changes the nesting
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1 : i]
        i += 1
    return None


def check_answer(response: str, gold: str, *, timeout_s: float = 5.0) -> bool:
    """Whether the last box of `response` (outside the thinking block) is equivalent to `gold`.

    Args:
        response: the full policy response; a think block that was never closed means no answer.
        gold: the gold short answer, as written in the data (`$...$` and all).
        timeout_s: time limit of the symbolic comparison; running out counts as wrong.

    Returns:
        True when the response has a box and its content matches the gold answer.
    """
    split = split_thinking(response)
    predicted = last_boxed(split.answer) if split.closed else None
    if predicted is None:
        return False
    try:
        return compare_answers(predicted, gold, timeout_s=timeout_s)
    except (TimeoutError, RuntimeError):
        return False


def compare_answers(predicted: str, gold: str, *, timeout_s: float = 5.0) -> bool:
    """Compares an extracted answer with the gold answer (see the module docstring for the rules).

    Safe to call from any thread; the symbolic part runs in a helper process.

    Args:
        predicted: the candidate answer, e.g. the content of its last box.
        gold: the gold short answer.
        timeout_s: time limit of the symbolic comparison.

    Returns:
        True when the answers match.

    Raises:
        TimeoutError: the comparison ran past `timeout_s` (its helper process was replaced).
        RuntimeError: the helper process died for another reason.
    """
    predicted_key, gold_key = _squash(clean(predicted)), _squash(clean(gold))
    if predicted_key == gold_key:
        return True  # the common cases need no helper process: the same text, ...
    if _INTEGER.fullmatch(predicted_key) and _INTEGER.fullmatch(gold_key):
        return int(predicted_key) == int(gold_key)  # ... or two integers
    return _pool().compare(predicted, gold, timeout_s)


# ---------------------------------------------------------------- normalisation (both processes)

_WRAPPERS = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mbox|operatorname)\s*\{([^{}]*)\}")
_REPLACEMENTS = [
    (re.compile(r"\\[dt]frac(?![a-zA-Z])"), r"\\frac"),
    (re.compile(r"\\(?:left|right)(?:\.|(?![a-zA-Z]))"), ""),
    (re.compile(r"\\(?:displaystyle|limits)(?![a-zA-Z])"), ""),
    (re.compile(r"\\(?:[,;:!> ]|quad(?![a-zA-Z])|qquad(?![a-zA-Z]))|~"), " "),
    (re.compile(r"\$|\\\(|\\\)|\\\[|\\\]"), " "),
    (re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°"), ""),
    (re.compile(r"\\(?:[lc]?dots|cdots|ldots)(?![a-zA-Z])|\.\.\.|…"), r"\\ldots "),
    (re.compile(r"\\(le|ge|ne)(?![a-zA-Z])"), r"\\\1q"),
    (re.compile(r"≤"), r"\\leq "),
    (re.compile(r"≥"), r"\\geq "),
    (re.compile(r"≠"), r"\\neq "),
    (re.compile(r"−"), "-"),
    (re.compile(r"\{,\}"), ""),  # LaTeX thousands separator: 4{,}151
    (re.compile(r"\\(mathbb|mathcal|mathbf)\s*([A-Za-z])(?![A-Za-z])"), r"\\\1{\2}"),
    (re.compile(r"\s+"), " "),
]
_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+")
_INTEGER = re.compile(r"[-+]?\d+")
# Two-letter words that show up in olympiad answers and are not products of two variables in
# practice (unlike `an` or `at`); longer letter runs count as text anyway.
_SHORT_WORDS = frozenset({"if", "or", "is", "of", "no"})


def clean(answer: str) -> str:
    """Strips notation that never changes an answer's meaning (see the module docstring)."""
    text = answer.strip()
    previous = None
    while previous != text:  # wrappers can nest: \text{\textbf{odd}}
        previous = text
        text = _WRAPPERS.sub(r" \1 ", text)
    for pattern, replacement in _REPLACEMENTS:
        text = pattern.sub(replacement, text)
    text = text.strip().rstrip(".;,:").strip()
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    return text


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _is_text(item: str) -> bool:
    """Whether an item carries English words (then it is compared as text, not parsed as math)."""
    letters = re.sub(r"\\[a-zA-Z]+", " ", item)
    words = re.findall(r"[A-Za-z]+", letters)
    return any(len(word) >= 3 or word.lower() in _SHORT_WORDS for word in words)


def _text_key(item: str) -> str:
    return _squash(item.lower()).rstrip(".;,:")


def _strip_set_braces(text: str) -> str:
    """`\\{a, b\\}` -> `a, b` when the set braces enclose the whole answer."""
    if not (text.startswith("\\{") and text.endswith("\\}")):
        return text
    depth = 0
    for m in re.finditer(r"\\[{}]", text):
        depth += 1 if m.group(0) == "\\{" else -1
        if depth == 0 and m.end() < len(text):
            return text  # `\{1\} \cup \{2\}`: the first set closes early
    return text[2:-2].strip()


def split_items(answer: str) -> list[str]:
    """Splits a cleaned answer into its top-level items (commas, semicolons, `and`, `or`).

    Brackets of any kind protect their content, so tuples, intervals and function arguments
    stay whole: `(1, 2), [3, 4)` has two items.
    """
    text = _strip_set_braces(answer)
    items, depth, start = [], 0, 0
    i = 0
    while i < len(text):
        char = text[i]
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth = max(depth - 1, 0)
        elif depth == 0:
            word = re.match(r" (?:and|or) ", text[i:]) if char == " " else None
            if char in ",;" or word:
                items.append(text[start:i])
                i += len(word.group(0)) if word else 1
                start = i
                continue
        i += 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


_LHS = re.compile(r"(?P<name>[A-Za-z](?:_\{?\w+\}?)?|\\[a-zA-Z]+)\s*(?:\([^()=]*\))?")


def split_assignment(item: str) -> tuple[str | None, str]:
    """`f(x) = 2x` -> ("f", "2x"); `n = 3` -> ("n", "3"); anything else -> (None, item)."""
    parts = re.split(r"(?<![<>!:\\])=(?!=)", item)
    if len(parts) == 2:
        lhs = _LHS.fullmatch(parts[0].strip())
        if lhs and parts[1].strip():
            return lhs.group("name"), parts[1].strip()
    return None, item


def match_answers(predicted: str, gold: str, math_equal) -> bool:
    """The structural comparison: items matched one to one, each by text or by `math_equal`.

    Args:
        predicted: candidate answer (raw).
        gold: gold answer (raw).
        math_equal: `(gold_item, predicted_item) -> bool` for two math items.

    Returns:
        True when every gold item is matched by exactly one predicted item.
    """
    gold_items = split_items(clean(gold))
    pred_items = split_items(clean(predicted))
    if not gold_items or len(gold_items) != len(pred_items):
        return False
    unmatched = list(pred_items)
    for gold_item in gold_items:
        for j, pred_item in enumerate(unmatched):
            if _items_equal(gold_item, pred_item, math_equal):
                del unmatched[j]
                break
        else:
            return False
    return True


def _items_equal(gold: str, pred: str, math_equal) -> bool:
    if _squash(gold) == _squash(pred):
        return True
    if _is_text(gold) or _is_text(pred):
        return _text_key(gold) == _text_key(pred)
    gold_name, gold_rhs = split_assignment(gold)
    pred_name, pred_rhs = split_assignment(pred)
    if gold_name and pred_name and gold_name != pred_name:
        return False
    # `f(x) = x + 1` against `x + 1` (or the other way round) compares the right-hand sides.
    if gold_name or pred_name:
        gold, pred = gold_rhs, pred_rhs
        if _squash(gold) == _squash(pred):
            return True
    return math_equal(gold, pred)


# ---------------------------------------------------------------- helper process side


def _serve() -> None:
    """Helper process loop: one JSON request per stdin line, one JSON reply per stdout line."""
    import functools

    from math_verify import LatexExtractionConfig, LatexNormalizationConfig, parse, verify
    from sympy import Eq, Expr

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout is disabled" warning
    # math-verify's defaults, except units: those would read `2-2m` as "2 - 2 metres" = 0.
    normalization = LatexNormalizationConfig(
        basic_latex=True, units=False, malformed_operators=True, nits=True, boxed="all", equations=False
    )
    config = [LatexExtractionConfig(normalization_config=normalization)]

    @functools.lru_cache(maxsize=8192)
    def parsed(item: str):
        # Timeouts are off here on purpose: the parent process enforces the time limit.
        return parse(f"${item}$", extraction_config=config, parsing_timeout=None)

    def math_equal(gold: str, pred: str) -> bool:
        gold_parsed, pred_parsed = parsed(gold), parsed(pred)
        if not gold_parsed or not pred_parsed:
            return False
        gold_expr, pred_expr = gold_parsed[0], pred_parsed[0]
        if isinstance(gold_expr, Eq) != isinstance(pred_expr, Eq):
            # `name = value` was unwrapped before (split_assignment); an equation left here is a
            # relation between unknowns, which math-verify would otherwise match to its last side.
            return False
        if isinstance(gold_expr, Expr) and isinstance(pred_expr, Expr):
            # Two plain expressions in different variables are not equal, and sympy can spend a
            # tenth of a second simplifying before it finds out (relations, sets and equations
            # go to math-verify whatever their variables, as it pairs them in cleverer ways).
            if gold_expr.free_symbols != pred_expr.free_symbols:
                return False
        return verify(gold_parsed, pred_parsed, timeout_seconds=None)

    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = {"equal": match_answers(request["predicted"], request["gold"], math_equal)}
        except Exception as error:  # noqa: BLE001 - the parent turns it into a wrong answer
            reply = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(reply), flush=True)


# ---------------------------------------------------------------- parent side: the process pool

_STARTUP_TIMEOUT_S = 120.0


class _Helper:
    """One helper process; used by one thread at a time (the pool hands it out)."""

    def __init__(self):
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qedjax.answers"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
        )
        if self._read_line(_STARTUP_TIMEOUT_S) != "ready":
            self.kill()
            raise RuntimeError("the answer-checking helper process did not start")

    def _read_line(self, timeout_s: float) -> str | None:
        # The helper writes each reply as one short line, so once the pipe is readable the whole
        # line is there and readline does not block.
        ready, _, _ = select.select([self.proc.stdout], [], [], max(timeout_s, 0.0))
        if not ready:
            return None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"answer-checking helper exited (code {self.proc.poll()})")
        return line.strip()

    def compare(self, predicted: str, gold: str, timeout_s: float) -> bool:
        self.proc.stdin.write(json.dumps({"predicted": predicted, "gold": gold}) + "\n")
        self.proc.stdin.flush()
        line = self._read_line(timeout_s)
        if line is None:
            raise TimeoutError(f"answer comparison took longer than {timeout_s} s")
        reply = json.loads(line)
        if "error" in reply:
            logger.warning("answer comparison failed: %s", reply["error"])
            return False
        return bool(reply["equal"])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class _Pool:
    """A fixed number of helper slots; a slot's process is started on first use and after a kill."""

    def __init__(self, size: int):
        self.size = size
        self._idle: queue.LifoQueue[_Helper | None] = queue.LifoQueue()
        self._all: set[_Helper] = set()
        self._lock = threading.Lock()
        for _ in range(size):
            self._idle.put(None)

    def compare(self, predicted: str, gold: str, timeout_s: float) -> bool:
        helper = self._idle.get()
        try:
            if helper is None or helper.proc.poll() is not None:
                helper = self._start()
            return helper.compare(predicted, gold, timeout_s)
        except (TimeoutError, RuntimeError, OSError, ValueError) as error:
            # A helper stuck in sympy, dead, or out of step with its pipe is replaced, not reused.
            if helper is not None:
                self._discard(helper)
                helper = None
            if isinstance(error, TimeoutError):
                raise
            raise RuntimeError(f"answer comparison failed: {error}") from error
        finally:
            self._idle.put(helper)

    def _start(self) -> _Helper:
        helper = _Helper()
        with self._lock:
            self._all.add(helper)
        return helper

    def _discard(self, helper: _Helper) -> None:
        helper.kill()
        with self._lock:
            self._all.discard(helper)

    def close(self) -> None:
        with self._lock:
            helpers, self._all = list(self._all), set()
        for helper in helpers:
            helper.kill()


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> _Pool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = _Pool(size=max(1, min(4, os.cpu_count() or 1)))
            atexit.register(_POOL.close)
        return _POOL


def _forget_pool_in_child() -> None:
    # A forked child shares the parent's pipes; talking through them would garble both sides.
    global _POOL
    _POOL = None


os.register_at_fork(after_in_child=_forget_pool_in_child)


def pool_size() -> int:
    """How many comparisons can run at once (the number of helper processes)."""
    return _pool().size


if __name__ == "__main__":
    _serve()
