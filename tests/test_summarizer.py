"""The RC summariser as a model of its own: summary calls go to its weights with its sampling, its
failures are counted (training metrics and eval report), and the launcher builds it from a name."""

import dataclasses

import jax
import pytest
from fakes import FakeEngine
from flax import nnx

from qedjax import sharding
from qedjax.benchmarks import Problem
from qedjax.eval.report import write_report
from qedjax.eval.scaffolds import RCConfig, rc
from qedjax.models.qwen3 import Qwen3, Qwen3Config
from qedjax.rl import rollout_metrics
from qedjax.rollout.engine import SamplingParams
from qedjax.rollout.groups import GRPOConfig, RCTrainConfig, grade_rollouts, sample_groups
from qedjax.rollout.jax_engine import JaxEngine
from qedjax.rollout.rc import summary_outcome

class Recording(JaxEngine):
    """A JaxEngine that records every call: (requests, params, completions)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []
        self.seeds = []  # each call's per-request seeds (sample_groups seeds every draw per problem)

    def generate(self, requests, params, seeds=None):
        out = super().generate(requests, params, seeds)
        self.calls.append((list(requests), params, out))
        self.seeds.append(seeds)
        return out


def _cfg(**rc):
    return GRPOConfig(problems_per_step=2, group_size=2,
                      rc=RCTrainConfig(enabled=True, turns=1, states_per_problem=2, summarizer="tiny",
                                       summary_max_new_tokens=6, **rc),
                      sampling=SamplingParams(max_new_tokens=10, temperature=1.0))


PROBLEMS = [Problem(id=str(i), problem=f"Reverse the list: {i} {i + 1} {i + 2}", references={}) for i in range(2)]


def test_summary_calls_use_the_summarizers_weights_and_sampling(toy_tokenizer):
    config = Qwen3Config.preset("tiny")
    policy_model, summary_model = Qwen3(config, rngs=nnx.Rngs(0)), Qwen3(config, rngs=nnx.Rngs(1))
    policy, summarizer = Recording(policy_model, toy_tokenizer), Recording(summary_model, toy_tokenizer)
    cfg = _cfg()
    ro = sample_groups(cfg, policy, summarizer, PROBLEMS, step=0, seed=0)
    # One summary call (1 turn, summarised to make the second state), with the summariser's sampling.
    assert len(summarizer.calls) == 1
    requests, params, got = summarizer.calls[0]
    assert (params.temperature, params.top_p, params.top_k, params.max_new_tokens) == (0.7, 0.8, 20, 6)
    assert all("summar" in r[0]["content"].lower() for r in requests)
    # The policy made the reasoning turn and the groups, all with the policy's sampling, no summaries.
    assert len(policy.calls) == 2
    assert all((p.temperature, p.top_p, p.top_k, p.max_new_tokens) == (1.0, 1.0, 0, 10) for _, p, _ in policy.calls)
    # The summaries are the summariser model's samples: the same requests and params give the same
    # tokens on an engine over its weights, and other tokens on one over the policy's weights.
    again = JaxEngine(summary_model, toy_tokenizer).generate(requests, params, summarizer.seeds[0])
    other = JaxEngine(policy_model, toy_tokenizer).generate(requests, params, summarizer.seeds[0])
    assert [c.tokens for c in got] == [c.tokens for c in again]
    assert [c.tokens for c in got] != [c.tokens for c in other]
    stats = ro.summary_stats
    assert stats["summaries_attempted"] == 2
    assert stats["summaries_ok"] + stats["summaries_empty"] + stats["summaries_failed_unclosed_think"] + \
        stats["summaries_failed_length"] == 2
    assert stats["summary_tokens_mean"] == sum(len(c.tokens) for c in got) / 2


def _never_closes(kind, text, params, index):
    if kind in ("rc_summarize", "rc_summarize_append"):
        return "<think>\nstill weighing the attempt " + "and " * 400  # cut at max_new_tokens, think open
    return "<think>\nreasoning\n</think>\n\nProof."


def test_a_summarizer_that_never_closes_its_output_is_a_counted_failure(tmp_path):
    policy, summarizer = FakeEngine(), FakeEngine(_never_closes)
    ro = sample_groups(_cfg(), policy, summarizer, PROBLEMS, step=0, seed=0)
    assert ro.summary_stats["summaries_attempted"] == 2
    assert ro.summary_stats["summaries_failed_unclosed_think"] == 2 and ro.summary_stats["summaries_ok"] == 0
    # The failed summary leaves the state as it was: no state has a summary, and the metrics say why.
    assert all(s.summary == "" for s in ro.states)

    class Zero:
        def grade(self, items):
            from qedjax.rewards import Grade

            return [Grade(0.0, 0.0, "ok", "") for _ in items]

    row = rollout_metrics(grade_rollouts(ro, Zero()), version=0)
    assert row["summaries_failed_unclosed_think"] == 2 and row["states_with_summary"] == 0.0
    # Eval: the RC scaffold with a summariser of its own reports the same counts.
    results = rc(policy, [p.problem for p in PROBLEMS], SamplingParams(max_new_tokens=6),
                 RCConfig(turns=2, summarizer="tiny", summary_temperature=0.7, summary_top_p=0.8, summary_top_k=20),
                 summarizer=summarizer)
    assert summarizer.calls[-1][1].temperature == 0.7 and summarizer.calls[-1][1].top_k == 20
    records = [{"sample": 0, "reward": 0.0, "score": 0.0, "reason": "ok", "response_tokens": r.response_tokens,
                "lengths": list(r.lengths), "truncated": r.truncated, "trace": dict(r.trace), "id": str(i),
                "tokens": r.tokens, "calls": r.calls} for i, r in enumerate(results)]
    summary = write_report(records, tmp_path, label="rc", benchmark="b", scaffold="rc", samples=1,
                           max_new_tokens=6)
    assert summary["summaries"]["summaries_attempted"] == 2
    assert summary["summaries"]["summaries_failed_unclosed_think"] == 2
    assert "RC summaries: 2 attempted" in (tmp_path / "summary.md").read_text()


def test_summary_outcomes():
    from qedjax.rollout.engine import Completion

    def c(text, finish="stop"):
        return Completion(text, (1,) * 3, (0.0,) * 3, finish, (1,))

    assert summary_outcome(c("<think>a</think> I tried x.")) == "ok"
    assert summary_outcome(c("I tried x.", "length")) == "ok"  # cut, but a (partial) summary
    assert summary_outcome(c("<think>a</think>  ")) == "empty"
    assert summary_outcome(c("<think>a</think>", "length")) == "length"
    assert summary_outcome(c("<think>a b c", "length")) == "unclosed_think"


def test_the_launcher_builds_a_named_summarizer(tmp_path, toy_tokenizer):
    from qedjax import pipeline
    from qedjax.config import load_config

    cfg = load_config(None, [f"run.dir={tmp_path}", "model.preset=tiny", "grpo.rc.enabled=true",
                             "grpo.rc.summarizer=tiny"])
    mesh = sharding.make_mesh("", devices=jax.devices()[:1])
    make = pipeline.summarizer_factory("tiny", cfg, toy_tokenizer, mesh, str(tmp_path))
    engine = make(None, 3)
    assert isinstance(engine, JaxEngine)
    assert engine.version == 0  # frozen: never follows the policy's versions
    assert engine.sampler.rules is sharding.SUMMARIZER_RULES  # weights sharded as in training
    with pytest.raises(FileNotFoundError, match="grpo.rc.summarizer: 'nowhere' is neither"):
        pipeline.check_engine(dataclasses.replace(cfg, grpo=dataclasses.replace(
            cfg.grpo, rc=dataclasses.replace(cfg.grpo.rc, summarizer="nowhere"))))


def test_a_frozen_summarizer_is_the_starting_policy_in_a_resumed_run_too(tmp_path, monkeypatch):
    """"frozen" is a copy of the stage's starting policy: a run resumed from a checkpoint must build it
    from the starting parameters, not from the checkpoint's (which summaries would then depend on)."""
    import numpy as np
    import yaml

    from qedjax import launch, pipeline

    seen = []
    real = pipeline.summarizer_factory

    def spy(name, *args):
        make = real(name, *args)

        def recording(model, version=0):
            seen.append(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param))))
            return make(model, version)

        return recording

    monkeypatch.setattr(pipeline, "summarizer_factory", spy)
    raw = {"run": {"dir": str(tmp_path / "run"), "seed": 0, "stages": ["grpo"]},
           "model": {"preset": "tiny"},
           "toy": {"sft_rows": 8, "rl_problems": 8, "eval_problems": 2},
           "grpo": {"init": "model", "steps": 1, "problems_per_step": 2, "group_size": 2, "mode": "sync",
                    "rc": {"enabled": True, "turns": 1, "states_per_problem": 2, "summary_max_new_tokens": 4,
                           "summarizer": "frozen"},
                    "sampling": {"max_new_tokens": 6, "temperature": 1.0, "seed": 0},
                    "skip_zero_variance": False,  # rewards are all 0: train anyway, so step 1 moves the weights
                    "loss": {"clip_low": 0.2, "clip_high": 0.28, "entropy_coef": 0.01},
                    "optim": {"lr": 1e-2, "schedule": "constant", "warmup_ratio": 0.0},
                    "checkpoint": {"every": 1, "keep": 2, "async_save": False}}}
    config = tmp_path / "grpo.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert launch.main(["--config", str(config)]) == 0
    assert launch.main(["--config", str(config), "grpo.steps=2"]) == 0  # resumes from step 1
    assert len(seen) == 2
    jax.tree.map(np.testing.assert_array_equal, seen[0], seen[1])
    # ... and the checkpoint it resumed from differs from the start, so the check can fail.
    from qedjax.checkpoint import restore_params
    from qedjax.config import load_config
    from qedjax import train

    cfg = load_config(str(config), [])
    mesh = sharding.make_mesh("", devices=jax.devices()[:1])
    _, _, target = train.abstract_params(cfg.model, mesh, sharding.TRAIN_RULES)
    step1 = restore_params(str(tmp_path / "run" / "grpo" / "checkpoints"), target, step=1)
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(seen[0]), jax.tree.leaves(step1)))
