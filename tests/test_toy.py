"""The toy task's long (RC) layout: regular tokens, a rubric that scores partial answers, and the
demo task's tokenizer left as it was."""

import json
import random

import pytest

from qedjax import toy
from qedjax.rewards import GradeItem, RuleGrader


@pytest.fixture(scope="module")
def long_tokenizer(tmp_path_factory):
    from qedjax.sft import load_tokenizer

    cfg = toy.ToyConfig(task="long")
    out = toy.build_tokenizer(str(tmp_path_factory.mktemp("long-tok")), vocab_size=1024, seed=cfg.seed,
                              **toy.tokenizer_extras(cfg))
    return load_tokenizer(out)


def test_every_work_item_is_three_tokens(long_tokenizer):
    digits = [3, 5, 9, 0, 2, 7, 1]
    thinking = toy.long_thinking(digits, [], toy.target(digits))
    pieces = [long_tokenizer.decode([i]) for i in long_tokenizer(thinking)["input_ids"]]
    assert pieces[:2] == ["Working", "."]
    assert pieces[2:] == [p for k, (d, r) in enumerate(zip(digits, toy.target(digits)))
                          for p in (f" {'ABCDEFG'[k]}{d}", f" {'abcdefg'[k]}{r}", ",")]
    answer = long_tokenizer(toy.long_answer([4, 6, 0]))["input_ids"]
    assert [long_tokenizer.decode([i]) for i in answer] == ["Answer", ":", " a4", " b6", " c0"]
    problem = long_tokenizer(toy.long_problem_text(digits))["input_ids"]
    assert len(problem) == len(long_tokenizer("Add one to each digit:")["input_ids"]) + 7


def test_demo_task_tokenizer_gets_no_extras():
    assert toy.tokenizer_extras(toy.ToyConfig()) == {}


def test_long_rubric_scores_each_correct_result_once():
    digits = [3, 5, 9, 0, 2, 7, 1]  # results a4 b6 c0 d1 e3 f8 g2
    rubric = json.dumps(toy.long_rubric(digits))
    problem = toy.long_problem_text(digits)

    def score(answer):
        grade = RuleGrader().grade([GradeItem(problem, f"<think>x</think> {answer}", {"rubric": rubric})])[0]
        return grade.score

    assert score("Answer: a4 b6 c0 d1 e3 f8 g2") == 7
    assert score("Answer: a4 b6 c0") == 3  # a partial answer scores partially
    assert score("Answer: a4 b7 c0") == 2
    assert score("Answer: a5 a4 b6") == 1  # the first a is wrong: a second a does not count
    assert score("Answer:") == 0


def test_parse_found_reads_known_results_and_finished_items():
    digits = [3, 5, 9, 0, 2, 7, 1]
    thinking = toy.long_thinking(digits, [4, 6], [0, 1])
    assert thinking == "Known: a4 b6. C9 c0, D0 d1,"
    assert toy.parse_found(thinking) == [4, 6, 0, 1]
    assert toy.parse_found("Known: a4 b6. C9 c0, D0") == [4, 6, 0]  # an unfinished item is not a result
    assert toy.so_far([4, 6, 0]) == "So far: a4 b6 c0." and toy.so_far([]) == "So far: none."
    assert toy.parse_problem(toy.long_problem_text(digits)) == digits


def test_long_rows_are_the_teachers_turns():
    cfg = toy.ToyConfig(task="long", teacher_error_rate=0.0, summary_rows=0.5, summarize_rows=0.25)
    rng = random.Random(0)
    for _ in range(50):
        digits = [rng.randrange(10) for _ in range(7)]
        row = toy.long_row(digits, rng, cfg)
        if row["proof"].startswith("Answer:"):
            found = toy.parse_found(row["reasoning_content"])
            assert found and found == toy.target(digits)[:len(found)]
            assert row["proof"] == toy.long_answer(found)
