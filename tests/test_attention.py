"""The blockwise attention and its hand-written backward pass against the dense path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qedjax.models.attention import _key_blocks_in_reach, dense_attention, flash_attention

B, T, K, G, H = 2, 37, 2, 3, 16


def _inputs(seed=0, s=T):
    rs = np.random.RandomState(seed)
    q = jnp.asarray(rs.randn(B, T, K, G, H), jnp.float32)
    k, v = (jnp.asarray(rs.randn(B, s, K, H), jnp.float32) for _ in range(2))
    return q, k, v, jnp.asarray(rs.randn(B, T, K, G, H), jnp.float32)


# Packed rows: two documents and two padding tokens in row 0, one document in row 1.
SEGMENTS = jnp.asarray([[1] * 20 + [2] * 15 + [0] * 2, [1] * 37], jnp.int32)
SLOTS = jnp.arange(T, dtype=jnp.int32)


@pytest.mark.parametrize("block", [5, 8, 37, 64])
def test_values_and_gradients_equal_dense(block):
    """Every block size (one that divides nothing, one block for all, one longer than the row) gives
    the dense outputs and the dense gradients of q, k and v; the fp32 differences are rounding
    (sums of at most 37 terms of size ~1)."""
    q, k, v, w = _inputs()
    args = (SEGMENTS, SEGMENTS, jnp.broadcast_to(SLOTS, (B, T)), SLOTS)
    np.testing.assert_allclose(flash_attention(q, k, v, *args, block=block),
                               dense_attention(q, k, v, *args), atol=1e-5)

    def loss(fn, **kw):
        return lambda q, k, v: jnp.sum(fn(q, k, v, *args, **kw) * w)

    g_flash = jax.grad(loss(flash_attention, block=block), argnums=(0, 1, 2))(q, k, v)
    g_dense = jax.grad(loss(dense_attention), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", g_flash, g_dense):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"d{name}")
    # Padding queries (segment 0 against segment 0 keys still see each other): no NaN anywhere.
    assert all(bool(jnp.isfinite(g).all()) for g in g_flash)


def test_cache_longer_than_queries():
    """A prefill into a cache: 20 queries at slots 10..29 of 40 slots, the last 10 empty; values and
    gradients. In blocks of 8 the query blocks reach 3, 4 and 4 of the 5 key blocks, so the loops'
    bound is exercised away from the diagonal."""
    q, k, v, w = _inputs(1, s=40)
    q, w = q[:, :20], w[:, :20]
    kv_seg = jnp.asarray(np.r_[np.ones(30), np.zeros(10)][None].repeat(B, 0), jnp.int32)
    q_seg = jnp.ones((B, 20), jnp.int32)
    q_slots = jnp.broadcast_to(10 + jnp.arange(20, dtype=jnp.int32), (B, 20))
    kv_slots = jnp.arange(40, dtype=jnp.int32)
    args = (q_seg, kv_seg, q_slots, kv_slots)
    np.testing.assert_allclose(flash_attention(q, k, v, *args, block=8), dense_attention(q, k, v, *args),
                               atol=1e-5)
    grads = [jax.grad(lambda q, k, v, fn=fn, kw=kw: jnp.sum(fn(q, k, v, *args, **kw) * w), argnums=(0, 1, 2))(q, k, v)
             for fn, kw in ((flash_attention, {"block": 8}), (dense_attention, {}))]
    for name, a, b in zip("qkv", *grads):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"d{name}")


def test_loops_visit_only_key_blocks_in_reach():
    """Causal rows in blocks of 4: query block i visits key blocks 0..i, not all of them; a prefill
    at slots 10..29 over 40 slots (blocks of 8) visits 3, 4 and 4 blocks (the last query block's
    padding slots are 0 and change nothing)."""
    slots = jnp.arange(16, dtype=jnp.int32)
    blocks = slots.reshape(4, 4)
    assert [int(_key_blocks_in_reach(jnp.broadcast_to(blocks[i], (2, 4)), blocks)) for i in range(4)] == [1, 2, 3, 4]
    q_slots = jnp.pad(10 + jnp.arange(20, dtype=jnp.int32), (0, 4)).reshape(3, 8)
    kv_blocks = jnp.arange(40, dtype=jnp.int32).reshape(5, 8)
    assert [int(_key_blocks_in_reach(q_slots[i][None], kv_blocks)) for i in range(3)] == [3, 4, 4]


def test_bfloat16_stays_close_to_fp32():
    """bf16 inputs: scores, softmax sums and gradients accumulate in fp32, and the probabilities and
    score gradients are rounded to bf16 once before their matmuls, so outputs and gradients stay
    within a few bf16 roundings (relative 2^-8 each) of the fp32 result, at the scale of its largest
    entry."""
    q, k, v, w = _inputs(2)
    args = (SEGMENTS, SEGMENTS, jnp.broadcast_to(SLOTS, (B, T)), SLOTS)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    eps = 2.0 ** -8

    def close(got, exact, what):
        err, scale = float(jnp.abs(got.astype(jnp.float32) - exact).max()), float(jnp.abs(exact).max())
        assert err <= 4 * eps * scale, (what, err, scale)

    close(flash_attention(*bf, *args, block=8), dense_attention(q, k, v, *args), "out")

    def grads(fn, inputs, **kw):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, *args, **kw).astype(jnp.float32) * w),
                        argnums=(0, 1, 2))(*inputs)

    flash_grads = grads(flash_attention, bf, block=8)
    assert [g.dtype for g in flash_grads] == [jnp.bfloat16] * 3
    for name, got, exact in zip("qkv", flash_grads, grads(dense_attention, (q, k, v))):
        close(got, exact, f"d{name}")
