"""Flash attention on the CPU as one custom call per pass, fp32 (issue 22).

`attention.flash_attention` written in JAX leaves XLA:CPU a loop of small fusions around every block
pair's products: the scores, their mask, exponentials and running sums go through memory between
fusions, and after the products were handed to MKL (cpu_gemm) those fusions were what kept one
layer's attention core at 150 ms against torch's 105 (bench-100m, 1 x 2048, Intel host). Here each
pass is one C++ handler (csrc/cpu_attention.cc, built and loaded with cpu_gemm's): a block pair's
softmax is one pass over a score block that stays in cache, its products MKL's sgemm, the work
spread over the cores by (batch row, key head, block).

Same semantics as `attention.dense_attention` (a query sees the keys of its own segment at slots up
to its own; a row that sees nothing gives 0). `flash_attention` routes here where
`Qwen3Config.attention_kernel` is on and the inputs are fp32 (`train.default_attention_kernel`: on a
one-device CPU mesh where MKL can run, Intel or AMD).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qedjax.models import cpu_gemm

FWD, BWD = cpu_gemm.ATTENTION_TARGETS


def _attrs(block_q: int, block_k: int) -> dict:
    if block_q < 1 or block_k < 1:
        raise ValueError(f"cpu_attention: blocks must be >= 1, got {block_q} and {block_k}")
    return dict(block_q=block_q, block_k=block_k, threads=cpu_gemm.threads())


def _masks(q_seg, kv_seg, q_slots, kv_slots):
    return tuple(x.astype(jnp.int32) for x in (q_seg, q_slots, kv_seg, kv_slots))


def _forward(q, k, v, q_seg, kv_seg, q_slots, kv_slots, block_q, block_k):
    b, t, kh, g, _ = q.shape
    call = jax.ffi.ffi_call(FWD, (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                  jax.ShapeDtypeStruct((b, kh, t, g), jnp.float32)))
    return call(q, k, v, *_masks(q_seg, kv_seg, q_slots, kv_slots), **_attrs(block_q, block_k))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _attention(q, k, v, q_seg, kv_seg, q_slots, kv_slots, block_q, block_k):
    return _forward(q, k, v, q_seg, kv_seg, q_slots, kv_slots, block_q, block_k)[0]


def _attention_fwd(q, k, v, q_seg, kv_seg, q_slots, kv_slots, block_q, block_k):
    out, lse = _forward(q, k, v, q_seg, kv_seg, q_slots, kv_slots, block_q, block_k)
    return out, (q, k, v, q_seg, kv_seg, q_slots, kv_slots, out, lse)


def _attention_bwd(block_q, block_k, res, d_out):
    q, k, v, q_seg, kv_seg, q_slots, kv_slots, out, lse = res
    call = jax.ffi.ffi_call(BWD, tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)))
    dq, dk, dv = call(q, k, v, *_masks(q_seg, kv_seg, q_slots, kv_slots), out, lse,
                      d_out.astype(jnp.float32), **_attrs(block_q, block_k))
    return dq, dk, dv, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# Query positions and keys per block pair. One layer of bench-100m, forward and backward, ms
# (tools/bench_attention_core.py --kernel BQ BK; Intel host, torch's sdpa in brackets): 1 x 2048:
# 64/64 88-89, 32/64 87, 64/128 86, 64/96 87, 128/128 89-96, 128/256 97, 256/256 102, 128/512 108,
# 32/32 105 (96-101); 4 x 256: 64/64 9.2-9.8, 32/64 9.3, 32/32 9.9, 64/128 10.1, 128/128 10.9 (14.4-14.7);
# 2 x 128: 64/64 1.8, 128/128 2.5 (2.3).
BLOCK_Q, BLOCK_K = 64, 64


def flash_attention(q, k, v, q_seg, kv_seg, q_slots, kv_slots, block_q: int = BLOCK_Q, block_k: int = BLOCK_K):
    """Softmax attention by the C++ kernel, differentiable in q, k and v.

    Args:
      q: fp32 [B, T, K, G, H]; k, v: fp32 [B, S, K, H]; q_seg, q_slots: int [B, T]; kv_seg: int [B, S];
        kv_slots: int [S] (as attention.flash_attention).
      block_q, block_k: query positions and keys per block pair.
    Returns:
      fp32 [B, T, K, G, H].
    """
    reason = cpu_gemm.available()
    if reason is not None:
        raise RuntimeError(reason)
    if any(x.dtype != jnp.float32 for x in (q, k, v)) or q.ndim != 5 or k.ndim != 4 or k.shape != v.shape \
            or (q.shape[0], q.shape[2], q.shape[4]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(f"cpu_attention takes fp32 q [B, T, K, G, H] and k, v [B, S, K, H], got "
                         f"{q.dtype}{list(q.shape)}, {k.dtype}{list(k.shape)}, {v.dtype}{list(v.shape)}")
    return _attention(q, k, v, q_seg, kv_seg, q_slots, kv_slots, block_q, block_k)
