"""Scaffolds with a scripted engine: call and token counts, RSA's block design and tournament, and
DSM / self-check selection driven by review scores (self-reviews, and a judge on loopback HTTP)."""

import json
import random
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fakes import FakeEngine

from qedjax.eval.refine import DSMConfig, SelfCheckConfig, dsm, parse_score, self_check
from qedjax.eval.scaffolds import RCConfig, RSAConfig, blocks, rc, rsa, single
from qedjax.rewards import JudgeConfig, JudgeGrader
from qedjax.rollout.engine import SamplingParams

PARAMS = SamplingParams(max_new_tokens=200, temperature=0.7, seed=5)


def words(text: str) -> int:
    return len(text.split())


def test_single_counts_one_call_and_its_tokens():
    engine = FakeEngine(lambda kind, text, params, index: "<think>a b c</think> " + "w " * (10 * index + 1))
    results = single(engine, ["Problem A.", "Problem B."], PARAMS)
    assert len(engine.calls) == 1 and engine.count("rc_reason") == 2
    assert [r.calls for r in results] == [1, 1]
    assert [r.stages for r in results] == [{"generate": 1}, {"generate": 1}]
    assert [r.tokens for r in results] == [r.response_tokens for r in results] == [4, 14]
    assert results[1].response == "<think>a b c</think> " + "w " * 11

    cut = single(FakeEngine(lambda *a: "<think>" + "x " * 500), ["Problem A."], PARAMS)[0]
    assert cut.truncated == 1 and cut.tokens == PARAMS.max_new_tokens


def test_rc_scaffold_counts_turns_and_summaries():
    engine = FakeEngine()
    results = rc(engine, ["Problem A.", "Problem B."], PARAMS, RCConfig(turns=3, summary_max_new_tokens=7))
    assert len(engine.calls) == 5  # reason, summarise, reason, summarise, reason
    assert [p.max_new_tokens for _, p in engine.calls] == [200, 7, 200, 7, 200]
    for r in results:
        assert r.stages == {"reason": 3, "summarize": 2} and r.calls == 5
        assert r.tokens == sum(r.lengths) and len(r.lengths) == 5
        assert len(r.trace["summaries"]) == 2
    # The graded response is the last turn's, sampled with the last turn's seed.
    assert results[0].response.endswith(f"Proof number 0 seed {engine.calls[4][1].seed}.")


def test_blocks_put_every_candidate_in_exactly_k_blocks():
    rng = random.Random(0)
    for n, k in [(8, 3), (4, 2), (5, 5), (3, 1), (7, 4)]:
        design = blocks(n, k, rng)
        assert len(design) == n
        assert all(len(set(b)) == k for b in design)  # distinct members
        assert Counter(i for b in design for i in b) == {i: k for i in range(n)}


def rsa_engine():
    """Every generation and merge writes a new numbered solution; comparisons prefer the higher number."""
    counter = {"n": 0}
    log = []

    def respond(kind, text, params, index):
        if kind == "eval_compare":
            first = int(re.search(r"Solution 1:\n.*?SOL-(\d+)", text, re.S).group(1))
            second = int(re.search(r"Solution 2:\n.*?SOL-(\d+)", text, re.S).group(1))
            reply = f"<think>compare</think> Better: {2 if second > first else 1}"
        else:
            counter["n"] += 1
            reply = f"<think>work</think> SOL-{counter['n']}"
        log.append((kind, text, reply))
        return reply

    return FakeEngine(respond), log


def test_rsa_call_counts_block_design_and_tournament():
    engine, log = rsa_engine()
    problems = ["Problem P0.", "Problem P1."]
    results = rsa(engine, problems, PARAMS, RSAConfig(population=4, block=2, rounds=2))

    # 1 population call, 2 merge rounds, 2 bracket rounds (4 -> 2 -> 1).
    assert [len(batch) for batch, _ in engine.calls] == [8, 8, 8, 4, 2]
    assert len({p.seed for _, p in engine.calls[:3]}) == 3  # every round samples with its own seed
    for r in results:
        assert r.stages == {"generate": 4, "aggregate": 8, "compare": 3}
        assert r.calls == 15 and len(r.lengths) == 15 and r.tokens == sum(r.lengths)

    # Each candidate of the previous generation appears in exactly K=2 merge requests of its problem.
    replies = [reply for _, _, reply in log]
    for round_ in (1, 2):
        previous = replies[8 * (round_ - 1) : 8 * round_]
        merges = [text for kind, text, _ in log[8 * round_ : 8 * (round_ + 1)]]
        assert all(kind == "eval_rsa_aggregate" for kind, _, _ in log[8 * round_ : 8 * (round_ + 1)])
        for p, problem in enumerate(problems):
            mine = [t for t in merges if problem in t]
            assert len(mine) == 4
            for candidate in previous[4 * p : 4 * (p + 1)]:
                sol = candidate.split()[-1]
                assert sum(bool(re.search(re.escape(sol) + r"\b", t)) for t in mine) == 2
    # The tournament (higher number wins) picks the best of the last generation.
    last = replies[16:24]
    for p, r in enumerate(results):
        best = max(last[4 * p : 4 * (p + 1)], key=lambda s: int(s.split("SOL-")[1]))
        assert r.response == best


def test_tournament_byes_and_cut_off_candidates():
    engine, _ = rsa_engine()
    results = rsa(engine, ["Problem P0."], PARAMS, RSAConfig(population=5, block=2, rounds=0))
    assert results[0].stages == {"generate": 5, "compare": 4}  # N - 1 matches with a bye
    assert results[0].response.endswith("SOL-5")

    def cut_off(kind, text, params, index):
        return "<think>never finished" if kind == "rc_reason" and index > 0 else "<think>x</think> SOL-1"

    engine = FakeEngine(cut_off)
    (result,) = rsa(engine, ["Problem P0."], PARAMS, RSAConfig(population=3, block=1, rounds=0))
    assert "compare" not in result.stages  # a cut-off candidate loses without a comparison
    assert result.response.endswith("SOL-1") and result.truncated == 2


def quality(text: str) -> int:
    return int(re.search(r"Proof Q(\d)", text).group(1))


def dsm_engine(initial):
    """Proofs carry a quality Q0..Q2 and a unique name; self-reviews score by quality; a rewrite
    raises the quality by one (except for problem P2, which never improves)."""
    written = {"n": 0}

    def respond(kind, text, params, index):
        if kind == "rc_reason":
            problem = int(re.search(r"Problem P(\d)", text).group(1))
            q = initial[problem][index % len(initial[problem])]
            return f"<think>t</think> Proof Q{q} name-g{index}"
        if kind == "eval_verify":
            q = quality(text)
            if q == 2:
                return "<think>v</think> Fine. Score: 1"
            if q == 1 and index % 2 == 0:
                return f"<think>v</think> Minor gap G{index}. Score: 0.5"
            if q == 1:
                return f"<think>v</think> Fatal flaw F{index}. Score: 0"
            return "<think>v</think> Wrong. Score: 0"
        if kind == "eval_refine":
            q = 0 if "Problem P2" in text else min(quality(text) + 1, 2)
            written["n"] += 1
            return f"<think>r</think> Proof Q{q} name-r{written['n']}"
        raise AssertionError(kind)

    return FakeEngine(respond)


def refined_names(engine, problem):
    """Names of the proofs the rewrite requests of `problem` were about, in request order."""
    return [
        re.search(r"name-(\w+)", text).group(1)
        for kind, text in engine.requests
        if kind == "eval_refine" and problem in text
    ]


def test_dsm_self_verification_drives_refinement_and_early_stop():
    initial = {0: [0, 0, 2, 0], 1: [0, 1, 0, 0], 2: [0, 0, 0, 0]}
    engine = dsm_engine(initial)
    p0, p1, p2 = dsm(engine, ["Problem P0.", "Problem P1.", "Problem P2."], PARAMS, DSMConfig())

    # P0: a proof averages 1 at once, so no refinement: 4 proofs + 4 x 4 reviews.
    assert p0.stages == {"generate": 4, "verify": 16}
    assert p0.trace["pick"] == 2 and p0.trace["solved"] and p0.trace["rounds"] == 0
    assert quality(p0.response) == 2
    # P1: round 1 refines all 4, the rewrite of the Q1 proof averages 1: stop after one round.
    assert p1.stages == {"generate": 4, "verify": 32, "refine": 4}
    assert p1.trace["means"] == [0, 0.25, 0, 0, 1, 0.25, 0.25, 0.25]
    assert p1.trace["pick"] == 4 and p1.trace["rounds"] == 1 and quality(p1.response) == 2
    # P2: never solved: both rounds run, the most refined of the tied proofs is picked.
    assert p2.stages == {"generate": 4, "verify": 48, "refine": 8}
    assert p2.calls == 60 and p2.trace["rounds"] == 2 and not p2.trace["solved"]
    assert p2.trace["pick"] == 11
    assert p2.tokens == sum(p2.lengths)

    # The Q1 proof is rewritten with its 2 worst reviews (the score-0 ones), not the 0.5 ones.
    refines = [text for kind, text in engine.requests if kind == "eval_refine" and "Problem P1" in text]
    q1_refine = next(t for t in refines if "Proof Q1" in t)
    assert q1_refine.count("Fatal flaw") == 2 and "Minor gap" not in q1_refine
    # Best first; among equals the later (more refined) proof first. P1's proofs are g4..g7.
    assert refined_names(engine, "Problem P1") == ["g5", "g7", "g6", "g4"]
    # P2, round 2: the best 4 of its 8 tied proofs are the round-1 rewrites (r5..r8), latest first.
    assert refined_names(engine, "Problem P2") == ["g11", "g10", "g9", "g8", "r8", "r7", "r6", "r5"]


def test_parse_score():
    engine = FakeEngine(lambda kind, text, params, index: text)
    completions = engine.generate(
        ["<think>Score: 1</think> ok. Score: 0.5", "<think>x</think> Score: **1**", "<think>x</think> none",
         "<think>Score: 1 unfinished", "<think>x</think> Score: 1/2", "<think>x</think> Score: 10"],
        PARAMS,
    )
    assert [parse_score(c) for c in completions] == [0.5, 1.0, None, None, 0.5, None]


def test_self_check_accepts_after_5_passes_rejects_after_10_errors_stops_at_30():
    initial = {0: [0], 1: [2], 2: [0]}
    problems = ["Problem P0.", "Problem P1.", "Problem P2."]
    assert SelfCheckConfig() == SelfCheckConfig(accept_passes=5, reject_errors=10, max_iterations=30)
    p0, p1, p2 = self_check(dsm_engine(initial), problems, PARAMS, SelfCheckConfig())
    # Q2 passes every review: accepted after 5 in a row.
    assert p1.stages == {"generate": 1, "verify": 5} and p1.trace["outcome"] == "accepted"
    # Q0 -> Q1 -> Q2: two failing reviews, two rewrites, then 5 passes.
    assert p0.stages == {"generate": 1, "verify": 7, "refine": 2} and p0.trace["outcome"] == "accepted"
    assert p0.trace["pick"] == 2 and quality(p0.response) == 2 and p0.trace["errors"] == 2
    # Never improves: rejected at the 10th error (9 rewrites; none after the last error).
    assert p2.stages == {"generate": 1, "verify": 10, "refine": 9} and p2.trace["outcome"] == "rejected"
    assert not p2.trace["passed"] and p2.trace["pick"] == 9
    # The iteration limit: 3 reviews at most, no rewrite that would not be reviewed.
    p0, p1, p2 = self_check(dsm_engine(initial), problems, PARAMS,
                            SelfCheckConfig(accept_passes=2, reject_errors=10, max_iterations=3))
    assert p1.trace["outcome"] == "accepted" and p1.stages == {"generate": 1, "verify": 2}
    assert p0.trace["outcome"] == "stopped" and p0.stages == {"generate": 1, "verify": 3, "refine": 2}
    assert quality(p0.response) == 2  # the best-scored version: Q2 passed its one review
    assert p2.trace["outcome"] == "stopped" and p2.trace["iterations"] == 3 and p2.stages["refine"] == 2


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat-completions endpoint grading by the proof's quality marker."""

    points = {"2": 7, "1": 6, "0": 1}
    prompts: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        type(self).prompts.append(prompt)
        proof = prompt.split("Candidate proof:", 1)[1]
        q = re.search(r"Proof Q(\d)", proof).group(1)
        content = f"judge-analysis-{q}: assessed.\n<points>{self.points[q]} out of 7</points>"
        reply = {
            "id": "x", "object": "chat.completion", "model": body["model"],
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            ],
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_url():
    _Judge.prompts = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_dsm_selection_driven_by_a_loopback_judge(judge_url):
    grader = JudgeGrader(JudgeConfig(style="proofbench", base_url=judge_url, max_retries=0, timeout_s=30,
                                     reasoning_effort=None))
    engine = dsm_engine({0: [0, 1, 0]})
    references = [{"solution": "A reference solution.", "guidelines": "Partial credit for a plan."}]
    cfg = DSMConfig(pool=3, verifications=2, refine_top=2, worst_analyses=1, rounds=2)
    (result,) = dsm(engine, ["Problem P0."], PARAMS, cfg, grader=grader, references=references)

    # Judge points 1 / 6 / 7 become review scores 0 / 0.5 / 1.
    assert result.trace["means"] == [0, 0.5, 0, 1, 0.5]
    assert result.trace["pick"] == 3 and result.trace["rounds"] == 1
    assert quality(result.response) == 2
    # The judge did the reviewing (3 + 2 proofs, 2 reviews each); the policy only wrote proofs.
    assert len(_Judge.prompts) == 10
    assert all("A reference solution." in p for p in _Judge.prompts)
    assert result.stages == {"generate": 3, "refine": 2}
    # The rewrite of the 0.5 proof is shown its worst review: the judge's own analysis.
    first_refine = next(t for k, t in engine.requests if k == "eval_refine")
    assert "Proof Q1" in first_refine and "judge-analysis-1" in first_refine


def test_reviews_without_a_verdict_count_zero_and_are_not_passed_on():
    def respond(kind, text, params, index):
        if kind == "eval_verify":
            return "<think>SECRET-RAMBLING that never reaches a verdict"
        return "<think>t</think> Proof Q1"

    engine = FakeEngine(respond)
    cfg = DSMConfig(pool=2, verifications=2, refine_top=1, rounds=1)
    (result,) = dsm(engine, ["Problem P0."], PARAMS, cfg)
    assert result.trace["means"] == [0, 0, 0] and result.truncated == 6  # 6 cut-off reviews
    (refine,) = [text for kind, text in engine.requests if kind == "eval_refine"]
    assert "ran out of tokens before it reached a verdict" in refine and "SECRET-RAMBLING" not in refine
