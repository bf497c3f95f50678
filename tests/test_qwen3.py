"""Qwen3 model: parity with transformers, presets, packing, the KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from hf_utils import hf_config, hf_logits, save_random_hf
from qedjax import convert
from qedjax.models import cpu_gemm
from qedjax.models.qwen3 import (PRESETS, KVCache, Qwen3, Qwen3Config, attention_defaults, flash_block,
                                 positions_from_segments, project, rms_norm)

# Jitted calls: op-by-op execution of the model is many times slower than compiling it.
run = nnx.jit(lambda model, *args, **kwargs: model(*args, **kwargs))

SHAPES = {
    # tied, kv ratio 2, head_dim != hidden/heads
    "tied_kv2": dict(vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                     rms_norm_eps=1e-6, tie_word_embeddings=True),
    # untied, kv ratio 1 (MHA), odd eps and theta
    "untied_mha": dict(vocab_size=89, hidden_size=32, intermediate_size=80, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=4, head_dim=8, rope_theta=5e6,
                       rms_norm_eps=1e-5, tie_word_embeddings=False),
    # kv ratio 6, head_dim larger than hidden/heads
    "gqa6": dict(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=6, num_key_value_heads=1, head_dim=24, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=True),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_logits_match_transformers_fp32(tmp_path, name):
    cfg = Qwen3Config(**SHAPES[name])
    hf = save_random_hf(cfg, tmp_path, seed=1)
    model = convert.load_hf(tmp_path, dtype="float32")
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (3, 17))
    ours = np.asarray(run(model, jnp.asarray(tokens, jnp.int32)))
    ref = hf_logits(hf, tokens)
    assert ours.shape == (3, 17, cfg.vocab_size)
    assert np.abs(ours - ref).max() <= 1e-4


def test_logits_match_transformers_bf16(tmp_path):
    """bf16 params and compute on both sides. Tolerance: 5e-2 absolute on logits of scale ~1
    (bf16 has 8 mantissa bits; the two sides round at different points), and the argmax agrees
    almost everywhere."""
    cfg = Qwen3Config(**SHAPES["tied_kv2"])
    hf = save_random_hf(cfg, tmp_path, seed=2)
    model = convert.load_hf(tmp_path, dtype="bfloat16")
    assert model.embed_tokens[...].dtype == jnp.bfloat16
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 16))
    ours = np.asarray(run(model, jnp.asarray(tokens, jnp.int32)), np.float32)
    ref = hf_logits(hf.to(torch.bfloat16), tokens)
    assert np.abs(ours - ref).max() <= 5e-2
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_param_count_matches_transformers(preset):
    cfg = Qwen3Config.preset(preset)
    _, abstract = convert.abstract_model(cfg)
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.to_pure_dict(abstract)))
    with torch.device("meta"):
        hf = transformers.Qwen3ForCausalLM(hf_config(cfg))
    assert ours == sum(p.numel() for p in hf.parameters())


def test_preset_values_are_the_hf_ones():
    four = Qwen3Config.preset("qwen3-4b")
    assert (four.hidden_size, four.intermediate_size, four.num_hidden_layers, four.num_attention_heads,
            four.num_key_value_heads, four.head_dim, four.vocab_size, four.tie_word_embeddings) == \
        (2560, 9728, 36, 32, 8, 128, 151936, True)
    assert not Qwen3Config.preset("qwen3-8b").tie_word_embeddings
    assert Qwen3Config.preset("qwen3-4b-thinking-2507").rope_theta == 5e6


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        Qwen3Config.preset("tiny", num_key_value_heads=3)
    with pytest.raises(ValueError, match="param_dtype"):
        Qwen3Config.preset("tiny", param_dtype="float16")
    with pytest.raises(ValueError, match="unknown model preset"):
        Qwen3Config.preset("qwen9")


def test_hf_config_round_trip():
    cfg = Qwen3Config.preset("qwen3-8b")
    assert Qwen3Config.from_hf(cfg.to_hf()) == cfg
    again = Qwen3Config.from_hf(hf_config(cfg).to_dict())  # what transformers itself writes
    assert again == cfg


def test_packed_segments_equal_separate_sequences():
    cfg = Qwen3Config(**SHAPES["tied_kv2"])
    model = Qwen3(cfg, rngs=nnx.Rngs(3))
    rng = np.random.RandomState(1)
    a, b = rng.randint(0, cfg.vocab_size, 7), rng.randint(0, cfg.vocab_size, 5)
    packed = jnp.asarray(np.concatenate([a, b, [0, 0]])[None], jnp.int32)
    segments = jnp.asarray([[1] * 7 + [2] * 5 + [0, 0]], jnp.int32)
    np.testing.assert_array_equal(positions_from_segments(segments)[0],
                                  [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 0, 1])
    out = np.asarray(run(model, packed, segment_ids=segments))
    alone_a = np.asarray(run(model, jnp.asarray(a[None], jnp.int32)))
    alone_b = np.asarray(run(model, jnp.asarray(b[None], jnp.int32)))
    np.testing.assert_allclose(out[0, :7], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 7:12], alone_b[0], atol=1e-5)


def test_kv_cache_decode_matches_full_forward():
    cfg = Qwen3Config(**SHAPES["untied_mha"])
    model = Qwen3(cfg, rngs=nnx.Rngs(4))
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 10)), jnp.int32)
    full = np.asarray(run(model, tokens))
    cache = KVCache.init(cfg, batch=2, max_len=16)
    first, cache = run(model, tokens[:, :6], cache=cache)
    steps = [first]
    for t in range(6, 10):
        logits, cache = run(model, tokens[:, t:t + 1], cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate([np.asarray(s) for s in steps], axis=1), full, atol=1e-5)
    assert int(cache.index) == 10


def test_left_padded_cache_matches_unpadded():
    """Rows of different lengths, left-padded into one batch, see only their own tokens."""
    cfg = Qwen3Config(**SHAPES["tied_kv2"])
    model = Qwen3(cfg, rngs=nnx.Rngs(5))
    short = np.array([5, 9, 2])
    padded = jnp.asarray([[0, 0, 0, *short]], jnp.int32)
    segments = jnp.asarray([[0, 0, 0, 1, 1, 1]], jnp.int32)
    positions = jnp.asarray([[0, 0, 0, 0, 1, 2]], jnp.int32)
    logits, _ = run(model, padded, positions=positions, segment_ids=segments,
                      cache=KVCache.init(cfg, 1, 8))
    alone = run(model, jnp.asarray(short[None], jnp.int32))
    np.testing.assert_allclose(np.asarray(logits)[0, 3:], np.asarray(alone)[0], atol=1e-5)


# the C++ attention kernel (cpu_attention) with XLA's products and with MKL's, also under remat
_BLOCKWISE = [("xla", False, False)] + ([("xla-copy", True, False), ("mkl", True, False), ("mkl", True, True)]
                                        if cpu_gemm.available() is None else [])


@pytest.mark.parametrize("gemm, kernel, remat", _BLOCKWISE)
def test_blockwise_attention_equals_dense(gemm, kernel, remat):
    """Long inputs take the blockwise path; logits and gradients match the dense path (packed
    segments, a length that is not a multiple of the block, and a cache)."""
    dense_cfg = Qwen3Config(**SHAPES["tied_kv2"], attention_block=0)
    block_cfg = Qwen3Config(**SHAPES["tied_kv2"], attention_block=8, gemm=gemm, attention_kernel=kernel,
                            remat=remat)
    dense, blocked = Qwen3(dense_cfg, rngs=nnx.Rngs(7)), Qwen3(block_cfg, rngs=nnx.Rngs(7))
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, dense_cfg.vocab_size, (2, 37)), jnp.int32)
    segments = jnp.asarray([[1] * 20 + [2] * 15 + [0] * 2, [1] * 37], jnp.int32)
    np.testing.assert_allclose(np.asarray(run(blocked, tokens, segment_ids=segments)),
                               np.asarray(run(dense, tokens, segment_ids=segments)), atol=2e-5)
    # One row alone: key blocks of the first segment are skipped for the second segment's queries too.
    np.testing.assert_allclose(np.asarray(run(blocked, tokens[:1], segment_ids=segments[:1])),
                               np.asarray(run(dense, tokens[:1], segment_ids=segments[:1])), atol=2e-5)

    def loss(model):
        return jnp.mean(model(tokens, segment_ids=segments) ** 2)

    g_dense = nnx.jit(nnx.grad(loss))(dense)
    g_block = nnx.jit(nnx.grad(loss))(blocked)
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(g_dense)), jax.tree.leaves(nnx.to_pure_dict(g_block))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
    # CPU-style blocking: a row shorter than the block but over the dense limit, in two blocks of 24
    balanced_cfg = Qwen3Config(**SHAPES["tied_kv2"], attention_block=32, attention_dense_max=8, gemm=gemm,
                               attention_kernel=kernel)
    assert flash_block(37, 32, 8) == 24
    balanced = Qwen3(balanced_cfg, rngs=nnx.Rngs(7))
    np.testing.assert_allclose(np.asarray(run(balanced, tokens, segment_ids=segments)),
                               np.asarray(run(dense, tokens, segment_ids=segments)), atol=2e-5)
    g_balanced = nnx.jit(nnx.grad(loss))(balanced)
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(g_dense)), jax.tree.leaves(nnx.to_pure_dict(g_balanced))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
    prefill_dense, _ = run(dense, tokens[:, :30], cache=KVCache.init(dense_cfg, 2, 40))
    prefill_block, _ = run(blocked, tokens[:, :30], cache=KVCache.init(block_cfg, 2, 40))
    np.testing.assert_allclose(np.asarray(prefill_block), np.asarray(prefill_dense), atol=2e-5)


@pytest.mark.parametrize("shape", [(1, 37, 24), (1, 37, 3, 8), (3, 37, 24)])
def test_rms_norm_values_and_gradients(shape):
    """rms_norm flattens a batch of one row to rows (an XLA:CPU workaround); every path matches the
    float64 formula in values and in the gradients of x and the scale."""
    rng = np.random.RandomState(0)
    x, g = rng.randn(*shape).astype(np.float32), rng.randn(*shape).astype(np.float32)
    scale = (1 + 0.1 * rng.randn(shape[-1])).astype(np.float32)
    eps = 1e-6
    x64, g64, s64 = x.astype(np.float64), g.astype(np.float64), scale.astype(np.float64)
    inv = 1 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps)
    normed = x64 * inv
    # d/dx of scale * x * inv: inv * (scale g - normed * mean(scale g normed))
    sg = g64 * s64
    dx = inv * (sg - normed * np.mean(sg * normed, axis=-1, keepdims=True))
    dscale = (g64 * normed).reshape(-1, shape[-1]).sum(0)

    out = jax.jit(rms_norm, static_argnums=2)(x, scale, eps)
    np.testing.assert_allclose(np.asarray(out), s64 * normed, rtol=1e-5, atol=1e-6)
    grad = jax.jit(jax.grad(lambda x, s: jnp.sum(rms_norm(x, s, eps) * g), argnums=(0, 1)))
    gx, gs = grad(x, scale)
    np.testing.assert_allclose(np.asarray(gx), dx, rtol=1e-4, atol=1e-5)
    # a sum of 37 (or 111) terms of size ~1: fp32 rounding stays far below 1e-4 of it
    np.testing.assert_allclose(np.asarray(gs), dscale, rtol=1e-4, atol=1e-4)


def test_attention_block_follows_the_platform():
    """An unset model.attention_block takes the blocking of the platform the model runs on (the
    mesh's, so a TPU compile on a CPU host gets the TPU's) and, on CPU, of the CPU's vendor; a set one
    is kept, dense up to a block. The products likewise (train.default_gemm): XLA's own on TPU; MKL's
    on a one-device mesh of an Intel CPU that can run it; else the transposed copy. The C++ attention
    kernel (train.default_attention_kernel) on a one-device CPU mesh that can run it, whatever the
    vendor. A CPU-only setting on TPU is an error."""
    from qedjax import sharding, train
    from qedjax.config import ModelConfig

    intel, amd, tpu = (attention_defaults("cpu", "GenuineIntel"), attention_defaults("cpu", "AuthenticAMD"),
                       attention_defaults("tpu"))
    assert intel == dict(attention_block=512, attention_dense_max=128)
    # with the C++ attention kernel (attention_kernel, fp32) rows over 16 tokens take it
    assert attention_defaults("cpu", "GenuineIntel", kernel=True) == dict(attention_block=512, attention_dense_max=16)
    assert amd == attention_defaults("cpu") == dict(attention_block=256, attention_dense_max=128)
    assert tpu == attention_defaults("gpu", "GenuineIntel") == dict(attention_block=512, attention_dense_max=512)
    here = cpu_gemm.cpu_vendor()
    unset = ModelConfig(preset="tiny")
    assert unset.attention_block is None
    kernel_here = cpu_gemm.available() is None
    assert train.default_attention_kernel("cpu", 1) == kernel_here
    assert not train.default_attention_kernel("cpu", 8) and not train.default_attention_kernel("tpu", 1)
    for platform, want in (("cpu", attention_defaults("cpu", here, kernel_here)), ("tpu", tpu)):
        config = train.model_config(unset, platform)
        assert (config.attention_block, config.attention_dense_max) == tuple(want.values())
        assert config.gemm == train.default_gemm(platform, 1, here)
        assert config.attention_kernel == (kernel_here and platform == "cpu")
    config = train.model_config(unset, "cpu", devices=8)  # no sharding rule: off on a larger mesh
    assert not config.attention_kernel and config.attention_dense_max == 128
    assert train.default_gemm("tpu", 1, "GenuineIntel") == "xla"
    assert train.default_gemm("cpu", 8, "GenuineIntel") == "xla-copy"
    assert train.default_gemm("cpu", 1, "AuthenticAMD") == "xla-copy"
    assert train.default_gemm("cpu", 1, "GenuineIntel") == ("mkl" if cpu_gemm.available() is None else "xla-copy")
    assert train.model_config(ModelConfig(preset="tiny", gemm="xla-copy"), "cpu").gemm == "xla-copy"
    with pytest.raises(ValueError, match="model.gemm 'xla-copy' is for XLA:CPU; this model runs on tpu"):
        train.model_config(ModelConfig(preset="tiny", gemm="xla-copy"), "tpu")
    with pytest.raises(ValueError, match="model.gemm must be one of"):
        ModelConfig(preset="tiny", gemm="blas")
    config = train.model_config(ModelConfig(preset="tiny", attention_block=64), "cpu")
    assert (config.attention_block, config.attention_dense_max) == (64, None)
    if kernel_here:  # bf16 compute has no kernel: dense up to 128 tokens, as with the kernel off
        config = train.model_config(ModelConfig(preset="tiny", dtype="bfloat16"), "cpu")
        assert (config.attention_kernel, config.attention_dense_max) == (True, 128)
        config = train.model_config(ModelConfig(preset="tiny", attention_kernel=False), "cpu")
        assert (config.attention_kernel, config.attention_dense_max) == (False, 128)
        config = train.model_config(ModelConfig(preset="tiny", gemm="xla-copy"), "cpu")  # independent of gemm
        assert (config.attention_kernel, config.attention_dense_max) == (True, 16)
        with pytest.raises(ValueError, match="model.attention_kernel is for XLA:CPU; this model runs on tpu"):
            train.model_config(ModelConfig(preset="tiny", attention_kernel=True), "tpu")
    else:
        with pytest.raises(ValueError, match="model.attention_kernel is on but"):
            ModelConfig(preset="tiny", attention_kernel=True)
    config, _, _ = train.abstract_params(unset, sharding.make_mesh("", devices=jax.devices()[:1]),
                                         sharding.TRAIN_RULES)
    platform = jax.devices()[0].platform
    assert config.attention_block == attention_defaults(platform, here)["attention_block"]
    assert config.gemm == train.default_gemm(platform, 1, here)


@pytest.mark.parametrize("spec,rows,w", [("MD,DF->MF", (6, 5), (5, 7)), ("MD,DNH->MNH", (6, 5), (5, 3, 4)),
                                         ("MNH,NHD->MD", (6, 3, 4), (3, 4, 5))])
def test_project_gemms(spec, rows, w):
    """The projection gives einsum's values and gradients by each of its products: the einsum, the
    weight gradient from a transposed copy, MKL's sgemm (where this host has it). Small integers keep
    every product and sum exact in fp32, so all must be equal whatever order each reduces in."""
    rng = np.random.RandomState(0)
    x, wt, dy = (jnp.asarray(rng.randint(-3, 4, s), jnp.float32) for s in (rows, w, rows[:1] + w[len(rows) - 1:]))

    def vjp(gemm):
        out, pull = jax.vjp(lambda a, b: project(spec, a, b, gemm), x, wt)
        return (out, *pull(dy))

    want = jax.jit(lambda: jax.vjp(lambda a, b: jnp.einsum(spec, a, b), x, wt)[1](dy))()
    gemms = ["xla", "xla-copy"] + (["mkl"] if cpu_gemm.available() is None else [])
    for gemm in gemms:
        out, dx, dw = jax.jit(vjp, static_argnums=0)(gemm)
        np.testing.assert_array_equal(out, jnp.einsum(spec, x, wt))
        np.testing.assert_array_equal(dx, want[0])
        np.testing.assert_array_equal(dw, want[1])
    with pytest.raises(ValueError, match="do not contract"):
        project(spec, x, jnp.zeros((2,) + wt.shape), "xla-copy")


def test_flash_block():
    """Rows over the dense limit go in at least two equal blocks, none larger than the block."""
    assert flash_block(128, 256, 128) == 0 and flash_block(129, 256, 128) == 72
    assert flash_block(256, 256, 128) == 128
    assert flash_block(320, 256, 128) == 160  # not 256 + 64 padded to 512
    assert flash_block(2048, 256, 128) == 256 and flash_block(2050, 256, 128) == 232
    assert flash_block(512, 512) == 0 and flash_block(513, 512) == 264
    # the TPU programs of docs/FIT.md: rows that are multiples of 512 keep blocks of 512
    assert all(flash_block(t, 512, 512) == 512 for t in (1024, 1536, 49152, 50176, 52224))
    assert flash_block(37, 8) == 8 and flash_block(37, 0) == 0
