"""The JAX-native batched sampler: prefill, then a jitted decode loop over a preallocated KV cache.

Prompts of different lengths are left-padded to a shared length (padding is segment 0, so no real
token attends to it), the cache is filled by one prefill pass, and a `lax.while_loop` decodes one
token per step for the whole batch until every row has hit a stop id or the token limit. The loop
runs `decode_chunk` steps per program call (the carry, KV cache included, is donated from call to
call); between calls every process learns whether any was asked to stop (qedjax/preempt.py), so a
preempted generation ends within one call. On several processes every process calls the sampler with
the same prompts; each places its own devices' rows and all read back every row. Each row
samples from its own random stream (seed, row), so a prompt draws the same tokens alone or in any
batch. Shapes are bucketed (batch to a power of two; prompt and generation lengths to powers of
two, then multiples of 1024), so a run with mixed lengths compiles a bounded number of programs.

Logprobs are those of the sampled tokens under the distribution they were drawn from:
softmax(logits / temperature), restricted to the top-k / top-p set and renormalised when either is
on (as vLLM reports them); with temperature 0, those of the untempered distribution.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qedjax import preempt
from qedjax.checkpoint import fault_point
from qedjax.models.qwen3 import KVCache, Qwen3
from qedjax.rollout.engine import FINISH_LENGTH, FINISH_STOP
from qedjax.sharding import ROLLOUT_RULES, activation_sharding, logical_to_spec, state_shardings

MAX_STOP_IDS = 8
# Decode steps per program call. Between calls every process learns whether any was asked to stop
# (qedjax/preempt.py), so a preempted generation stops within one chunk; each call costs a host sync.
DECODE_CHUNK = 64


@dataclasses.dataclass(frozen=True)
class SampleResult:
    tokens: list[int]  # new tokens, the stop token included when there was one
    logprobs: list[float]
    finish_reason: str  # FINISH_STOP | FINISH_LENGTH


def bucket(n: int, minimum: int = 16, step: int = 1024) -> int:
    """The padded size for n: a power of two up to `step`, then a multiple of `step`."""
    n = max(n, minimum)
    if n <= step:
        return 1 << (n - 1).bit_length()
    return -(-n // step) * step


def _filter_logits(logits, top_k, top_p, use_top_k: bool, use_top_p: bool):
    """Masks logits outside the top-k / nucleus sets (rows [B, V]; k and p per row)."""
    if not (use_top_k or use_top_p):
        return logits
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.arange(logits.shape[-1])[None, :]
    keep = jnp.ones_like(sorted_logits, dtype=bool)
    if use_top_k:
        keep &= (top_k[:, None] <= 0) | (rank < top_k[:, None])
    if use_top_p:
        probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above this token
        keep &= before < top_p[:, None]
    masked = jnp.where(keep, sorted_logits, -jnp.inf)
    return jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(masked)


DRAW_CHUNK = 512  # vocabulary entries per chunk of the two-level draw


def _first_above(weights, u):
    """Per row, the first index whose cumulative weight exceeds u * total: index i with probability
    weights[i] / total. A zero weight is never chosen (the clamp covers u * total rounding up)."""
    cdf = jnp.cumsum(weights, axis=-1)
    count = jnp.sum(cdf <= (u * cdf[:, -1])[:, None], axis=-1)
    last = weights.shape[-1] - 1 - jnp.argmax(weights[:, ::-1] > 0, axis=-1)
    return jnp.minimum(count, last)


def draw_tokens(keys, logits):
    """One token per row from softmax(logits) [B, V] (-inf entries are never drawn); keys [B].

    A two-level inverse CDF: a chunk of DRAW_CHUNK entries by the chunks' masses, then an entry by its
    probability within the chunk. It takes two uniforms per row, where jax.random.categorical
    (Gumbel-max) takes a random number and two logarithms per vocabulary entry: on a CPU that was
    most of a decode step at Qwen3's 152k vocabulary. The fp32 cumulative sums run over at most
    V / DRAW_CHUNK and DRAW_CHUNK terms, so rounding moves about 1e-5 of the probability mass at
    most (one cumulative sum over all 152k entries could move about 1e-2).
    """
    b, v = logits.shape
    c = min(DRAW_CHUNK, v)
    n = -(-v // c)
    probs = jax.nn.softmax(jnp.pad(logits, ((0, 0), (0, n * c - v)), constant_values=-jnp.inf), axis=-1)
    probs = probs.reshape(b, n, c)
    u = jax.vmap(lambda key: jax.random.uniform(key, (2,)))(keys)
    chunk = _first_above(probs.sum(axis=-1), u[:, 0])
    within = jnp.take_along_axis(probs, chunk[:, None, None], axis=1)[:, 0]
    return (chunk * c + _first_above(within, u[:, 1])).astype(jnp.int32)


def _sample(logits, keys, temperature, top_k, top_p, use_top_k, use_top_p):
    """One token per row and its logprob. logits [B, V] fp32; keys [B] PRNG keys.

    The logprob is that of the distribution the token was drawn from: softmax(logits / temperature)
    restricted to the top-k / nucleus set and renormalised (what vLLM reports), so GRPO's ratio has
    the true behaviour probability when truncation is on. Greedy rows report the untempered,
    untruncated distribution. The draw (and the filter, a sort) is skipped when every row is greedy.
    """
    greedy = temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    logp_all = jax.nn.log_softmax(scaled, axis=-1)
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def pick(logp, token):
        return jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]

    def draw():
        filtered = _filter_logits(scaled, top_k, top_p, use_top_k, use_top_p)
        token = jnp.where(greedy, argmax, draw_tokens(keys, filtered)).astype(jnp.int32)
        logp = pick(logp_all, token)
        if use_top_k or use_top_p:
            logp = jnp.where(greedy, logp, pick(jax.nn.log_softmax(filtered, axis=-1), token))
        return token, logp

    return jax.lax.cond(jnp.all(greedy), lambda: (argmax, pick(logp_all, argmax)), draw)


def _prefill(model, config, mesh, rules, pad_id, tokens, positions, segments, controls, keys, max_new,
             use_top_k, use_top_p):
    """Fills the cache with the prompts and samples the first token: the decode loop's carry."""
    b, p = tokens.shape
    cache = KVCache.init(config, b, p + max_new)
    if mesh is not None:
        spec = logical_to_spec(("batch", None, "act_heads", None), rules)
        kv = NamedSharding(mesh, spec)
        cache = dataclasses.replace(
            cache, k=tuple(jax.lax.with_sharding_constraint(x, kv) for x in cache.k),
            v=tuple(jax.lax.with_sharding_constraint(x, kv) for x in cache.v))
    hidden, cache = model.hidden(tokens, positions, segments, cache)
    logits = model.logits(hidden[:, -1])
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, 0)
    token, logp = _sample(logits, step_keys, controls["temperature"], controls["top_k"], controls["top_p"],
                          use_top_k, use_top_p)
    out_tokens = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(token)
    out_logp = jnp.zeros((b, max_new), jnp.float32).at[:, 0].set(logp)
    done = jnp.any(token[:, None] == controls["stop_ids"][None, :], axis=-1) | (controls["limit"] <= 1)
    length = jnp.ones((b,), jnp.int32)
    return (jnp.int32(1), cache, token, out_tokens, out_logp, done, length, positions[:, -1] + 1)


def _decode(model, pad_id, carry, controls, keys, end, use_top_k, use_top_p):
    """Decodes one token per step for every row until step `end`, the token limit or every row done."""
    temperature, top_k, top_p, stop_ids, limit = (controls["temperature"], controls["top_k"], controls["top_p"],
                                                  controls["stop_ids"], controls["limit"])
    b, max_new = carry[3].shape
    end = jnp.minimum(end, max_new)

    def cond(carry):
        i, _, _, _, _, done, _, _ = carry
        return (i < end) & ~jnp.all(done)

    def body(carry):
        i, cache, token, out_tokens, out_logp, done, length, pos = carry
        hidden, cache = model.hidden(token[:, None], pos[:, None], jnp.ones((b, 1), jnp.int32), cache)
        logits = model.logits(hidden[:, 0])
        keys_i = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i)
        new, logp = _sample(logits, keys_i, temperature, top_k, top_p, use_top_k, use_top_p)
        new = jnp.where(done, pad_id, new)
        out_tokens = out_tokens.at[:, i].set(new)
        out_logp = out_logp.at[:, i].set(jnp.where(done, 0.0, logp))
        length = length + (~done).astype(jnp.int32)
        done = done | jnp.any(new[:, None] == stop_ids[None, :], axis=-1) | (length >= limit)
        return i + 1, cache, new, out_tokens, out_logp, done, length, pos + 1

    return jax.lax.while_loop(cond, body, carry)


def make_generate(config, graphdef, mesh: Mesh | None, rules, pad_id: int):
    """The jitted prefill + decode program in one piece:
    `(params, tokens, positions, segments, controls, keys, max_new, use_top_k, use_top_p)
    -> (tokens [B, max_new], logprobs [B, max_new], lengths [B])`, the last three arguments static.
    The sampler runs the same computation as a prefill program and decode programs of `decode_chunk`
    steps (make_programs); this whole form is what qedjax.fit compiles for its memory.
    """
    def generate(params, tokens, positions, segments, controls, keys, max_new: int, use_top_k: bool,
                 use_top_p: bool):
        """tokens/positions/segments [B, P]; controls: temperature, top_k, top_p, stop ids, limits."""
        model = nnx.merge(graphdef, params)
        with activation_sharding(mesh, rules) if mesh is not None else _null():
            carry = _prefill(model, config, mesh, rules, pad_id, tokens, positions, segments, controls, keys,
                             max_new, use_top_k, use_top_p)
            carry = _decode(model, pad_id, carry, controls, keys, max_new, use_top_k, use_top_p)
        _, _, _, out_tokens, out_logp, _, length, _ = carry
        return out_tokens, out_logp, length

    return jax.jit(generate, static_argnums=(6, 7, 8))


def make_programs(config, graphdef, mesh: Mesh | None, rules, pad_id: int):
    """(prefill, decode, gather): the sampler's programs.

    prefill(params, tokens, positions, segments, controls, key_data, max_new, use_top_k, use_top_p)
      -> (carry, keys): the cache filled and the first token drawn;
    decode(params, carry, controls, keys, steps, stop_flags, use_top_k, use_top_p)
      -> (carry, finished, stop): up to `steps` more tokens (the carry, its cache included, is donated);
      `finished` when every row is done, `stop` the OR of `stop_flags` (preempt.device_flags);
    gather(tokens, logprobs, lengths) -> the same, replicated on every device (every process reads them).
    """
    def ctx():
        return activation_sharding(mesh, rules) if mesh is not None else _null()

    def prefill(params, tokens, positions, segments, controls, key_data, max_new: int, use_top_k: bool,
                use_top_p: bool):
        keys = jax.random.wrap_key_data(key_data)
        with ctx():
            carry = _prefill(nnx.merge(graphdef, params), config, mesh, rules, pad_id, tokens, positions, segments,
                             controls, keys, max_new, use_top_k, use_top_p)
        return carry, keys

    def decode(params, carry, controls, keys, steps, stop_flags, use_top_k: bool, use_top_p: bool):
        with ctx():
            carry = _decode(nnx.merge(graphdef, params), pad_id, carry, controls, keys, carry[0] + steps,
                            use_top_k, use_top_p)
        i, _, _, out_tokens, _, done, _, _ = carry
        finished, stop = jnp.all(done) | (i >= out_tokens.shape[1]), jnp.any(stop_flags > 0)
        if mesh is not None:  # scalars every process reads
            finished, stop = (jax.lax.with_sharding_constraint(x, replicated) for x in (finished, stop))
        return carry, finished, stop

    replicated = None if mesh is None else NamedSharding(mesh, P())
    return (jax.jit(prefill, static_argnums=(6, 7, 8)),
            jax.jit(decode, static_argnums=(6, 7), donate_argnums=(1,)),
            jax.jit(lambda *xs: xs, out_shardings=replicated))


def padded_shape(n: int, longest_prompt: int, max_new_tokens: int, mesh: Mesh | None, rules) -> tuple[int, int, int]:
    """(batch, prompt, generation) sizes of the program that generates n prompts: each bucketed, and the
    batch rounded up to a multiple of the batch shards."""
    b = bucket(n, minimum=1)
    if mesh is not None:  # the batch must divide over the batch shards
        shards = int(np.prod([mesh.shape[a] for a in _axes(rules["batch"])]))
        b = -(-b // shards) * shards
    return b, bucket(longest_prompt), bucket(max_new_tokens)


def input_shapes(b: int, p: int, mesh: Mesh | None, rules) -> tuple:
    """ShapeDtypeStructs of (tokens, positions, segments, controls, keys) for make_generate's program."""
    def row(ndim):
        if mesh is None:
            return None
        return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))

    rep = None if mesh is None else NamedSharding(mesh, P())
    ints = [jax.ShapeDtypeStruct((b, p), jnp.int32, sharding=row(2)) for _ in range(3)]
    controls = {"temperature": jax.ShapeDtypeStruct((b,), jnp.float32, sharding=rep),
                "top_k": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=rep),
                "top_p": jax.ShapeDtypeStruct((b,), jnp.float32, sharding=rep),
                "stop_ids": jax.ShapeDtypeStruct((MAX_STOP_IDS,), jnp.int32, sharding=rep),
                "limit": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=rep)}
    key = jax.eval_shape(lambda: jax.random.key(0))
    keys = jax.ShapeDtypeStruct((b,), key.dtype, sharding=row(1))
    return (*ints, controls, keys)


def engine_dtype(param_dtype, ndim: int, compute_dtype):
    """The dtype a sampler keeps a parameter in: weight matrices (ndim >= 2) in the compute dtype when it
    is narrower, since the model casts every matrix to the compute dtype where it uses it (the same
    rounding, done once: a bf16-compute model with fp32 master weights decodes exactly as before, from
    half the memory); norm scales, used as they are, keep their dtype."""
    param_dtype, compute_dtype = jnp.dtype(param_dtype), jnp.dtype(compute_dtype)
    if ndim >= 2 and jnp.issubdtype(param_dtype, jnp.floating) and compute_dtype.itemsize < param_dtype.itemsize:
        return compute_dtype
    return param_dtype


class Sampler:
    """Generates from a Qwen3 model. See the module docstring.

    Args:
      model: a Qwen3 module (its parameters are used as they are; call `update` for new ones).
      mesh: optional mesh; parameters and the cache are then laid out by the rollout rules.
      max_batch: requests beyond this are generated in several passes.
    """

    def __init__(self, model: Qwen3, *, mesh: Mesh | None = None, rules=ROLLOUT_RULES, max_batch: int = 256,
                 pad_id: int = 0, decode_chunk: int = DECODE_CHUNK):
        self.config = model.config
        self.decode_chunk = decode_chunk
        self.graphdef, state = nnx.split(model)
        self.mesh, self.rules = mesh, rules
        self.max_batch = max_batch
        self.pad_id = pad_id
        self._param_shardings = None
        if mesh is not None:
            self._param_shardings = state_shardings(state, mesh, rules)
        self.params = None
        self.update(nnx.to_pure_dict(state))
        self.compiled_shapes: set[tuple[int, int, int]] = set()
        self._prefill, self._decode, self._gather = make_programs(self.config, self.graphdef, mesh, rules, pad_id)

    def update(self, params) -> None:
        """New parameter values (a pure dict as from nnx.to_pure_dict, any layout). They are copied
        (a trainer may donate its buffers to the next step while this sampler still uses them), the
        weight matrices in the compute dtype (`engine_dtype`)."""
        compute = jnp.dtype(self.config.dtype)

        def engine_copy(a):
            dtype = engine_dtype(a.dtype, a.ndim, compute)
            return a.astype(dtype) if dtype != a.dtype else jnp.copy(a)

        params = jax.tree.map(engine_copy, params)
        if self._param_shardings is not None:
            params = jax.device_put(params, self._param_shardings)
        self.params = params

    def _row_sharding(self, ndim: int):
        if self.mesh is None:
            return None
        return NamedSharding(self.mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), self.rules))

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, stop_ids: Sequence[int] = (),
                 seed: int | Sequence[int] = 0, params=None) -> list[SampleResult]:
        """Samples a continuation of every prompt.

        Args:
          prompts: token-id lists (any lengths, none empty).
          max_new_tokens: the most tokens generated per prompt.
          temperature: 0 is greedy.
          top_p, top_k: nucleus / top-k truncation (1.0 / 0 disable them).
          stop_ids: tokens that end a row (kept as its last token).
          seed: one seed (row i then uses the stream (seed, i)) or one seed per prompt.
          params: parameters to use instead of the current ones (a snapshot, for concurrent updates).
        Returns:
          One SampleResult per prompt.
        """
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if len(stop_ids) > MAX_STOP_IDS:
            raise ValueError(f"at most {MAX_STOP_IDS} stop ids")
        seeds = [seed] * len(prompts) if isinstance(seed, int) else list(seed)
        rows = [jax.random.fold_in(jax.random.key(s), i) if isinstance(seed, int) else jax.random.key(s)
                for i, s in enumerate(seeds)]
        params = self.params if params is None else params
        results: list[SampleResult] = []
        for start in range(0, len(prompts), self.max_batch):
            chunk = list(range(start, min(start + self.max_batch, len(prompts))))
            results += self._generate_chunk(params, [prompts[i] for i in chunk], [rows[i] for i in chunk],
                                            max_new_tokens, temperature, top_p, top_k, stop_ids)
        return results

    def _global(self, x: np.ndarray, sharding):
        """A host array every process holds whole -> a global array (each process places its devices' part)."""
        if sharding is None:
            return x
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    def _generate_chunk(self, params, prompts, keys, max_new_tokens, temperature, top_p, top_k, stop_ids):
        """Every process of a multi-process run calls this with the same prompts (one SPMD program over
        the mesh); each places its own devices' rows, and all read back every row."""
        n = len(prompts)
        b, p, new = padded_shape(n, max(len(x) for x in prompts), max_new_tokens, self.mesh, self.rules)
        tokens = np.full((b, p), self.pad_id, np.int32)
        segments = np.zeros((b, p), np.int32)
        positions = np.zeros((b, p), np.int32)
        for r, prompt in enumerate(prompts + [prompts[0]] * (b - n)):  # filler rows repeat a prompt
            tokens[r, p - len(prompt):] = prompt
            segments[r, p - len(prompt):] = 1
            positions[r, p - len(prompt):] = np.arange(len(prompt))
        stops = np.full((MAX_STOP_IDS,), -1, np.int32)
        stops[: len(stop_ids)] = stop_ids
        controls = {"temperature": np.full((b,), temperature, np.float32), "top_k": np.full((b,), top_k, np.int32),
                    "top_p": np.full((b,), top_p, np.float32), "stop_ids": stops,
                    "limit": np.full((b,), max_new_tokens, np.int32)}
        key_data = np.asarray(jax.random.key_data(jnp.stack(list(keys) + [keys[0]] * (b - n))))
        rep = None if self.mesh is None else NamedSharding(self.mesh, P())
        tokens, positions, segments = (self._global(x, self._row_sharding(2)) for x in (tokens, positions, segments))
        key_data = self._global(key_data, self._row_sharding(2))
        controls = {k: self._global(v, rep) for k, v in controls.items()}
        self.compiled_shapes.add((b, p, new))
        flags = (lambda: preempt.device_flags(self.mesh)) if self.mesh is not None else (
            lambda: np.full((1,), int(preempt.requested()), np.int32))
        use_top_k, use_top_p = top_k > 0, top_p < 1.0
        carry, rows = self._prefill(params, tokens, positions, segments, controls, key_data, new, use_top_k, use_top_p)
        steps = np.int32(self.decode_chunk)
        while True:  # decode in chunks; between them every process learns whether any was asked to stop
            global _chunks
            _chunks += 1
            fault_point(f"generate:chunk:{_chunks}")
            carry, finished, stop = self._decode(params, carry, controls, rows, steps, flags(), use_top_k, use_top_p)
            if bool(stop):
                raise preempt.Preempted(f"stopped generating after {int(carry[0])} of {new} tokens{preempt.since()}")
            if bool(finished):
                break
        out_tokens, out_logp, length = jax.device_get(self._gather(carry[3], carry[4], carry[6]))
        stop_set = set(int(s) for s in stop_ids)
        results = []
        for r in range(n):
            k = int(length[r])
            toks = out_tokens[r, :k].tolist()
            reason = FINISH_STOP if toks and toks[-1] in stop_set else FINISH_LENGTH
            results.append(SampleResult(toks, out_logp[r, :k].astype(float).tolist(), reason))
        return results


_chunks = 0  # decode chunks run by this process (fault points `generate:chunk:K` count them)


def _axes(axes):
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
