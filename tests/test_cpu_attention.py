"""The C++ flash attention kernel (qedjax/models/cpu_attention.py) against the dense path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qedjax.models import cpu_attention, cpu_gemm
from qedjax.models.attention import dense_attention

pytestmark = pytest.mark.skipif(cpu_gemm.available() is not None, reason=str(cpu_gemm.available()))

B, T, K, G, H = 2, 37, 2, 3, 16
# Packed rows: two documents and two padding tokens in row 0, one document in row 1.
SEGMENTS = jnp.asarray([[1] * 20 + [2] * 15 + [0] * 2, [1] * 37], jnp.int32)
SLOTS = jnp.arange(T, dtype=jnp.int32)
ARGS = (SEGMENTS, SEGMENTS, jnp.broadcast_to(SLOTS, (B, T)), SLOTS)


def _inputs(seed=0, t=T, s=T):
    rs = np.random.RandomState(seed)
    q = jnp.asarray(rs.randn(B, t, K, G, H), jnp.float32)
    k, v = (jnp.asarray(rs.randn(B, s, K, H), jnp.float32) for _ in range(2))
    return q, k, v, jnp.asarray(rs.randn(B, t, K, G, H), jnp.float32)


def _grads(fn, q, k, v, w, args, **kw):
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, *args, **kw) * w), argnums=(0, 1, 2))(q, k, v)


def _assert_matches_dense(q, k, v, w, args, **kw):
    """Outputs and the gradients of q, k and v equal the dense path's; the fp32 differences are
    rounding (sums of at most 40 terms of size ~1, in another order)."""
    np.testing.assert_allclose(cpu_attention.flash_attention(q, k, v, *args, **kw), dense_attention(q, k, v, *args),
                               atol=1e-5)
    got, want = _grads(cpu_attention.flash_attention, q, k, v, w, args, **kw), _grads(dense_attention, q, k, v, w, args)
    for name, a, b in zip("qkv", got, want):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"d{name}")
    return got


@pytest.mark.parametrize("block_q, block_k", [(5, 8), (8, 5), (3, 37), (37, 37), (64, 64), (1, 1)])
def test_values_and_gradients_equal_dense(block_q, block_k):
    """Blocks that divide nothing, one block for all, blocks longer than the row, single positions:
    pairs on the diagonal, across the documents' boundary (partly seen), wholly seen and wholly
    skipped all occur."""
    got = _assert_matches_dense(*_inputs(), ARGS, block_q=block_q, block_k=block_k)
    assert all(bool(jnp.isfinite(g).all()) for g in got)


def test_cache_longer_than_queries():
    """A prefill into a cache: 20 queries at slots 10..29 of 40 slots, the last 10 empty (another
    segment), so whole key blocks are skipped and the queries are not on the keys' diagonal."""
    q, k, v, w = _inputs(1, t=20, s=40)
    kv_seg = jnp.asarray(np.r_[np.ones(30), np.zeros(10)][None].repeat(B, 0), jnp.int32)
    args = (jnp.ones((B, 20), jnp.int32), kv_seg, jnp.broadcast_to(10 + jnp.arange(20, dtype=jnp.int32), (B, 20)),
            jnp.arange(40, dtype=jnp.int32))
    _assert_matches_dense(q, k, v, w, args, block_q=8, block_k=8)


def test_a_row_that_sees_nothing_gives_zeros():
    """A query whose segment no key has: output 0 and no gradient through it, nothing NaN (the
    dense path would give a uniform average there, so this is checked on its own)."""
    q, k, v, w = _inputs(2)
    q_seg = SEGMENTS.at[1, 30:].set(7)  # no key is in segment 7
    args = (q_seg, SEGMENTS, jnp.broadcast_to(SLOTS, (B, T)), SLOTS)
    out = cpu_attention.flash_attention(q, k, v, *args, block_q=4, block_k=8)
    np.testing.assert_array_equal(out[1, 30:], 0.0)
    np.testing.assert_allclose(out[:, :30], dense_attention(q, k, v, *args)[:, :30], atol=1e-5)
    dq, dk, dv = _grads(cpu_attention.flash_attention, q, k, v, w, args, block_q=4, block_k=8)
    np.testing.assert_array_equal(dq[1, 30:], 0.0)
    assert all(bool(jnp.isfinite(g).all()) for g in (dq, dk, dv))


def test_threads_change_only_the_order_of_sums(monkeypatch):
    """The work spreads over the host's cores; with 1 or 5 threads (each with its own dQ buffer,
    summed at the end) the results agree to rounding."""
    q, k, v, w = _inputs(3)
    results = []
    for threads in (1, 5):
        monkeypatch.setattr(cpu_gemm, "threads", lambda threads=threads: threads)
        results.append((cpu_attention.flash_attention(q, k, v, *ARGS, block_q=4, block_k=4),
                        *_grads(cpu_attention.flash_attention, q, k, v, w, ARGS, block_q=4, block_k=4)))
    for name, a, b in zip(["out", "dq", "dk", "dv"], *results):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)


def test_bad_inputs_name_their_shapes():
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match=r"fp32 q \[B, T, K, G, H\].*bfloat16\[2, 37, 2, 3, 16\]"):
        cpu_attention.flash_attention(q.astype(jnp.bfloat16), k, v, *ARGS)
    with pytest.raises(ValueError, match=r"float32\[2, 37, 2, 16\], float32\[2, 36, 2, 16\]"):
        cpu_attention.flash_attention(q, k, v[:, :36], *ARGS)
    with pytest.raises(ValueError, match="blocks must be >= 1, got 0 and 8"):
        cpu_attention.flash_attention(q, k, v, *ARGS, block_q=0, block_k=8)
