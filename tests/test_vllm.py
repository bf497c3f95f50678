"""vLLM engine: the module imports without vLLM; the engine's glue (weight loading by HF name through
the worker extension, seeds, chat rendering, think prefix, rollback of a failed load) against a
stand-in `vllm` whose model is transformers' Qwen3 on CPU; and, marked gpu, real vLLM against the JAX
sampler and the trainer's logprobs."""

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qedjax.models.qwen3 import Qwen3, Qwen3Config
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


# --- a stand-in vllm: transformers' Qwen3 behind the same calls -------------------------------------

class _FakeModel:
    """What the worker extension sees as `model_runner.model`: vLLM's load_weights contract."""

    def __init__(self, hf):
        self.hf = hf

    def named_parameters(self):
        return self.hf.named_parameters()

    def load_weights(self, weights):
        import torch

        params, loaded = dict(self.hf.named_parameters()), set()
        for name, tensor in weights:
            if name == "lm_head.weight" and name not in params:
                continue
            assert tuple(params[name].shape) == tuple(tensor.shape), name
            with torch.no_grad():
                params[name].copy_(tensor.float())
            loaded.add(name)
        return loaded


class _FakeLLM:
    def __init__(self, model, **kwargs):
        import transformers

        from qedjax.rollout.vllm import WeightStoreWorker

        self.kwargs = dict(model=model, **kwargs)
        config = transformers.AutoConfig.from_pretrained(model)
        hf = transformers.Qwen3ForCausalLM(config).eval().float()
        self.worker = type("Worker", (WeightStoreWorker,), {})()
        self.worker.model_runner = types.SimpleNamespace(model=_FakeModel(hf))
        self.resets = 0
        self.seen_params = []

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    def reset_prefix_cache(self):
        self.resets += 1
        return True

    def generate(self, prompts, sampling_params, use_tqdm=True):
        import torch

        hf = self.worker.model_runner.model.hf
        outputs = []
        for prompt, sp in zip(prompts, sampling_params):
            self.seen_params.append(sp)
            ids, tokens, logprobs = list(prompt["prompt_token_ids"]), [], []
            gen = torch.Generator().manual_seed(sp.seed)
            finish = "length"
            for _ in range(sp.max_tokens):
                with torch.no_grad():
                    logits = hf(torch.tensor([ids + tokens])).logits[0, -1].double()
                if sp.temperature == 0:
                    token = int(logits.argmax())
                    logp = torch.log_softmax(logits, -1)
                else:
                    logp = torch.log_softmax(logits / sp.temperature, -1)
                    token = int(torch.multinomial(logp.exp(), 1, generator=gen))
                tokens.append(token)
                logprobs.append({token: types.SimpleNamespace(logprob=float(logp[token]))})
                if token in sp.stop_token_ids:
                    finish = "stop"
                    break
            sample = types.SimpleNamespace(token_ids=tokens, logprobs=logprobs, finish_reason=finish)
            outputs.append(types.SimpleNamespace(outputs=[sample]))
        return outputs


class _FakeSamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = _FakeLLM, _FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_engine_glue_matches_the_jax_engine(fake_vllm, tmp_path, toy_tokenizer_dir, toy_tokenizer):
    from qedjax.rollout.jax_engine import JaxEngine
    from qedjax.rollout.vllm import VllmEngine

    cfg = Qwen3Config(vocab_size=len(toy_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
                      eos_token_id=toy_tokenizer.eos_token_id)
    store = WeightStore(tmp_path / "store")
    models = {v: _model(cfg, seed=v) for v in (1, 2)}
    store.publish(models[1], 1)
    engine = VllmEngine(str(tmp_path / "store"), toy_tokenizer_dir, model_dir=tmp_path / "model")
    llm = engine.llm
    assert llm.kwargs["load_format"] == "dummy" and llm.kwargs["logprobs_mode"] == "processed_logprobs"
    assert llm.kwargs["worker_extension_cls"] == "qedjax.rollout.vllm.WeightStoreWorker"
    assert engine.version == 1 and llm.resets == 1

    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    for version in (1, 2):
        if version == 2:
            store.publish(models[2], 2)
            engine.load_weights(2)
            assert llm.resets == 2
        got = engine.generate(CHATS, greedy)
        want = JaxEngine(models[version], toy_tokenizer, version=version).generate(CHATS, greedy)
        for g, w in zip(got, want):
            assert (g.text, g.tokens, g.finish_reason, g.prompt_tokens, g.policy_version) == \
                   (w.text, w.tokens, w.finish_reason, w.prompt_tokens, w.policy_version)
            np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-4)
        assert got[0].text.startswith("<think>\n") and not got[2].text.startswith("<think>")

    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=3)
    first = engine.generate([CHATS[0]] * 4, sampled)
    sp = llm.seen_params[-4:]
    assert len({p.seed for p in sp}) == 4 and {p.logprobs for p in sp} == {0}
    assert (sp[0].temperature, sp[0].top_p, sp[0].top_k, sp[0].max_tokens) == (1.0, 0.9, 50, 8)
    assert len({c.tokens for c in first}) > 1  # identical requests, independent samples
    assert [c.tokens for c in engine.generate([CHATS[0]] * 4, sampled)] == [c.tokens for c in first]

    # A corrupt version fails to load, and the engine goes back to the version it had.
    store.publish(_model(cfg, seed=9), 3)
    chunk = tmp_path / "store" / "v00000003" / "model.layers.1.mlp.down_proj.weight" / "c" / "0" / "0"
    chunk.write_bytes(bytes(len(chunk.read_bytes())))
    with pytest.raises(WeightStoreError, match="version 3"):
        engine.load_weights(3)
    assert engine.version == 2 and llm.resets == 3
    again = engine.generate(CHATS, greedy)
    assert [c.tokens for c in again] == [c.tokens for c in got]
    with pytest.raises(WeightStoreError, match="version 8 is not committed"):
        engine.load_weights(8)
    engine.close()


# --- real vLLM on a GPU -------------------------------------------------------------------------------

def _need_vllm_gpu():
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def _trainer_logprobs(model: Qwen3, prompt, tokens, temperature: float) -> np.ndarray:
    """log_softmax(logits / T) of each completion token from one full forward pass (T=0: untempered)."""
    seq = jnp.asarray([list(prompt) + list(tokens)], jnp.int32)
    logits = model(seq)[0, len(prompt) - 1: len(prompt) - 1 + len(tokens)].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits / (temperature or 1.0), axis=-1)
    return np.asarray(logp), np.asarray(jnp.take_along_axis(logp, jnp.asarray(tokens)[:, None], axis=-1)[:, 0])


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
