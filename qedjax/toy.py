"""The embedded demo's task and tokenizer: everything the toy pipeline needs, generated locally.

The task stands in for olympiad proofs at a scale two CPU cores can train in minutes. A problem
asks to add one (mod 10) to each digit of a list; the expected answer has a short think block,
then `Answer: e1 e2 ... e7`. A rubric gives one point per correctly placed digit (7 digits, 7 points),
graded by qedjax.rewards.RuleGrader exactly as the judge's 0..7 scale would be. The SFT "teacher"
is deliberately imperfect (a fraction of its demonstrations misplace digits, like the graded
teacher proofs of FineProofs), so SFT learns the format and most of the skill, and RL has
headroom to beat its teacher.

The tokenizer is a byte-level BPE trained on the task and on the project's prompt templates, saved
as a Hugging Face tokenizer directory with a Qwen3-style chat template (thinking models open the
think block in the generation prompt).

`ToyConfig.task="long"` is the reasoning-cache variant (configs/tiny-rc.yaml, tools/rc_compare.py).
Its digits carry labels, a label and its digit spelt as one token: the problem reads
`Add one to each digit: A3 B5 C9 D0 E2 F7 G1`, the thinking works the digits in order, three tokens
each (`Working. A3 a4, B5 b6,`: copy the labelled digit, write its result), and the answer lists
the results found so far (`Answer: a4 b6`), one rubric point per correct result, so a partial
answer scores partially. Every copy is thus a lookup of the token with the next label, wherever it
sits, which the demo model learns in a few hundred SFT steps (an earlier layout that copied the k-th
digit by position was not learnt in 900). Working all seven digits and
answering takes 37 tokens, more than the per-call budget of the RC config (26: room for four
digits), so a single call either answers part of the problem or is cut off: the budget, not the
model, limits one pass. The teacher works a random number of digits per turn; a turn that continues
from an RC summary (`So far: a4 b6 c0.`) restates the known results (`Known: a4 b6 c0.`) and works
on from the next label, and the summary of an attempt lists the results of its finished work items,
so progress is carried from turn to turn only by the summary. Within the budget, three turns can
finish a problem (4 + 2 + 1 digits: restating grows with what is known).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import random
import re
from typing import Iterator

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = [THINK_OPEN, THINK_CLOSE]
PAD, EOS = "<|endoftext|>", "<|im_end|>"
TASKS = ("add_one", "long")

# Qwen3-Thinking-style: the last assistant turn always carries a think block, and the generation
# prompt opens one, so a rendered prompt is a prefix of the rendered conversation.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message.role == 'assistant' %}"
    "<|im_start|>assistant\n<think>\n"
    "{% if message.reasoning_content is defined and message.reasoning_content %}"
    "{{ message.reasoning_content | trim }}\n"
    "{% endif %}"
    "</think>\n\n{{ message.content | trim }}<|im_end|>\n"
    "{% else %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """The generated data of the demo."""

    task: str = "add_one"  # "add_one": the demo's task | "long": its RC variant (module docstring)
    num_digits: int = 7
    sft_rows: int = 2000
    rl_problems: int = 256
    eval_problems: int = 32
    teacher_error_rate: float = 0.5  # fraction of demonstrations with misplaced (long: one wrong) digits
    vocab_size: int = 1024
    summary_rows: float = 0.25  # fraction of SFT rows that continue from an RC summary
    summarize_rows: float = 0.15  # fraction of SFT rows that teach writing an RC summary
    seed: int = 1234

    def __post_init__(self):
        if self.num_digits != 7:
            raise ValueError("toy.num_digits must be 7: one rubric point per digit on the 0..7 scale")
        if self.task not in TASKS:
            raise ValueError(f"toy.task must be one of {TASKS}, got {self.task!r}")
        if not 0 <= self.teacher_error_rate <= 1:
            raise ValueError(f"toy.teacher_error_rate must be in [0, 1], got {self.teacher_error_rate}")


def problem_text(digits: list[int]) -> str:
    return "Add one to each digit: " + " ".join(map(str, digits))


def target(digits: list[int]) -> list[int]:
    return [(d + 1) % 10 for d in digits]


def rubric(digits: list[int]) -> dict:
    """One checkpoint per position of the answer, one point each (7 in all)."""
    target_ = target(digits)
    return {"checkpoints": [
        {"pattern": r"Answer:\s*" + r"(?:\S+\s+)" + "{" + str(i) + "}" + f"{d}(?:\\s|$)",
         "points": 1, "description": f"position {i + 1} is {d}"}
        for i, d in enumerate(target_)]}


def teacher_answer(digits: list[int], rng: random.Random, error_rate: float) -> list[int]:
    """The right answer; with probability error_rate two of its digits are swapped."""
    answer = target(digits)
    if rng.random() < error_rate:
        i, j = rng.sample(range(len(answer)), 2)
        answer[i], answer[j] = answer[j], answer[i]
    return answer


def solution(digits: list[int], answer: list[int]) -> tuple[str, str]:
    """(reasoning, final answer) of a demonstration: the thinking restates the digits (a copy, which
    a small transformer learns fast), the answer adds one to each (a fixed-offset lookup)."""
    return "The digits are " + " ".join(map(str, digits)) + ".", "Answer: " + " ".join(map(str, answer))


def summary_of(digits: list[int]) -> str:
    """What a summariser should say of a demonstration's thinking (which restates the digits)."""
    return "I listed the digits " + " ".join(map(str, digits)) + " and was about to add one to each."


def teacher_solution(digits: list[int], rng: random.Random, error_rate: float) -> tuple[str, str]:
    """(reasoning, answer) of a demonstration; with probability error_rate two digits are swapped."""
    return solution(digits, teacher_answer(digits, rng, error_rate))


def _problems(rng: random.Random, n: int, num_digits: int) -> Iterator[list[int]]:
    for _ in range(n):
        yield [rng.randrange(10) for _ in range(num_digits)]


def data_paths(out_dir: str) -> dict[str, str]:
    return {name: os.path.join(out_dir, f"{name}.jsonl") for name in ("sft", "rl", "eval")}


def write_data(cfg: ToyConfig, out_dir: str) -> dict[str, str]:
    """Writes sft.jsonl (FineProofs-style columns), rl.jsonl and eval.jsonl; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(cfg.seed)
    paths = data_paths(out_dir)
    with open(paths["sft"], "w") as f:
        for digits in _problems(rng, cfg.sft_rows, cfg.num_digits):
            f.write(json.dumps(sft_row(digits, rng, cfg)) + "\n")
    for name, n in (("rl", cfg.rl_problems), ("eval", cfg.eval_problems)):
        with open(paths[name], "w") as f:
            for digits in _problems(rng, n, cfg.num_digits):
                if cfg.task == "long":
                    problem, rubric_ = long_problem_text(digits), long_rubric(digits)
                else:
                    problem, rubric_ = problem_text(digits), rubric(digits)
                f.write(json.dumps({"problem": problem, "rubric": json.dumps(rubric_)}) + "\n")
    return paths


def sft_row(digits: list[int], rng: random.Random, cfg: ToyConfig) -> dict:
    """One demonstration, prompted the way the RL loop and the eval prompt (qedjax.rollout.rc):
    a first RC turn, a turn that continues from a summary, or the writing of a summary."""
    from qedjax.rollout.rc import render_prompt

    if cfg.task == "long":
        return long_row(digits, rng, cfg)
    problem = problem_text(digits)
    kind = rng.random()
    if kind < cfg.summarize_rows:
        prompt = render_prompt("rc_summarize", problem=problem, summary=render_prompt("rc_no_summary"),
                               attempt=solution(digits, target(digits))[0], note="")
        return {"problem": prompt, "reasoning_content": "Summarising the attempt.", "proof": summary_of(digits)}
    if kind < cfg.summarize_rows + cfg.summary_rows:
        prompt = render_prompt("rc_reason_summary", problem=problem, summary=summary_of(digits))
    else:
        prompt = render_prompt("rc_reason", problem=problem)
    reasoning, proof = teacher_solution(digits, rng, cfg.teacher_error_rate)
    return {"problem": prompt, "reasoning_content": reasoning, "proof": proof}


# ---------------------------------------------------------------- the "long" task (RC variant)

# The long task labels every digit and spells a label with its digit as one token (`C9`: the digit 9
# of the problem's third place; `c0`: the result of that place), so every copy is a lookup of the
# token whose label comes next, wherever it sits, rather than a count of positions (which the demo
# model did not learn). Capitals label problem digits, lower case results.
PROBLEM_LABELS, RESULT_LABELS = "ABCDEFG", "abcdefg"
_PAIR = re.compile(r"\b([a-g])(\d)\b")


def long_problem_text(digits: list[int]) -> str:
    return "Add one to each digit: " + " ".join(f"{a}{d}" for a, d in zip(PROBLEM_LABELS, digits))


def parse_problem(text: str) -> list[int]:
    """The digits of a long-task problem, in label order."""
    return [int(d) for d in re.findall(r"\b[A-G](\d)\b", text.split("Add one to each digit:", 1)[1])]


def long_rubric(digits: list[int]) -> dict:
    """One checkpoint per label: the answer's first result labelled x must be the result of X (a
    label written twice scores at most once)."""
    return {"checkpoints": [
        {"pattern": f"Answer:[^{a}]*\\b{a}{d}\\b", "points": 1, "description": f"{a} is {d}"}
        for a, d in zip(RESULT_LABELS, target(digits))]}


def labelled(results: list[int]) -> str:
    """`a4 b6 c0`: results in label order, from the first label."""
    return " ".join(f"{a}{r}" for a, r in zip(RESULT_LABELS, results))


def parse_labelled(text: str) -> list[int]:
    """The results of a labelled list, in order, up to the first label out of sequence."""
    out = []
    for a, r in _PAIR.findall(text):
        if a != RESULT_LABELS[len(out)]:
            break
        out.append(int(r))
        if len(out) == len(RESULT_LABELS):
            break
    return out


def work_item(k: int, digit: int, result: int) -> str:
    """`C9 c0,`: the k-th digit copied with its label, then its result."""
    return f"{PROBLEM_LABELS[k]}{digit} {RESULT_LABELS[k]}{result},"


def so_far(results: list[int]) -> str:
    """An RC summary of the long task: the results found so far."""
    return "So far: " + (labelled(results) or "none") + "."


def long_thinking(digits: list[int], known: list[int], results: list[int]) -> str:
    """Restates the known results (from the summary), then works out the next digits."""
    head = "Known: " + labelled(known) + "." if known else "Working."
    items = [work_item(len(known) + i, digits[len(known) + i], r) for i, r in enumerate(results)]
    return " ".join([head] + items)


def long_answer(found: list[int]) -> str:
    """The answer of a long-task turn: the results found so far, labelled."""
    return " ".join(["Answer:", labelled(found)]).strip()


def parse_found(thinking: str) -> list[int]:
    """The results a (possibly cut-off) long-task thinking has established: the known ones and
    every finished work item, in order."""
    known = re.match(r"\s*Known:([^.]*)\.", thinking)
    found = parse_labelled(known.group(1)) if known else []
    for a, r in re.findall(r"\b[A-G]\d ([a-g])(\d),", thinking):
        if len(found) < len(RESULT_LABELS) and a == RESULT_LABELS[len(found)]:
            found.append(int(r))
    return found


def long_row(digits: list[int], rng: random.Random, cfg: ToyConfig) -> dict:
    """A long-task demonstration: a first turn, a continuation from a summary, or a summary."""
    from qedjax.rollout.rc import render_prompt

    problem, n = long_problem_text(digits), len(digits)
    right = target(digits)
    # the state the turn starts from: a summary with m results known (summary_rows of the rows), or none
    continues = rng.random() < cfg.summary_rows
    m = rng.randint(0, n) if continues else 0
    work = rng.randint(1, n - m) if m < n else 0  # the teacher stops after a random number of digits
    results = right[m:m + work]
    if results and rng.random() < cfg.teacher_error_rate:
        i = rng.randrange(len(results))
        results[i] = (results[i] + rng.randint(1, 9)) % 10
    known = right[:m]
    thinking = long_thinking(digits, known, results)
    summary = so_far(known) if continues else ""
    kind = rng.random()
    if kind < cfg.summarize_rows:
        words = thinking.split(" ")
        cut = rng.random() < 0.5 and len(words) > 1  # cut off between tokens, as a token budget does
        attempt = " ".join(words[:rng.randrange(1, len(words))]) if cut else thinking
        note = "\n" + render_prompt("rc_truncated_note") + "\n" if cut else ""
        prompt = render_prompt("rc_summarize", problem=problem, summary=summary or render_prompt("rc_no_summary"),
                               attempt=attempt, note=note)
        return {"problem": prompt, "reasoning_content": "Summarising the attempt.",
                "proof": so_far(parse_found(attempt))}
    if continues:
        prompt = render_prompt("rc_reason_summary", problem=problem, summary=summary)
    else:
        prompt = render_prompt("rc_reason", problem=problem)
    return {"problem": prompt, "reasoning_content": thinking, "proof": long_answer(known + results)}


def tokenizer_extras(cfg: ToyConfig) -> dict:
    """build_tokenizer's extra arguments for cfg's task: none for the demo task (its tokenizer stays
    as it was); for the long task its demonstrations as extra text, and every labelled digit (` A3`,
    ` a4`, space included) as a token of its own."""
    if cfg.task != "long":
        return {}
    rng = random.Random(cfg.seed + 1)
    rows = [long_row(d, rng, dataclasses.replace(cfg, teacher_error_rate=0.0))
            for d in _problems(rng, 500, cfg.num_digits)]
    return {"extra_texts": [f"{r['problem']}\n{r['reasoning_content']}\n{r['proof']}" for r in rows],
            "extra_tokens": [f" {a}{d}" for a in PROBLEM_LABELS + RESULT_LABELS for d in range(10)]}


def _prompt_texts() -> list[str]:
    here = os.path.join(os.path.dirname(__file__), "prompts")
    texts = []
    for path in sorted(glob.glob(os.path.join(here, "*.txt"))):
        with open(path) as f:
            texts.append(f.read().strip())
    return texts


def _template_chunks() -> list[str]:
    """The fixed text between the placeholders of every prompt template. The toy tokenizer gives
    each chunk one token, so the demo's long RC prompts cost a handful of tokens each."""
    chunks = set()
    for text in _prompt_texts():
        chunks.update(c for c in re.split(r"\{\{\w+\}\}", text) if c.strip())
    return sorted(chunks, key=lambda c: (-len(c), c))


def build_tokenizer(out_dir: str, *, vocab_size: int = 512, extra_texts: list[str] | None = None,
                    extra_tokens: list[str] | None = None, seed: int = 0) -> str:
    """Trains a byte-level BPE on toy problems + the prompt templates (+ extra_texts) and saves an HF
    tokenizer dir; extra_tokens are added whole, as the template chunks are."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = _prompt_texts() + list(extra_texts or [])
    for digits in _problems(rng, 2000, 7):
        reasoning, answer = teacher_solution(digits, rng, 0.0)
        corpus.append(f"{problem_text(digits)}\n{reasoning}\n{answer}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    added = THINK_TOKENS + _template_chunks() + list(extra_tokens or [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(added),
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                 additional_special_tokens=["<|im_start|>"])
    hf.chat_template = CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)
    return out_dir
