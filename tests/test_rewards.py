"""Grader protocol pieces: response preparation, the rule grader, the answer grader, the factory."""

import json
import threading

import pytest

from qedjax.rewards import (
    MAX_SCORE,
    REASONS,
    AnswerGrader,
    Grade,
    GradeItem,
    JudgeConfig,
    JudgeGrader,
    RuleGrader,
    make_grader,
    prepare_response,
)


def test_reason_vocabulary():
    assert MAX_SCORE == 7
    assert REASONS == ("ok", "no_answer", "truncated", "parse_error", "judge_error", "timeout")


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<think>plan</think>\nProof. Done.", ("Proof. Done.", "ok")),
        ("Proof without thinking.", ("Proof without thinking.", "ok")),
        ("<think>still thinking when the budget ran out", (None, "truncated")),
        ("<think>all thought</think>   ", (None, "no_answer")),
        ("", (None, "no_answer")),
        (
            "<think>x</think>Proof. QED.\n\n## Self-Evaluation\nMy proof is complete. \\boxed{1}",
            ("Proof. QED.", "ok"),
        ),
        ("Proof. QED.\n**Self assessment:** flawless, 7/7", ("Proof. QED.", "ok")),
        ("Proof. QED.\nSELF-VERIFICATION\nall good", ("Proof. QED.", "ok")),
        ("## Self-evaluation\nonly an evaluation", (None, "no_answer")),
        # The words inside a sentence do not open a section.
        ("Proof: the map is a self-evaluation of f.", ("Proof: the map is a self-evaluation of f.", "ok")),
    ],
)
def test_prepare_response(response, expected):
    assert prepare_response(response) == expected


RUBRIC = json.dumps(
    {
        "checkpoints": [
            {"pattern": r"answer is 12", "points": 2, "description": "answer"},
            {"pattern": r"(?i)by induction", "points": 3, "description": "induction"},
            {"pattern": r"base case", "points": 2, "description": "base"},
        ],
        "deductions": [{"pattern": r"obviously", "points": 3, "description": "hand-waving"}],
    }
)


def rule_item(response: str, rubric: str = RUBRIC) -> GradeItem:
    return GradeItem(problem="Count the tilings.", response=response, references={"rubric": rubric})


def test_rule_grader_scores_checkpoints_and_deductions():
    grades = RuleGrader().grade(
        [
            rule_item("<think>by induction from the base case</think>The answer is 12."),  # thinking not graded
            rule_item("By induction with the base case n=1, the answer is 12."),
            rule_item("By induction, the answer is 12, obviously."),
            rule_item("Obviously nothing; obviously."),  # deductions never push below 0
            rule_item("<think>by induction the answer is 12"),
            rule_item("By induction and base case.\n## Self-evaluation\nthe answer is 12"),
        ]
    )
    assert [g.score for g in grades] == [2.0, 7.0, 2.0, 0.0, 0.0, 5.0]
    assert [g.reward for g in grades] == [2 / 7, 1.0, 2 / 7, 0.0, 0.0, 5 / 7]
    assert [g.reason for g in grades] == ["ok", "ok", "ok", "ok", "truncated", "ok"]
    assert "induction" in grades[1].raw and "hand-waving" in grades[2].raw


def test_rule_grader_rejects_bad_rubrics_naming_the_problem():
    six = json.dumps({"checkpoints": [{"pattern": "a", "points": 6, "description": "a"}]})
    with pytest.raises(ValueError, match=r"Count the tilings.*sum to 6, not 7"):
        RuleGrader().grade([rule_item("a", six)])
    with pytest.raises(ValueError, match="Count the tilings"):
        RuleGrader().grade([rule_item("a", '{"checkpoints": [{"pattern": "(", "points": 7}]}')])
    with pytest.raises(ValueError, match="Count the tilings"):
        RuleGrader().grade([GradeItem(problem="Count the tilings.", response="a")])


def answer_item(response: str, answer: str = "2026, 2030") -> GradeItem:
    return GradeItem(problem="Find all n.", response=response, references={"answer": answer})


def test_answer_grader_reasons():
    # Real comparisons get a wide limit (a loaded machine must not turn a right answer into a
    # timeout); the tower never finishes, so a short limit times it out on any machine.
    grades = AnswerGrader(timeout_s=60.0).grade(
        [
            answer_item("<think>hmm</think>Thus \\boxed{\\{2030, 2026\\}}."),
            answer_item("<think>hmm</think>Thus \\boxed{2026}."),
            answer_item("<think>hmm</think>Thus n is 2026 or 2030."),
            answer_item("<think>\\boxed{2026, 2030} and more thinking"),
            answer_item("Done: \\boxed{2026, 2030}\n## Self-Evaluation\nscore \\boxed{1}"),
        ]
    )
    grades += AnswerGrader(timeout_s=1.0).grade([answer_item("\\boxed{2^{2^{2^{2^{100}}}}}", answer="3")])
    assert [(g.score, g.reward, g.reason) for g in grades] == [
        (7.0, 1.0, "ok"),
        (0.0, 0.0, "ok"),
        (0.0, 0.0, "no_answer"),
        (0.0, 0.0, "truncated"),
        (7.0, 1.0, "ok"),
        (0.0, 0.0, "timeout"),
    ]
    assert grades[1].raw == "boxed: 2026"


def test_answer_grader_from_a_worker_thread():
    result = {}
    thread = threading.Thread(target=lambda: result.update(g=AnswerGrader().grade([answer_item("\\boxed{0.5}", "1/2")])))
    thread.start()
    thread.join(timeout=600)
    assert result["g"] == [Grade(7.0, 1.0, "ok", "boxed: 0.5")]


def test_answer_grader_needs_the_answer():
    with pytest.raises(ValueError, match="Find all n"):
        AnswerGrader().grade([GradeItem(problem="Find all n.", response="\\boxed{1}")])


def test_make_grader():
    assert isinstance(make_grader("rule"), RuleGrader)
    assert make_grader("answer", timeout_s=2.0).timeout_s == 2.0
    judge = make_grader("judge", style="proofbench", concurrency=8)
    assert isinstance(judge, JudgeGrader)
    assert judge.config == JudgeConfig(style="proofbench", concurrency=8)
    with pytest.raises(ValueError, match="unknown grader"):
        make_grader("oracle")
    with pytest.raises(ValueError, match="style"):
        make_grader("judge", style="vibes")
