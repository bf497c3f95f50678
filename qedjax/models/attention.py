"""Masked softmax attention for Qwen3: a dense path and a blockwise one with its own backward pass.

This is the XLA path of models/kernels.py: all attention on the CPU, and on every backend the KV-cache
prefills and decoding (TPU and GPU train steps over whole rows take splash and cuDNN instead).

Both take q: [B, T, K, G, H] (G = query heads per key head), k, v: [B, S, K, H], segment ids and slots,
and return [B, T, K, G, H]. A query sees the keys of its own segment at slots up to its own.

`flash_attention` is the path of rows longer than one block (training at length, long prefills). It
computes attention block by block with a running softmax and has a hand-written VJP (the
FlashAttention recipe: keep the output and each row's log-sum-exp, recompute the probabilities of one
block pair at a time in the backward pass). Letting JAX differentiate the loops instead would replay
the running softmax twice more.

Layout: inside the loops a query block is [B, K, C x G, H] (row = position x G + head), so every
matmul is a batched GEMM over (B, K) with no transposes. A query block's key loop stops after the
last key block that holds a slot at or before the block's latest query slot (causal rows: block i
visits i + 1 blocks, not all of them). Inside it, a block pair is skipped when no query sees any key
of it (other segments), and computed without the mask when every query sees every key; only the
blocks on the diagonal or a segment boundary pay for the mask. Skipping gives the same result as
computing: the running sums would gain nothing, or, before a row's first visible key, gain terms
that its first visible block multiplies by exp(NEG - max) = 0.

Each pair's branch returns its own contribution (the forward: its numerator against its own row
maximum; the backward: its dQ, dK and dV), merged into the running sums outside the branch: a skip
branch that handed the carries back unchanged would make XLA copy every carry (dK and dV are the
whole [nk, ...] arrays) into and out of the conditional at every pair.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

NEG = float(jnp.finfo(jnp.float32).min)


def _mask(q_seg, q_slots, kv_seg, kv_slots):
    """[B, T] / [B, T] / [B, S] / [S] -> bool [B, T, S]."""
    return (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_slots[None, None, :] <= q_slots[:, :, None])


def dense_attention(q, k, v, q_seg, kv_seg, q_slots, kv_slots):
    """Softmax attention with the whole [T, S] score matrix (decoding and short prefills)."""
    h = q.shape[-1]
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * (h ** -0.5)
    mask = _mask(q_seg, q_slots, kv_seg, kv_slots)
    probs = jax.nn.softmax(jnp.where(mask[:, None, None], scores, NEG), axis=-1).astype(q.dtype)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)


def _by_pair_kind(mask, attend, skip):
    """`skip()` when no query sees a key of the block pair, `attend(masked=False)` when every query
    sees every key, `attend(masked=True)` otherwise."""
    kind = jnp.where(mask.any(), jnp.where(mask.all(), 1, 2), 0)
    return jax.lax.switch(kind, [skip, functools.partial(attend, masked=False), functools.partial(attend, masked=True)])


def _key_blocks_in_reach(q_slots, kv_slots):
    """How many leading key blocks the loops visit for a query block: up to the last one holding a
    slot at or before the block's latest query slot. Later blocks hold no visible key (a key is seen
    only from slots at or after its own), so causal training rows visit (i + 1) of n blocks at query
    block i instead of all n. q_slots: [B, C]; kv_slots: [nk, Ck]."""
    reach = kv_slots.min(axis=-1) <= q_slots.max()
    return jnp.max(jnp.where(reach, jnp.arange(1, kv_slots.shape[0] + 1), 0))


def _rows_mask(mask, g):
    """[B, C, Ck] -> [B, 1, C x G, Ck]: the mask of a query block's rows (row = position x G + head)."""
    b, c, ck = mask.shape
    return jnp.broadcast_to(mask[:, :, None, :], (b, c, g, ck)).reshape(b, 1, c * g, ck)


def _product(a, b, trans_a: bool, trans_b: bool):
    """op(a) @ op(b) over the leading [B, K], fp32."""
    spec = f"BK{'km' if trans_a else 'mk'},BK{'nk' if trans_b else 'kn'}->BKmn"
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _scores(qb, kb):
    """[B, K, R, H] x [B, K, Ck, H] -> fp32 [B, K, R, Ck], scaled."""
    return _product(qb, kb, False, True) * (qb.shape[-1] ** -0.5)


def _forward(g, qs, ks, vs, q_seg, q_slots, kv_seg, kv_slots):
    """Blocked inputs -> (out [nq, B, K, R, H] in q's dtype, lse fp32 [nq, B, K, R])."""

    def one_query_block(args):
        qb, qsg, qsl = args  # [B, K, R, H], [B, C], [B, C]
        b, kh, r, h = qb.shape

        def step(j, carry):
            kb, vb = ks[j], vs[j]
            mask = _mask(qsg, qsl, kv_seg[j], kv_slots[j])

            def attend(masked):  # this pair's softmax numerator against its own row maximum
                sc = _scores(qb, kb)
                if masked:
                    sc = jnp.where(_rows_mask(mask, g), sc, NEG)
                m_j = sc.max(axis=-1)
                p = jnp.exp(sc - m_j[..., None])
                pv = _product(p.astype(vb.dtype), vb, False, False)  # [B, K, R, H]
                return pv, p.sum(axis=-1), m_j

            def skip():
                return (jnp.zeros((b, kh, r, h), jnp.float32), jnp.zeros((b, kh, r), jnp.float32),
                        jnp.full((b, kh, r), NEG, jnp.float32))

            # The running sums are merged outside the switch: a branch that hands the carry back
            # unchanged made XLA copy it into and out of the conditional at every pair.
            pv, l_j, m_j = _by_pair_kind(mask, attend, skip)
            o, l, m = carry  # [B, K, R, H], [B, K, R], [B, K, R]
            m_new = jnp.maximum(m, m_j)
            corr, corr_j = jnp.exp(m - m_new), jnp.exp(m_j - m_new)
            return o * corr[..., None] + pv * corr_j[..., None], l * corr + l_j * corr_j, m_new

        init = (jnp.zeros((b, kh, r, h), jnp.float32), jnp.zeros((b, kh, r), jnp.float32),
                jnp.full((b, kh, r), NEG, jnp.float32))
        o, l, m = jax.lax.fori_loop(0, _key_blocks_in_reach(qsl, kv_slots), step, init)
        seen = l > 0  # l = 0 only in a block of padding queries skipped everywhere (sliced off by the caller)
        out = o / jnp.where(seen, l, 1.0)[..., None]
        return out.astype(qb.dtype), jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)

    return jax.lax.map(one_query_block, (qs, q_seg, q_slots))


def _backward(g, res, d_out):
    """The FlashAttention backward over every (query block, key block) pair, query blocks outermost.

    dQ of a query block is accumulated in its inner loop; dK and dV (G times smaller than dQ under
    grouped-query attention) are the fp32 carries updated block by block, kept transposed,
    [nk, B, K, H, Ck], so that no product contracts the rows of both of its operands.
    """
    qs, ks, vs, q_seg, q_slots, kv_seg, kv_slots, out, lse = res
    delta = jnp.einsum("IBKRH,IBKRH->IBKR", d_out.astype(jnp.float32), out.astype(jnp.float32))
    scale = qs.shape[-1] ** -0.5
    dk_shape = ks.shape[1:3] + ks.shape[4:] + ks.shape[3:4]  # [B, K, H, Ck]

    def query_block(dkv, args):
        qb, dob, qsg, qsl, lse_b, delta_b = args

        def key_block(j, carry):
            kb, vb = ks[j], vs[j]
            mask = _mask(qsg, qsl, kv_seg[j], kv_slots[j])

            def attend(masked):
                p = jnp.exp(_scores(qb, kb) - lse_b[..., None])  # [B, K, R, Ck]
                if masked:
                    p = jnp.where(_rows_mask(mask, g), p, 0.0)
                dv_j = _product(dob, p.astype(dob.dtype), True, False)  # [B, K, H, Ck]
                dp = _product(dob, vb, False, True)  # [B, K, R, Ck]
                ds = (p * (dp - delta_b[..., None]) * scale).astype(qb.dtype)
                dk_j = _product(qb, ds, True, False)  # [B, K, H, Ck]
                dq_j = _product(ds, kb, False, False)  # [B, K, R, H]
                return dq_j, dk_j, dv_j

            def skip():
                return jnp.zeros(qb.shape, jnp.float32), jnp.zeros(dk_shape, jnp.float32), jnp.zeros(dk_shape, jnp.float32)

            # Accumulated outside the switch, as in the forward pass (no copies of the carries).
            dq_j, dk_j, dv_j = _by_pair_kind(mask, attend, skip)
            dq, dk, dv = carry
            return dq + dq_j, dk.at[j].add(dk_j), dv.at[j].add(dv_j)

        dq, dk, dv = jax.lax.fori_loop(0, _key_blocks_in_reach(qsl, kv_slots), key_block,
                                       (jnp.zeros(qb.shape, jnp.float32), *dkv))
        return (dk, dv), dq.astype(qb.dtype)

    zeros = jnp.zeros(ks.shape[:3] + ks.shape[4:] + ks.shape[3:4], jnp.float32)  # [nk, B, K, H, Ck]
    (dk, dv), dq = jax.lax.scan(query_block, (zeros, zeros), (qs, d_out, q_seg, q_slots, lse, delta))
    return dq, jnp.swapaxes(dk, -1, -2).astype(ks.dtype), jnp.swapaxes(dv, -1, -2).astype(vs.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocked_attention(g, qs, ks, vs, q_seg, q_slots, kv_seg, kv_slots):
    return _forward(g, qs, ks, vs, q_seg, q_slots, kv_seg, kv_slots)[0]


def _blocked_fwd(g, qs, ks, vs, q_seg, q_slots, kv_seg, kv_slots):
    out, lse = _forward(g, qs, ks, vs, q_seg, q_slots, kv_seg, kv_slots)
    return out, (qs, ks, vs, q_seg, q_slots, kv_seg, kv_slots, out, lse)


def _blocked_bwd(g, res, d_out):
    dq, dk, dv = _backward(g, res, d_out)
    return dq, dk, dv, None, None, None, None


_blocked_attention.defvjp(_blocked_fwd, _blocked_bwd)


def flash_attention(q, k, v, q_seg, kv_seg, q_slots, kv_slots, block: int):
    """Blockwise attention with O(block^2) memory per step and a hand-written backward pass.

    Args:
      q: [B, T, K, G, H]; k, v: [B, S, K, H]; q_seg, q_slots: int [B, T]; kv_seg: int [B, S];
        kv_slots: int [S].
      block: queries and keys go in blocks of min(block, T) and min(block, S).
    Returns:
      [B, T, K, G, H] in q's dtype.
    """
    b, t, kh, g, h = q.shape
    s = k.shape[1]
    cq, ck = min(block, t), min(block, s)
    pt, ps = -t % cq, -s % ck
    nq, nk = (t + pt) // cq, (s + ps) // ck
    q = jnp.pad(q, ((0, 0), (0, pt), (0, 0), (0, 0), (0, 0)))
    q_seg = jnp.pad(q_seg, ((0, 0), (0, pt)), constant_values=-1)  # padding queries match no key
    q_slots = jnp.pad(q_slots, ((0, 0), (0, pt)))
    k = jnp.pad(k, ((0, 0), (0, ps), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, ps), (0, 0), (0, 0)))
    kv_seg = jnp.pad(kv_seg, ((0, 0), (0, ps)), constant_values=-2)  # padding keys match no query
    kv_slots = jnp.pad(kv_slots, (0, ps))
    # [B, nq x C, K, G, H] -> [nq, B, K, C x G, H]; [B, nk x C, K, H] -> [nk, B, K, C, H]
    qs = q.reshape(b, nq, cq, kh, g, h).transpose(1, 0, 3, 2, 4, 5).reshape(nq, b, kh, cq * g, h)
    kv_blocks = lambda x: x.reshape(b, nk, ck, kh, h).transpose(1, 0, 3, 2, 4)  # noqa: E731
    seg_blocks = lambda x, n, c: x.reshape(b, n, c).transpose(1, 0, 2)  # noqa: E731
    out = _blocked_attention(g, qs, kv_blocks(k), kv_blocks(v), seg_blocks(q_seg, nq, cq),
                             seg_blocks(q_slots, nq, cq), seg_blocks(kv_seg, nk, ck), kv_slots.reshape(nk, ck))
    out = out.reshape(nq, b, kh, cq, g, h).transpose(1, 0, 3, 2, 4, 5).reshape(b, nq * cq, kh, g, h)
    return out[:, :t]
