"""The JAX sampler: parity with transformers' generate, logprob agreement with the trainer, stops,
truncated sampling, seeds, bucketing, sharding; and the JaxEngine on top of it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hf_utils import save_random_hf
from qedjax import convert, sharding, train
from qedjax.models.qwen3 import Qwen3, Qwen3Config
from qedjax.rollout import SamplingParams
from qedjax.rollout.jax_engine import JaxEngine
from qedjax.rollout.sampler import DRAW_CHUNK, Sampler, bucket, draw_tokens

CFG = Qwen3Config.preset("tiny", vocab_size=97)
PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [42], [3, 1, 4, 1, 5]]


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    hf = save_random_hf(CFG, path, seed=7)
    return hf, convert.load_hf(path)


def test_greedy_matches_transformers_generate(hf_and_ours):
    hf, model = hf_and_ours
    results = Sampler(model).generate(PROMPTS, max_new_tokens=40, temperature=0.0)
    for prompt, r in zip(PROMPTS, results):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert r.tokens == ref
        assert r.finish_reason == "length" and len(r.logprobs) == 40


def test_batch_gives_the_same_tokens_as_each_prompt_alone(hf_and_ours):
    _, model = hf_and_ours
    sampler = Sampler(model)
    for temperature in (0.0, 0.9):
        batch = sampler.generate(PROMPTS, max_new_tokens=24, temperature=temperature, seed=[11, 12, 13, 14])
        for i, prompt in enumerate(PROMPTS):
            alone = sampler.generate([prompt], max_new_tokens=24, temperature=temperature, seed=[11 + i])
            assert alone[0].tokens == batch[i].tokens


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_a_full_forward_pass(hf_and_ours, temperature):
    """The behaviour logprobs GRPO divides by: same numbers as the trainer's recomputation."""
    _, model = hf_and_ours
    results = Sampler(model).generate(PROMPTS, max_new_tokens=32, temperature=temperature, seed=5)
    seqs = [p + r.tokens for p, r in zip(PROMPTS, results)]
    width = max(map(len, seqs))
    padded = np.zeros((len(seqs), width), np.int32)
    segments = np.zeros((len(seqs), width), np.int32)
    for i, seq in enumerate(seqs):  # right-padded rows, padding in segment 0
        padded[i, :len(seq)] = seq
        segments[i, :len(seq)] = 1
    recompute = nnx.jit(lambda m, x, seg: train.token_logprobs(m, x[:, :-1], x[:, 1:], segment_ids=seg[:, :-1],
                                                               temperature=temperature)[0])
    logp = np.asarray(recompute(model, jnp.asarray(padded), jnp.asarray(segments)))
    for i, (prompt, r) in enumerate(zip(PROMPTS, results)):
        np.testing.assert_allclose(r.logprobs, logp[i, len(prompt) - 1:len(seqs[i]) - 1], atol=1e-4)


def test_stop_ids_and_finish_reasons(hf_and_ours):
    _, model = hf_and_ours
    sampler = Sampler(model)
    free = sampler.generate(PROMPTS, max_new_tokens=20, temperature=0.0)
    stop = free[1].tokens[5]  # a token row 1 emits at step 6
    stopped = sampler.generate(PROMPTS, max_new_tokens=20, temperature=0.0, stop_ids=[stop])
    row = stopped[1]
    assert row.finish_reason == "stop" and row.tokens == free[1].tokens[: free[1].tokens.index(stop) + 1]
    for r, f in zip(stopped, free):  # other rows are unaffected until they hit the stop id themselves
        n = len(r.tokens)
        assert r.tokens == f.tokens[:n]
        assert (r.finish_reason == "stop") == (stop in f.tokens[:20])
    short = sampler.generate(PROMPTS, max_new_tokens=3, temperature=0.0)
    assert all(len(r.tokens) == 3 and r.finish_reason == "length" for r in short)


def _fixed_distribution_model(logits):
    """A model whose next-token logits are `logits` whatever the context: blocks are zeroed, every
    embedding is e_0, and the head reads the first coordinate."""
    cfg = Qwen3Config.preset("tiny", vocab_size=len(logits), tie_word_embeddings=False)
    model = Qwen3(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    pure = jax.tree.map(jnp.zeros_like, nnx.to_pure_dict(state))
    d = cfg.hidden_size
    pure["embed_tokens"] = pure["embed_tokens"].at[:, 0].set(1.0)
    pure["norm"]["scale"] = jnp.ones(d)
    pure["lm_head"] = pure["lm_head"].at[:, 0].set(jnp.asarray(logits) / np.sqrt(d))
    for layer in pure["layers"].values():
        for norm in ("input_layernorm", "post_attention_layernorm"):
            layer[norm]["scale"] = jnp.ones(d)
        layer["self_attn"]["q_norm"]["scale"] = jnp.ones(cfg.head_dim)
        layer["self_attn"]["k_norm"]["scale"] = jnp.ones(cfg.head_dim)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


def test_top_k_top_p_restrict_the_support_and_sampling_follows_the_distribution():
    logits = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02] + [1e-6] * 9))
    sampler = Sampler(_fixed_distribution_model(logits))
    prompts = [[1]] * 64

    def draws(**kw):
        return np.concatenate([r.tokens for r in sampler.generate(prompts, max_new_tokens=32, seed=1, **kw)])

    free = draws(temperature=1.0)
    freq = np.bincount(free, minlength=len(logits)) / len(free)
    np.testing.assert_allclose(freq[:4], [0.4, 0.25, 0.15, 0.1], atol=0.03)
    assert set(draws(temperature=1.0, top_k=2)) == {0, 1}
    assert set(draws(temperature=1.0, top_p=0.7)) == {0, 1, 2}  # 0.4 + 0.25 < 0.7 <= 0.8
    assert set(draws(temperature=1.0, top_k=3, top_p=0.5)) == {0, 1}
    np.testing.assert_array_equal(draws(temperature=1.0), free)  # same seed, same samples
    assert not np.array_equal(draws(temperature=1.0, top_k=0), draws(temperature=1.0, top_k=0)[::-1])


@pytest.mark.parametrize("kw, kept", [({"temperature": 1.0, "top_k": 2}, [0, 1]),
                                      ({"temperature": 1.0, "top_p": 0.7}, [0, 1, 2]),
                                      ({"temperature": 0.5, "top_k": 3, "top_p": 0.99}, [0, 1, 2]),
                                      ({"temperature": 0.8}, list(range(16)))])
def test_logprobs_are_those_of_the_truncated_renormalised_distribution(kw, kept):
    """With top-k/top-p the behaviour logprob is log(p_t / sum of p over the kept set) of the tempered
    distribution: the distribution the token was drawn from, as vLLM's processed logprobs are."""
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02] + [1e-6] * 9)
    model = _fixed_distribution_model(np.log(probs))
    # The model's logits are log(probs) scaled by 1 / sqrt(1 + D * eps): its final RMSNorm sees e_0.
    cfg = model.config
    logits = np.log(probs) / np.sqrt(1.0 + cfg.hidden_size * cfg.rms_norm_eps) / kw["temperature"]
    want = np.full(len(probs), -np.inf)
    want[kept] = logits[kept] - np.log(np.sum(np.exp(logits[kept])))
    results = Sampler(model).generate([[1]] * 8, max_new_tokens=16, seed=3, **kw)
    tokens = np.concatenate([r.tokens for r in results])
    assert set(tokens) <= set(kept)
    # fp32 log-softmax of 16 logits of magnitude < 30: rounding ~ 30 * 16 * 1.2e-7 < 1e-4.
    np.testing.assert_allclose(np.concatenate([r.logprobs for r in results]), want[tokens], atol=1e-4)


def test_two_level_draw_follows_the_distribution_across_chunks():
    """draw_tokens over three chunks, the last one padded: heavy tokens on the chunk edges, the
    chunk masses and the tail come out at their probabilities, and -inf entries never do."""
    c = DRAW_CHUNK
    v = 2 * c + 100
    logits = np.random.RandomState(0).randn(v)
    edges = [0, c - 1, c, 2 * c - 1, 2 * c, v - 1]
    logits[edges] += 5.0
    logits[3::7] = -np.inf
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    rows, rounds = 8192, 25
    fn = jax.jit(draw_tokens)
    batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (rows, v))
    drawn = np.concatenate([np.asarray(fn(jax.random.split(jax.random.key(i), rows), batch)) for i in range(rounds)])
    n = len(drawn)
    freq = np.bincount(drawn, minlength=v) / n
    assert freq[3::7].sum() == 0 and drawn.max() < v

    def close(f, p):  # within 5 standard errors of a binomial proportion
        np.testing.assert_allclose(f, p, atol=5 * np.sqrt(p * (1 - p) / n).max() + 1e-12)
    close(freq[edges], probs[edges])
    close(np.array([freq[:c].sum(), freq[c:2 * c].sum(), freq[2 * c:].sum()]),
          np.array([probs[:c].sum(), probs[c:2 * c].sum(), probs[2 * c:].sum()]))
    light = np.setdiff1d(np.arange(v), edges)
    close(freq[light].sum(), probs[light].sum())


def test_compiles_are_bounded_by_buckets(hf_and_ours):
    _, model = hf_and_ours
    sampler = Sampler(model)
    rng = np.random.RandomState(0)
    for _ in range(6):
        n = rng.randint(1, 9)
        prompts = [list(rng.randint(1, 90, rng.randint(1, 30))) for _ in range(n)]
        sampler.generate(prompts, max_new_tokens=int(rng.randint(4, 30)), temperature=0.0)
    assert bucket(3, 1) == 4 and bucket(17) == 32 and bucket(1500) == 2048 and bucket(3000) == 3072
    assert len(sampler.compiled_shapes) <= 4 * 2 * 2  # batch 1..8 x prompt 16/32 x new 16/32
    assert sampler._prefill._cache_size() == len(sampler.compiled_shapes)


def test_sharded_sampler_gives_the_same_tokens():
    model = Qwen3(Qwen3Config.preset("tiny", vocab_size=128), rngs=nnx.Rngs(3))
    mesh = sharding.make_mesh("data=4,tensor=2")
    ref = Sampler(model).generate(PROMPTS, max_new_tokens=16, temperature=0.8, seed=2)
    got = Sampler(model, mesh=mesh).generate(PROMPTS, max_new_tokens=16, temperature=0.8, seed=2)
    assert [r.tokens for r in got] == [r.tokens for r in ref]


def test_a_remat_model_decodes(hf_and_ours):
    """The train configs set model.remat; the sampler decodes with that model (rematerialisation
    inside the decode loop failed to trace: flax TraceContextError) and gets the same tokens."""
    import dataclasses

    _, model = hf_and_ours
    graphdef, params = nnx.split(model)
    remat = nnx.merge(*nnx.split(Qwen3(dataclasses.replace(model.config, remat=True), rngs=nnx.Rngs(0)))[:1], params)
    ref = Sampler(model).generate(PROMPTS, max_new_tokens=12, temperature=0.8, seed=4)
    got = Sampler(remat).generate(PROMPTS, max_new_tokens=12, temperature=0.8, seed=4)
    assert [r.tokens for r in got] == [r.tokens for r in ref]


def test_engine_copy_keeps_matrices_in_the_compute_dtype_with_the_same_outputs():
    """fp32 master weights with bf16 compute: the sampler stores the weight matrices in bf16 (half the
    memory) and the norm scales as they are; the model casts matrices to bf16 where it uses them, so
    hidden states and logits are bit-identical to those of the fp32-weight model."""
    import dataclasses

    from qedjax.rollout.sampler import engine_dtype

    config = dataclasses.replace(Qwen3Config.preset("tiny", vocab_size=128), dtype="bfloat16")
    model = Qwen3(config, rngs=nnx.Rngs(5))
    sampler = Sampler(model)
    stored = {tuple(map(str, path)): x for path, x in jax.tree_util.tree_flatten_with_path(sampler.params)[0]}
    assert all(x.dtype == (jnp.bfloat16 if x.ndim >= 2 else jnp.float32) for x in stored.values())
    assert engine_dtype(jnp.float32, 2, jnp.float32) == jnp.float32  # fp32 compute: nothing changes
    assert engine_dtype(jnp.int32, 2, jnp.bfloat16) == jnp.int32
    copy = nnx.merge(sampler.graphdef, sampler.params)
    tokens = jnp.asarray([PROMPTS[1][:16], PROMPTS[3] * 3 + [7]], jnp.int32)
    want, got = model.hidden(tokens), copy.hidden(tokens)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    np.testing.assert_array_equal(np.asarray(copy.logits(got)), np.asarray(model.logits(want)))


def test_contract_and_engine(hf_and_ours, toy_tokenizer):
    _, model = hf_and_ours
    out = Sampler(model).generate([[1, 2, 3]], max_new_tokens=4, temperature=1.0, seed=0)
    assert len(out[0].tokens) == len(out[0].logprobs) == 4
    tiny = Qwen3(Qwen3Config.preset("tiny"), rngs=nnx.Rngs(0))
    engine = JaxEngine(tiny, toy_tokenizer)
    chat = [{"role": "user", "content": "Reverse the list: 1 2 3"}]
    done = engine.generate([chat, chat], SamplingParams(max_new_tokens=8, temperature=1.0, seed=3))
    assert done[0].text.startswith("<think>\n")  # the template opened the think block
    assert done[0].tokens != done[1].tokens  # identical requests draw independent samples
    assert done[0].prompt_tokens == tuple(engine.encode([chat])[1][0])
    engine.load_weights(5, Qwen3(Qwen3Config.preset("tiny"), rngs=nnx.Rngs(1)))
    assert engine.version == 5 and engine.generate([chat], SamplingParams(4))[0].policy_version == 5
