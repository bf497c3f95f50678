"""One-process halves of the multi-process machinery (tests/test_multihost_stages.py runs the whole):
the rows a process builds of a GRPO batch, and stopping in the middle of a generation or a wait."""

import numpy as np
import pytest
from flax import nnx

from qedjax import preempt, rl, sharding, train
from qedjax.models.qwen3 import Qwen3, Qwen3Config
from qedjax.rewards import Grade
from qedjax.rollout.engine import Completion
from qedjax.rollout.groups import GRPOConfig, Rollouts
from qedjax.rollout.sampler import Sampler


def _rollouts(groups=3, size=4):
    rng = np.random.default_rng(0)
    comps, grades = [], []
    for g in range(groups):
        comps.append([Completion(text="", tokens=tuple(int(t) for t in rng.integers(3, 50, 3 + (i + g) % 5)),
                                 logprobs=tuple(float(x) for x in -rng.random(3 + (i + g) % 5)),
                                 finish_reason="stop", prompt_tokens=(1, 2, 3 + g)) for i in range(size)])
        grades.append([Grade(float(i), i / 7, "ok") for i in range(size)])
    return Rollouts(version=0, states=[None] * groups, completions=comps, grades=grades, summary_tokens=[],
                    times={}, problems=[None] * groups)


def test_each_process_builds_its_slice_of_the_batch():
    g = GRPOConfig(problems_per_step=3, group_size=4, micro_batches=2)
    mesh = sharding.make_mesh("fsdp=8")
    rows = rl.train_rows(g, mesh, sharding.TRAIN_RULES)
    assert train.process_rows(mesh, sharding.TRAIN_RULES, rows // 2) == slice(0, rows // 2)  # one process: all
    ro = _rollouts()
    whole, stats = rl.build_batch(ro, g, rows, pad_id=0)
    assert stats["sequences_trained"] == 12 and stats["tokens_expected"] == int(whole["loss_mask"].sum())
    per = rows // 2
    for local in (slice(0, per // 2), slice(per // 2, per)):  # what two processes would build
        part, _ = rl.build_batch(ro, g, rows, pad_id=0, local=local)
        for k, v in part.items():
            np.testing.assert_array_equal(v, whole[k][:, local], err_msg=k)


def test_a_stop_request_ends_a_generation_within_one_decode_call():
    model = Qwen3(Qwen3Config.preset("tiny"), rngs=nnx.Rngs(0))
    sampler = Sampler(model, mesh=sharding.make_mesh("fsdp=8"), rules=sharding.ROLLOUT_RULES, decode_chunk=4)
    prompts = [[1, 2, 3], [4, 5]]
    full = sampler.generate(prompts, max_new_tokens=16, temperature=1.0, seed=3)
    preempt.request()
    try:
        with pytest.raises(preempt.Preempted, match="stopped generating after 5 of 16 tokens"):  # prefill + 4
            sampler.generate(prompts, max_new_tokens=16, temperature=1.0, seed=3)
    finally:
        preempt.clear()
    again = sampler.generate(prompts, max_new_tokens=16, temperature=1.0, seed=3)  # chunking changes nothing
    assert [r.tokens for r in again] == [r.tokens for r in full]
    whole = Sampler(model, mesh=sharding.make_mesh("fsdp=8"), rules=sharding.ROLLOUT_RULES, decode_chunk=64)
    assert [r.tokens for r in whole.generate(prompts, max_new_tokens=16, temperature=1.0, seed=3)] == [
        r.tokens for r in full]


def test_a_stop_request_ends_a_wait():
    polls = []

    def work(check):
        while True:
            check()
            polls.append(1)
            if len(polls) == 3:
                preempt.request()

    try:
        with pytest.raises(preempt.Preempted, match="stopped waiting"):
            preempt.lead_waits(work)
    finally:
        preempt.clear()
    assert len(polls) == 3
    assert preempt.lead_waits(lambda check: "done") == "done"
