"""Qwen3 dense decoder in Flax NNX.

How Qwen3 differs from a vanilla pre-norm transformer:
- grouped-query attention: K key/value heads shared by N query heads, and a head dim H that is set
  on its own (not D / N);
- an RMSNorm over the head dim on every query and key head, applied before RoPE;
- rotate-half RoPE with theta from the config; SwiGLU MLP; RMSNorm pre-norm; no biases anywhere;
- tied input/output embeddings for the small models (0.6B, 1.7B, 4B), untied from 8B up.

Dimension letters: B batch, T query length, S key length (cache slots), D model width, N query heads,
K key/value heads, G query heads per key/value head (N / K), H head dim, F MLP width, V vocab, L layers,
M rows (B x T flattened).

The projections run on rows flattened to [M, D]: every weight gradient is then one plain 2-D product
over all rows, with no transposes of [B, T, ...] activations in front of it.
Weights keep Hugging Face's layout (a linear layer's [out, in]; heads split out of the flattened
axis: q_proj [N, H, D], o_proj [D, N, H]), so a checkpoint loads, exports and publishes as a plain
read or reshape of each tensor, never a transpose.

Positions, segments and the cache. `positions` feed RoPE; `segment_ids` say which tokens may see each
other (packed rows hold several documents; 0 marks padding); causality is by slot order (a token's
index in the row, or in the KV cache). A KV cache is a value: passed in, updated, returned.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qedjax.models import kernels
from qedjax.sharding import constrain

# Hugging Face config.json values. Qwen3-4B-Thinking-2507 (the paper's base model) differs from
# Qwen3-4B only in rope_theta and context length.
_QWEN3_COMMON = dict(vocab_size=151936, head_dim=128, num_key_value_heads=8, rms_norm_eps=1e-6,
                     bos_token_id=151643, eos_token_id=151645)
PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": dict(_QWEN3_COMMON, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, rope_theta=1e6, max_position_embeddings=40960,
                       tie_word_embeddings=True),
    "qwen3-1.7b": dict(_QWEN3_COMMON, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, rope_theta=1e6, max_position_embeddings=40960,
                       tie_word_embeddings=True),
    "qwen3-4b": dict(_QWEN3_COMMON, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, rope_theta=1e6, max_position_embeddings=40960,
                     tie_word_embeddings=True),
    "qwen3-4b-thinking-2507": dict(_QWEN3_COMMON, hidden_size=2560, intermediate_size=9728,
                                   num_hidden_layers=36, num_attention_heads=32, rope_theta=5e6,
                                   max_position_embeddings=262144, tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3_COMMON, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, rope_theta=1e6, max_position_embeddings=40960,
                     tie_word_embeddings=False),
    # Small shapes for tests and the embedded demo (vocab set by the toy tokenizer).
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                 rms_norm_eps=1e-6, max_position_embeddings=2048, tie_word_embeddings=True),
    # The embedded demo's model (configs/tiny.yaml): wide enough to learn the toy task in minutes.
    "demo": dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=10000.0,
                 rms_norm_eps=1e-6, max_position_embeddings=2048, tie_word_embeddings=True),
    # ~100M parameters: the CPU benchmark shape.
    "bench-100m": dict(vocab_size=32768, hidden_size=640, intermediate_size=2048, num_hidden_layers=12,
                       num_attention_heads=10, num_key_value_heads=2, head_dim=64, rope_theta=1e6,
                       rms_norm_eps=1e-6, max_position_embeddings=8192, tie_word_embeddings=True),
}

DTYPES = ("float32", "bfloat16")
# Qwen3Config's fields that say how the model runs, not what it is (no config.json carries them)
RUN_FIELDS = frozenset({"param_dtype", "dtype", "remat", "attention_block", "attention"})
# model.attention: which attention runs (models/kernels.py): the platform's kernel, or one named
ATTENTION_KINDS = ("auto", "xla", "splash", "cudnn")


def flash_block(t: int, block: int) -> int:
    """The block flash_attention takes for rows of t tokens, or 0 for the dense path.

    Rows up to `block` tokens attend densely; longer ones go in n = max(2, ceil(t / block)) equal
    blocks, rounded up to a multiple of 8: 520 tokens take two blocks of 264, not two of 512 (one of
    them mostly padding).
    """
    if not block or t <= block:
        return 0
    n = max(2, -(-t // block))
    per_block = -(-t // n)
    return min(block, -(-per_block // 8) * 8)


# Keys a config.json may leave out, with transformers' Qwen3Config defaults.
_HF_DEFAULTS = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "max_position_embeddings": 32768,
                "bos_token_id": None, "eos_token_id": None}


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Architecture (field names as in Hugging Face's Qwen3 config.json) plus dtypes and remat."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 40960
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    param_dtype: str = "float32"  # storage dtype of the parameters
    dtype: str = "float32"  # compute dtype of activations and matmuls
    remat: bool = False  # recompute each block in the backward pass, but the attention kernel (long sequences)
    attention_block: int = 512  # the XLA path: rows longer than this go blockwise, in blocks of up to it (0: dense only)
    attention: str = "auto"  # ATTENTION_KINDS: auto = splash on TPU, cuDNN on GPU, XLA elsewhere (models/kernels.py)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"Qwen3Config.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.attention_block < 0:
            raise ValueError(f"attention_block must be >= 0, got {self.attention_block}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"Qwen3Config.attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"Qwen3Config.{name} must be one of {DTYPES}, got {getattr(self, name)!r}")

    @property
    def num_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def preset(cls, name: str, **overrides) -> "Qwen3Config":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json", **overrides) -> "Qwen3Config":
        """From a Hugging Face config.json dict; anything this model cannot run is an error."""
        arch = hf.get("architectures") or ["Qwen3ForCausalLM"]
        if hf.get("model_type", "qwen3") != "qwen3" or "Qwen3ForCausalLM" not in arch:
            raise ValueError(f"{source}: unsupported model (model_type={hf.get('model_type')!r}, "
                             f"architectures={arch}); qedjax runs dense Qwen3ForCausalLM only")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        unsupported = {
            "hidden_act": hf.get("hidden_act", "silu") != "silu",
            "attention_bias": bool(hf.get("attention_bias", False)),
            "use_sliding_window": bool(hf.get("use_sliding_window", False)),
            "rope_scaling": rope.get("rope_type", rope.get("type", "default")) != "default",
        }
        for key, bad in unsupported.items():
            if bad:
                raise ValueError(f"{source}: {key}={hf.get(key, rope)!r} is not supported by qedjax's Qwen3")
        fields = dict(_HF_DEFAULTS, **hf)
        fields["rope_theta"] = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        if fields.get("head_dim") is None and {"hidden_size", "num_attention_heads"} <= fields.keys():
            fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]
        if isinstance(fields.get("eos_token_id"), list):
            fields["eos_token_id"] = fields["eos_token_id"][0]
        names = {f.name for f in dataclasses.fields(cls)} - RUN_FIELDS
        missing = sorted(n for n in names if n not in fields)
        if missing:
            raise ValueError(f"{source}: missing keys {missing}")
        return cls(**{k: fields[k] for k in names if k in fields}, **overrides)

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers (v4 and v5) and vLLM load as Qwen3ForCausalLM."""
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": self.num_hidden_layers,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.param_dtype,
            "dtype": self.param_dtype,
            "use_cache": True,
            "initializer_range": 0.02,
        }


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, computed in fp32 and cast back before the scale (as HF does)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate-half RoPE. x: [B, T, heads, H]; positions: [B, T]."""
    h = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Position of each token inside its segment: 0, 1, 2, ... restarting where the id changes."""
    t = segment_ids.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], dtype=bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer in preallocated slots, and the segment id of every slot.

    k, v: one [B, S, K, H] array per layer; segment_ids: [B, S] (0 = empty or padding);
    index: the next slot to write (the same for every row; rows are left-padded).
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    segment_ids: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, config: Qwen3Config, batch: int, max_len: int) -> "KVCache":
        shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
        zeros = tuple(jnp.zeros(shape, config.dtype) for _ in range(config.num_hidden_layers))
        return cls(k=zeros, v=zeros, segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                   index=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.segment_ids.shape[1]


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str, ...], dtype: str, init="normal"):
    """A parameter tagged with logical axis names (mapped to mesh axes by qedjax.sharding)."""
    if init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, sharding_names=names, eager_sharding=False)


def project(spec: str, rows: jax.Array, w: jax.Array) -> jax.Array:
    """A projection of flattened rows: rows [M, ...] contract with w, which is stored in Hugging
    Face's layout ([out..., in...] for q/k/v, gate/up, lm_head; o_proj [D, N, H]; down_proj [D, F]),
    giving [M, ...] (jnp.einsum(spec, rows, w)). XLA's dot_general contracts either operand axis
    in place, so the layout costs no transpose, and loading or publishing weights copies no matrix."""
    return jnp.einsum(spec, rows, w)


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float, dtype: str, rngs: nnx.Rngs, axis_name: str = "norm"):
        self.scale = _param(rngs, (size,), (axis_name,), dtype, init="ones")
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.scale[...], self.eps)


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen3Config, rngs: nnx.Rngs):
        d, n, k, h, pd = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                          cfg.head_dim, cfg.param_dtype)
        self.q_proj = _param(rngs, (n, h, d), ("q_heads", "head_dim", "embed"), pd)
        self.k_proj = _param(rngs, (k, h, d), ("kv_heads", "head_dim", "embed"), pd)
        self.v_proj = _param(rngs, (k, h, d), ("kv_heads", "head_dim", "embed"), pd)
        self.o_proj = _param(rngs, (d, n, h), ("embed", "q_heads", "head_dim"), pd)
        self.q_norm = RMSNorm(h, cfg.rms_norm_eps, pd, rngs)
        self.k_norm = RMSNorm(h, cfg.rms_norm_eps, pd, rngs)
        self.cfg = cfg

    def __call__(self, x, positions, q_segments, q_slots, kv):
        """x: [B, T, D]; positions, q_segments, q_slots: [B, T] / [T].

        kv: None (attend within x) or (k_cache, v_cache, kv_segments, index) with caches
        [B, S, K, H]; returns (out [B, T, D], (k_cache, v_cache) or None).
        """
        cfg, dt = self.cfg, self.cfg.dtype
        b, t, d = x.shape
        rows = x.reshape(b * t, d)  # [M, D]
        q = project("MD,NHD->MNH", rows, self.q_proj[...].astype(dt)).reshape(b, t, -1, cfg.head_dim)
        k = project("MD,KHD->MKH", rows, self.k_proj[...].astype(dt)).reshape(b, t, -1, cfg.head_dim)
        v = project("MD,KHD->MKH", rows, self.v_proj[...].astype(dt)).reshape(b, t, -1, cfg.head_dim)
        q = rope(self.q_norm(q), positions, cfg.rope_theta)
        k = rope(self.k_norm(k), positions, cfg.rope_theta)
        if kv is None:
            k_all, v_all, kv_segments, kv_slots, new_kv = k, v, q_segments, q_slots, None
        else:
            k_cache, v_cache, kv_segments, index = kv
            k_all = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
            v_all = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
            kv_slots = jnp.arange(k_all.shape[1], dtype=jnp.int32)
            new_kv = (k_all, v_all)
        n, h = q.shape[2:]
        q = q.reshape(b, t, cfg.num_key_value_heads, cfg.num_groups, h)  # [B, T, K, G, H]
        q_slots = jnp.broadcast_to(q_slots, (b, t))
        # The platform's kernel over whole rows (train steps, log-probs); the XLA path for cache
        # prefills and decoding, blockwise above attention_block tokens (models/kernels.py).
        out = kernels.attention(q, k_all.astype(dt), v_all.astype(dt), q_segments, kv_segments, q_slots, kv_slots,
                                kind=cfg.attention, block=flash_block(t, cfg.attention_block), full_row=kv is None)
        out = out.reshape(b * t, n, h)  # [M, N, H]
        return project("MNH,DNH->MD", out, self.o_proj[...].astype(dt)).reshape(b, t, d), new_kv


class MLP(nnx.Module):
    def __init__(self, cfg: Qwen3Config, rngs: nnx.Rngs):
        d, f, pd = cfg.hidden_size, cfg.intermediate_size, cfg.param_dtype
        self.gate_proj = _param(rngs, (f, d), ("mlp", "embed"), pd)
        self.up_proj = _param(rngs, (f, d), ("mlp", "embed"), pd)
        self.down_proj = _param(rngs, (d, f), ("embed", "mlp"), pd)
        self.dtype = cfg.dtype

    def __call__(self, x):
        dt = self.dtype
        b, t, d = x.shape
        rows = x.reshape(b * t, d)  # [M, D]
        gate = project("MD,FD->MF", rows, self.gate_proj[...].astype(dt))
        up = project("MD,FD->MF", rows, self.up_proj[...].astype(dt))
        h = constrain(jax.nn.silu(gate) * up, ("batch", "mlp"))
        return project("MF,DF->MD", h, self.down_proj[...].astype(dt)).reshape(b, t, d)


class Block(nnx.Module):
    def __init__(self, cfg: Qwen3Config, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype, rngs)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, q_segments, q_slots, kv):
        attn, new_kv = self.self_attn(self.input_layernorm(x), positions, q_segments, q_slots, kv)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "seq", "embed")), new_kv


class Qwen3(nnx.Module):
    """Qwen3 causal LM. `model(tokens)` returns logits [B, T, V] (fp32)."""

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = _param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"),
                                   config.param_dtype)
        self.layers = nnx.List([Block(config, rngs) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.param_dtype, rngs)
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"),
                                  config.param_dtype)

    def hidden(self, tokens, positions=None, segment_ids=None, cache: KVCache | None = None):
        """Final-normed hidden states [B, T, D] (and the updated cache when one is given).

        Args:
          tokens: int32 [B, T].
          positions: int32 [B, T]; default: positions inside each segment (no cache) or
            consecutive from the cache index.
          segment_ids: int32 [B, T]; tokens attend only within their segment; 0 is padding.
          cache: KVCache to read and extend; the tokens are written at `cache.index`.
        """
        cfg = self.config
        b, t = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if cache is None:
            q_slots = jnp.arange(t, dtype=jnp.int32)
            if positions is None:
                positions = positions_from_segments(segment_ids)
        else:
            q_slots = cache.index + jnp.arange(t, dtype=jnp.int32)
            if positions is None:
                positions = jnp.broadcast_to(q_slots, (b, t))
            kv_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32),
                                                       (0, cache.index))
        x = self.embed_tokens[...].astype(cfg.dtype)[tokens]
        x = constrain(x, ("batch", "seq", "embed"))

        def run_block(block, x, kv):
            return block(x, positions, segment_ids, q_slots, kv)

        if cfg.remat and cache is None:  # decoding (a cache) has no backward pass to save memory for
            run_block = nnx.remat(run_block, policy=kernels.REMAT_POLICY)  # all but the attention kernel's outputs
        new_k, new_v = [], []
        for i, block in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i], kv_segments, cache.index)
            x, layer_kv = run_block(block, x, kv)
            if layer_kv is not None:
                new_k.append(layer_kv[0])
                new_v.append(layer_kv[1])
        x = self.norm(x)
        if cache is None:
            return x
        return x, KVCache(k=tuple(new_k), v=tuple(new_v), segment_ids=kv_segments, index=cache.index + t)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Hidden states [..., D] -> fp32 logits [..., V]."""
        w = (self.embed_tokens if self.config.tie_word_embeddings else self.lm_head)[...]  # [V, D]
        return jnp.einsum("...D,VD->...V", hidden, w.astype(self.config.dtype), preferred_element_type=jnp.float32)

    def __call__(self, tokens, positions=None, segment_ids=None, cache: KVCache | None = None):
        """Logits [B, T, V]; with a cache, `(logits, new_cache)`."""
        out = self.hidden(tokens, positions, segment_ids, cache)
        if cache is None:
            return self.logits(out)
        hidden, cache = out
        return self.logits(hidden), cache
