"""The reasoning-cache loop with scripted engines: batching, states, summaries, truncation, seeds."""

import re

import pytest
from fakes import FakeEngine, prompt_kind

from qedjax.rollout.engine import SamplingParams
from qedjax.rollout.rc import RCState, derive_seed, rc_states, render_prompt, run_rc

PARAMS = SamplingParams(max_new_tokens=64, temperature=0.8, seed=11)
PROBLEMS = [
    "Problem alpha: show that 1 + 1 = 2.",
    "Problem beta: {{summary}} is not a slot here.",
    "Problem gamma.",
]


def policy_reply(kind, text, params, index):
    """Thinking names the problem and the summary it saw; the answer is marked separately."""
    name = re.search(r"Problem (\w+)", text).group(1)
    seen = re.search(r"S\[[^\]]*\]", text)
    seen = seen.group(0) if seen else "nothing"
    return f"<think>think-{name} saw {seen}</think> ANSWER-{name}-{params.seed}"


def summary_reply(kind, text, params, index):
    """Summarises by quoting the attempt's first thinking word, in a marked S[...] tag."""
    attempt = text.split("Reasoning of the latest attempt:\n", 1)[1]
    return f"<think>hmm</think> S[{attempt.split()[0]}]"


def test_rc_batches_turns_and_threads_summaries():
    policy, summarizer = FakeEngine(policy_reply), FakeEngine(summary_reply)
    results = run_rc(policy, PROBLEMS, turns=3, params=PARAMS, summarizer=summarizer)

    # One policy call and one summariser call per turn, each over the whole batch.
    assert [len(batch) for batch, _ in policy.calls] == [3, 3, 3]
    assert [len(batch) for batch, _ in summarizer.calls] == [3, 3]  # no summary after the last turn
    assert [k for k, _ in policy.calls[0][0]] == ["rc_reason"] * 3
    assert [k for k, _ in policy.calls[1][0]] == ["rc_reason_summary"] * 3
    assert {k for k, _ in summarizer.requests} == {"rc_summarize"}

    alpha = results[0]
    assert [t.state.turn for t in alpha.turns] == [0, 1, 2]
    assert [t.state.summary for t in alpha.turns] == ["", "S[think-alpha]", "S[think-alpha]"]
    assert [t.new_summary for t in alpha.turns] == ["S[think-alpha]", "S[think-alpha]", ""]
    assert alpha.turns[-1].summary_completion is None
    # Turn 2 saw turn 1's summary in its prompt.
    assert "saw S[think-alpha]" in alpha.turns[1].completion.text
    assert alpha.final_answer.startswith("ANSWER-alpha-")
    assert alpha.final_response == alpha.turns[-1].completion.text
    # Only the thinking reaches the summariser, never the answer.
    for _, text in summarizer.requests:
        assert "ANSWER-" not in text and "think-" in text
    # A problem containing a slot-like string is inserted verbatim, not expanded.
    assert "{{summary}} is not a slot here" in results[1].turns[1].state.messages()[0]["content"]


def test_rc_token_and_call_counts():
    policy, summarizer = FakeEngine(policy_reply), FakeEngine(summary_reply)
    (result,) = run_rc(policy, PROBLEMS[:1], turns=3, params=PARAMS, summarizer=summarizer)
    policy_words = sum(len(t.completion.text.split()) for t in result.turns)
    summary_words = sum(len(t.summary_completion.text.split()) for t in result.turns[:2])
    assert result.policy_tokens == policy_words
    assert result.summary_tokens == summary_words == 2 * 2  # two summaries of two words
    assert result.calls == 3 + 2
    assert result.tokens == policy_words + summary_words


def test_rc_states_gives_turns_plus_one_states():
    (states,) = rc_states(FakeEngine(policy_reply), PROBLEMS[:1], turns=3, params=PARAMS,
                          summarizer=FakeEngine(summary_reply))
    assert len(states) == 4
    assert [s.turn for s in states] == [0, 1, 2, 3]
    assert states[0].summary == "" and all(s.summary == "S[think-alpha]" for s in states[1:])
    assert states[0].messages()[0]["content"] == render_prompt("rc_reason", problem=PROBLEMS[0])
    assert prompt_kind(states[3].messages()[0]["content"]) == "rc_reason_summary"


def test_truncated_turn_is_marked_and_summariser_told():
    def reply(kind, text, params, index):
        if index == 0:
            return "<think>long reasoning that never ends"  # think block never closed
        if index == 1:
            return "<think>done</think> " + "word " * 100  # hits max_new_tokens
        return "<think>done</think> fine"

    policy, summarizer = FakeEngine(reply), FakeEngine(summary_reply)
    results = run_rc(policy, PROBLEMS, turns=2, params=PARAMS, summarizer=summarizer)
    assert [r.turns[0].truncated for r in results] == [True, True, False]
    assert results[1].turns[0].completion.finish_reason == "length"
    note = render_prompt("rc_truncated_note")
    notes = [note in text for _, text in summarizer.calls[0][0]]
    assert notes == [True, True, False]
    # The partial thinking is still summarised.
    assert results[0].turns[0].new_summary == "S[long]"


def test_failed_summary_keeps_previous_and_append_mode_accumulates():
    count = {"n": 0}

    def summaries(kind, text, params, index):
        count["n"] += 1
        if count["n"] == 2:
            return "<think>ran out of room"  # the summariser never finished: no summary
        return f"<think>x</think> part{count['n']}"

    policy = FakeEngine(policy_reply)
    (replace,) = run_rc(policy, PROBLEMS[:1], turns=4, params=PARAMS, summarizer=FakeEngine(summaries))
    assert [t.new_summary for t in replace.turns] == ["part1", "part1", "part3", ""]

    count["n"] = 0
    appender = FakeEngine(summaries)
    (append,) = run_rc(policy, PROBLEMS[:1], turns=4, params=PARAMS, summarizer=appender, mode="append")
    assert [t.new_summary for t in append.turns[:3]] == ["part1", "part1", "part1\n\npart3"]
    assert {k for k, _ in appender.requests} == {"rc_summarize_append"}


def test_seeds_differ_per_turn_and_reproduce():
    policy = FakeEngine(policy_reply)
    first = run_rc(policy, PROBLEMS, turns=3, params=PARAMS)
    seeds = [params.seed for _, params in policy.calls]
    # The policy is its own summariser here: calls alternate reason / summarise.
    reason_seeds, summary_seeds = seeds[0::2], seeds[1::2]
    assert reason_seeds[0] == PARAMS.seed  # turn 0 is exactly a single sample
    assert len(set(seeds)) == len(seeds) == 5
    assert summary_seeds == [derive_seed(PARAMS.seed, "summarize", t) for t in (0, 1)]
    second = run_rc(FakeEngine(policy_reply), PROBLEMS, turns=3, params=PARAMS)
    assert [r.final_response for r in first] == [r.final_response for r in second]


def test_rc_rejects_bad_arguments():
    with pytest.raises(ValueError):
        run_rc(FakeEngine(), PROBLEMS, turns=0, params=PARAMS)
    with pytest.raises(ValueError):
        run_rc(FakeEngine(), PROBLEMS, turns=2, params=PARAMS, mode="merge")
    with pytest.raises(KeyError):
        render_prompt("rc_reason")
    assert RCState("p").messages()[0]["role"] == "user"


def test_rc_with_a_tiny_model(toy_tokenizer):
    """The real JAX engine under RC: one policy and one summariser call per turn, states in order,
    each summary slot filled from the turn before, truncation marked (tokens run out mid-think)."""
    from flax import nnx

    from qedjax.models.qwen3 import Qwen3, Qwen3Config
    from qedjax.rollout.jax_engine import JaxEngine

    calls = []

    class Counting(JaxEngine):
        def generate(self, requests, params, seeds=None):
            calls.append((self.role, len(requests)))
            return super().generate(requests, params, seeds)

    model = Qwen3(Qwen3Config.preset("tiny"), rngs=nnx.Rngs(0))
    policy, summarizer = Counting(model, toy_tokenizer), Counting(model, toy_tokenizer)
    policy.role, summarizer.role = "policy", "summarizer"
    problems = ["Reverse the list: 1 2 3", "Reverse the list: 4 5 6"]
    results = run_rc(policy, problems, turns=3, params=SamplingParams(max_new_tokens=12, seed=1),
                     summarizer=summarizer, summary_params=SamplingParams(max_new_tokens=8, seed=2))
    assert calls == [("policy", 2), ("summarizer", 2), ("policy", 2), ("summarizer", 2), ("policy", 2)]
    for result in results:
        assert [t.state.turn for t in result.turns] == [0, 1, 2]
        assert result.turns[0].state.summary == ""
        for before, after in zip(result.turns, result.turns[1:]):
            assert after.state.summary == before.new_summary
        # A random tiny model never closes its think block within 12 tokens.
        assert all(t.truncated for t in result.turns)
        assert result.calls == 5 and result.policy_tokens == sum(len(t.completion.tokens) for t in result.turns)
