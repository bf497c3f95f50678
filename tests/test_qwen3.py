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
from qedjax.models.qwen3 import PRESETS, KVCache, Qwen3, Qwen3Config, flash_block, positions_from_segments, rms_norm

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


@pytest.mark.parametrize("remat", [False, True])
def test_blockwise_attention_equals_dense(remat):
    """Long inputs take the blockwise path; logits and gradients match the dense path (packed
    segments, a length that is not a multiple of the block, and a cache)."""
    dense_cfg = Qwen3Config(**SHAPES["tied_kv2"], attention_block=0)
    block_cfg = Qwen3Config(**SHAPES["tied_kv2"], attention_block=8, remat=remat)
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
    # a row a little longer than the block, in two equal blocks of 24 (not 32 and a padded 32)
    balanced_cfg = Qwen3Config(**SHAPES["tied_kv2"], attention_block=32)
    assert flash_block(37, 32) == 24
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
    """rms_norm matches the float64 formula in values and in the gradients of x and the scale, for
    one row, per-head norms and a batch."""
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


def test_model_config_is_the_same_on_every_backend():
    """train.model_config reads the platform nowhere: blocks of 512 unless the config sets its own,
    dense attention up to a block, on CPU as on TPU."""
    from qedjax import train
    from qedjax.config import ModelConfig

    assert train.model_config(ModelConfig(preset="tiny")).attention_block == 512
    assert train.model_config(ModelConfig(preset="tiny", attention_block=64)).attention_block == 64
    with pytest.raises(ValueError, match="attention_block must be >= 0"):
        ModelConfig(preset="tiny", attention_block=-1)


def test_flash_block():
    """Rows longer than a block go in at least two equal blocks, none larger than the block."""
    assert flash_block(256, 256) == 0 and flash_block(257, 256) == 136
    assert flash_block(320, 256) == 160  # not 256 + 64 padded to 512
    assert flash_block(2048, 256) == 256 and flash_block(2050, 256) == 232
    assert flash_block(10_000, 0) == 0  # attention_block 0: dense only
    assert flash_block(512, 512) == 0 and flash_block(513, 512) == 264
    # the TPU programs of docs/FIT.md: rows that are multiples of 512 keep blocks of 512
    assert all(flash_block(t, 512) == 512 for t in (1024, 1536, 49152, 50176, 52224))
    assert flash_block(37, 8) == 8 and flash_block(37, 0) == 0
