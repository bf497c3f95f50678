"""Attention by backend, behind one function: the accelerators' kernels where the program runs on one.

`attention(...)` takes the model's grouped queries q [B, T, K, G, H], keys and values [B, S, K, H],
segment ids and slots, and returns [B, T, K, G, H]. Which computation runs is `Qwen3Config.attention`
(`model.attention` in a run config):

  auto    the kernel of the platform the program is compiled for: `splash` on TPU, `cudnn` on GPU,
          `xla` elsewhere (the CPU). The platform is that of the mesh the program is traced under
          (a --compile-only TPU compile on a CPU host gets splash), or JAX's default backend when it
          is traced under none (a model called without a mesh: tests, the demo).
  xla     models/attention.py: dense up to `attention_block` tokens, blockwise (FlashAttention recipe,
          its own backward pass) above. Any platform.
  splash  Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention): causal, grouped
          heads, packed segment ids. TPU only (tests run it on the CPU in Pallas interpret mode).
  cudnn   cuDNN's flash attention through jax.nn.dot_product_attention(implementation="cudnn"). GPU only.

Which path uses what. The kernels take the training-shaped case only: a full row attending to itself
(no KV cache, slots 0..T-1, T a multiple of 128): the SFT and GRPO train steps and every forward over
whole rows (log-probs of a batch). Decoding and KV-cache prefills (the samplers) always take the XLA
path: their queries sit at cache slots the kernels' causal masks do not describe, and one decoded
token is a matrix-vector product no kernel speeds up. With `auto`, a full row the kernel cannot take
(T not a multiple of 128; batch or kv heads not divisible over the mesh's shards) takes the XLA path;
an explicit `splash` or `cudnn` there is an error.

Semantics are those of models/attention.py: a query sees the keys of its own segment at slots up to
its own (padding, segment 0, sees padding; its outputs are masked out of every loss).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from qedjax.models.attention import dense_attention, flash_attention
from qedjax.sharding import activation_context

KINDS = ("auto", "xla", "splash", "cudnn")
# The kernel `auto` picks on each platform (jax.Device.platform); any other platform runs XLA's.
AUTO = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}
NEEDS = {"splash": ("tpu",), "cudnn": ("gpu", "cuda")}
SPLASH_BLOCKS = (512, 256, 128)  # the largest that divides T (MaxText's v5p default is 512)
# The name splash gives its output and log-sum-exp (the residuals of its backward kernels). Under
# remat, REMAT_POLICY keeps them, so the backward pass runs the dQ and dK/dV kernels on them instead
# of running the forward kernel again (at 49k tokens attention is most of a step's FLOPs): per layer
# and row, T x N x H in the compute dtype plus T x N fp32. The XLA and cuDNN paths name nothing:
# under the policy they are recomputed whole, as under plain remat.
SAVED = "attention_kernel_residuals"
REMAT_POLICY = jax.checkpoint_policies.save_only_these_names(SAVED)


def platform() -> str:
    """The platform the program being traced is compiled for: its mesh's, or the default backend's."""
    ctx = activation_context()
    if ctx is not None:
        return ctx[0].devices.flat[0].platform
    return jax.default_backend()


def check(kind: str, target: str) -> None:
    """An explicit kernel on a platform that lacks it is a config error, raised before any compile."""
    if kind not in KINDS:
        raise ValueError(f"model.attention must be one of {KINDS}, got {kind!r}")
    if kind in NEEDS and target not in NEEDS[kind]:
        raise ValueError(f"model.attention={kind} runs on {'/'.join(NEEDS[kind])} only; this program is "
                         f"compiled for {target} (use model.attention=auto or xla)")


def choose(kind: str, target: str) -> str:
    check(kind, target)
    return AUTO.get(target, "xla") if kind == "auto" else kind


def attention(q, k, v, q_seg, kv_seg, q_slots, kv_slots, *, kind: str = "auto", block: int = 0,
              full_row: bool = False, interpret: bool = False):
    """Softmax attention by backend.

    Args:
      q: [B, T, K, G, H]; k, v: [B, S, K, H]; q_seg, q_slots: int [B, T]; kv_seg: int [B, S];
        kv_slots: int [S].
      kind: one of KINDS (model.attention).
      block: the XLA path's block (models.qwen3.flash_block; 0: dense).
      full_row: the queries are the whole row at slots 0..T-1 attending to themselves (no cache):
        the only case the kernels take.
      interpret: run splash in Pallas interpret mode (tests on the CPU).
    Returns:
      [B, T, K, G, H] in q's dtype.
    """
    chosen = choose(kind, "tpu" if interpret and kind == "splash" else platform())
    if chosen != "xla":
        why = _unsupported(chosen, q, full_row)
        if why and kind != "auto":
            raise ValueError(f"model.attention={kind}: {why}")
        if not why:
            if chosen == "splash":
                return splash_attention(q, k, v, q_seg, interpret=interpret)
            return cudnn_attention(q, k, v, q_seg)
    if block:
        return flash_attention(q, k, v, q_seg, kv_seg, q_slots, kv_slots, block=block)
    return dense_attention(q, k, v, q_seg, kv_seg, q_slots, kv_slots)


def _shards(axes) -> int:
    ctx = activation_context()
    if ctx is None or axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(ctx[0].shape[a] for a in axes)


def _unsupported(chosen: str, q, full_row: bool) -> str:
    """Why the kernel cannot take this call ('' when it can)."""
    b, t, kh = q.shape[:3]
    if not full_row:
        return "decoding and cache prefills take the XLA path (queries at cache slots)"
    if t % 128:
        return f"rows of {t} tokens: the kernel takes multiples of 128"
    ctx = activation_context()
    if chosen == "splash" and ctx is not None:
        rules = ctx[1]
        if b % _shards(rules["batch"]) or kh % _shards(rules["act_heads"]):
            return (f"{b} rows / {kh} kv heads do not split over the mesh's {_shards(rules['batch'])} batch "
                    f"/ {_shards(rules['act_heads'])} head shards")
    return ""


# --- TPU: splash attention -------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, t: int, interpret: bool):
    """A causal splash kernel for `heads` query heads over rows of t tokens. Its block mask is built
    in numpy when it is made (a grid of (t / block)^2 entries per head), so one kernel serves every
    layer and step of that shape."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # Pallas: imported when used

    b = next(s for s in SPLASH_BLOCKS if t % s == 0)
    sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                          block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = sa.MultiHeadMask([sa.CausalMask((t, t))] * heads)
    # Built eagerly: the kernel keeps its mask's block tables as arrays, and made under one trace
    # (a jit, a shard_map) they would be that trace's values, leaked into the next program of the
    # same shape that reuses the kernel.
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret,
                                  residual_checkpoint_name=SAVED)


def _splash_local(q, k, v, seg, interpret: bool):
    """One shard: q [b, N, T, H] (already scaled), k, v [b, K, T, H], seg [b, T] -> [b, N, T, H]."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    kernel = _splash_kernel(q.shape[1], q.shape[2], interpret)
    return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sa.SegmentIds(q=s, kv=s)))(q, k, v, seg)


def splash_attention(q, k, v, seg, *, interpret: bool = False):
    """Pallas splash attention over whole causal rows: q [B, T, K, G, H], k, v [B, T, K, H],
    seg [B, T] -> [B, T, K, G, H].

    Splash does not scale the scores: the queries are scaled here. Heads go head-major
    ([B, N, T, H], query head n = k x G + g reads kv head k, as splash groups them). Under a mesh the
    kernel runs per shard (shard_map over the rules' batch and head axes): a Pallas call has no
    partitioning rule, and unsharded it would be gathered whole onto every chip.
    """
    b, t, kh, g, h = q.shape
    scale = jnp.asarray(h ** -0.5, q.dtype)
    qh = (q * scale).reshape(b, t, kh * g, h).transpose(0, 2, 1, 3)  # [B, N, T, H]
    kh_, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
    seg = seg.astype(jnp.int32)
    run = functools.partial(_splash_local, interpret=interpret)
    ctx = activation_context()
    if ctx is not None:
        mesh, rules = ctx
        from jax.sharding import PartitionSpec as P

        heads = P(rules["batch"], rules["act_heads"], None, None)
        run = jax.shard_map(run, mesh=mesh, in_specs=(heads, heads, heads, P(rules["batch"], None)),
                            out_specs=heads, check_vma=False)
    out = run(qh, kh_, vh, seg)  # [B, N, T, H]
    return out.transpose(0, 2, 1, 3).reshape(b, t, kh, g, h)


# --- GPU: cuDNN flash attention --------------------------------------------------------------------


def cudnn_attention(q, k, v, seg):
    """cuDNN flash attention over whole causal rows: q [B, T, K, G, H], k, v [B, T, K, H],
    seg [B, T] -> [B, T, K, G, H].

    Causality is cuDNN's own (it skips the blocks above the diagonal); packing is a boolean mask of
    equal segments ([B, 1, T, T]) that jax hands to cuDNN as an additive bias. That bias is
    materialised: T^2 x 2 bytes per row, 8 MiB at 2,048 tokens but 4.5 GiB at 49,152. The packed
    layout cuDNN offers for this (per-segment offsets, jax's private cudnn API) is not wired.
    GSPMD partitions the cuDNN call over batch and heads itself (jax registers its partitioning).
    """
    b, t, kh, g, h = q.shape
    mask = (seg[:, None, :, None] == seg[:, None, None, :])  # [B, 1, T, T]
    out = jax.nn.dot_product_attention(q.reshape(b, t, kh * g, h), k, v, mask=mask, is_causal=True,
                                       implementation="cudnn")
    return out.reshape(b, t, kh, g, h)


def reference_causal(q, k, v, seg):
    """The dense XLA attention over whole causal rows (the kernels' reference in tests and tools)."""
    t = q.shape[1]
    slots = jnp.arange(t, dtype=jnp.int32)
    return dense_attention(q, k, v, seg, seg, jnp.broadcast_to(slots, seg.shape), slots)

