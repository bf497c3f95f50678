"""The train state and the one train step shape shared by SFT and GRPO.

A train state is a pure pytree `{"params", "opt_state", "step"}`; the step is a pure function
`(state, batch) -> (state, metrics)` jitted once with explicit shardings and the state donated.
Only the loss differs between stages. A loss function sees one micro-batch and returns an
*unnormalised* sum plus metric sums; the step adds micro-batches up (a `lax.scan` inside the jitted
step) and divides by the stage's normaliser of the whole global batch, so 4 micro-batches of 2 give
the gradient of one batch of 8. A non-finite loss or gradient leaves the state untouched and is
reported as `skipped`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qedjax.models import kernels
from qedjax.sharding import activation_sharding, logical_to_spec

Batch = Mapping[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch], tuple[jax.Array, dict[str, jax.Array]]]


@jax.custom_vjp
def logp_and_entropy(logits: jax.Array, targets: jax.Array):
    """fp32 logits [M, V], int targets [M] -> (log-probability of each target [M], entropy [M]).

    One exponential over [M, V] in each direction: the forward shares it between the log-sum-exp
    and the entropy, and the backward pass is written out (autodiff of logsumexp + softmax takes two
    in the forward and more in the backward). With p = softmax(z):
    d logp / dz = onehot(y) - p, d entropy / dz = -p (z - E_p[z]).
    """
    return _logp_entropy_fwd(logits, targets)[0]


def _logp_entropy_fwd(logits, targets):
    top = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
    e = jnp.exp(logits - top)
    total = e.sum(axis=-1)
    lse = top[:, 0] + jnp.log(total)
    mean = jnp.sum(e * logits, axis=-1) / total  # E_p[z]
    target = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return (target - lse, lse - mean), (logits, targets, lse, mean)


def _logp_entropy_bwd(res, cotangents):
    logits, targets, lse, mean = res
    g_logp, g_ent = (c[:, None] for c in cotangents)
    p = jnp.exp(logits - lse[:, None])
    hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == targets[:, None]
    return jnp.where(hit, g_logp, 0.0) - p * (g_logp + g_ent * (logits - mean[:, None])), None


logp_and_entropy.defvjp(_logp_entropy_fwd, _logp_entropy_bwd)


# fp32 logits up to this size (all rows of the batch, 1 GiB) stay alive between the forward and the
# backward pass; larger ones are recomputed chunk by chunk. Saving them skips one of the vocabulary
# projection's four products; the recipe's 4B rows (50k tokens x 151,936) are 30 GB.
SAVE_LOGITS_BYTES = 1 << 30


def token_logprobs(model, tokens, targets, *, positions=None, segment_ids=None, temperature: float = 1.0,
                   chunk: int = 1024, save_logits_bytes: int = SAVE_LOGITS_BYTES, with_entropy: bool = True):
    """Log-probability of each target token and the entropy of each predictive distribution.

    Logits are divided by `temperature` first, so the result describes the distribution a sampler
    at that temperature draws from. Above `save_logits_bytes` of [B, T, V] fp32 logits, the
    vocabulary projection runs in sequence chunks of `chunk` under rematerialisation, so that the
    logits never exist at once (V = 151,936 for Qwen3); below it, in one piece, kept for the
    backward pass. Returns (logp [B, T], entropy [B, T]) in fp32; the entropy is zeros when
    `with_entropy` is False (the SFT loss, which differentiates the log-probs alone).
    """
    hidden = model.hidden(tokens, positions, segment_ids)  # [B, T, D]
    b, t, d = hidden.shape

    def piece(h, y):  # h: [B, C, D], y: [B, C]
        rows = h.shape[:2]
        logits = model.logits(h.reshape(-1, d)) / temperature  # [M, V]
        if with_entropy:
            logp, entropy = logp_and_entropy(logits, y.reshape(-1))
        else:  # the written-out backward pass would compute the entropy's gradient for nothing
            logp = jnp.take_along_axis(logits, y.reshape(-1, 1), axis=-1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)
            entropy = jnp.zeros_like(logp)
        return logp.reshape(rows), entropy.reshape(rows)

    if b * t * model.config.vocab_size * 4 <= save_logits_bytes:
        return piece(hidden, targets)  # the backward pass reuses the logits instead of recomputing them
    piece = jax.checkpoint(piece)
    if t <= chunk:
        return piece(hidden, targets)
    pad = -t % chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, chunk, d).swapaxes(0, 1)
    ys = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, -1, chunk).swapaxes(0, 1)
    logp, ent = jax.lax.map(lambda hy: piece(*hy), (hidden, ys))  # [n, B, C]
    return (logp.swapaxes(0, 1).reshape(b, -1)[:, :t], ent.swapaxes(0, 1).reshape(b, -1)[:, :t])


def _opt_shardings(abstract_opt_state, param_shardings, mesh: Mesh):
    """Optimizer-state shardings: leaves that mirror a parameter (Adam's mu and nu) take its sharding."""
    by_path = {}
    for path, sh in jax.tree_util.tree_flatten_with_path(param_shardings)[0]:
        by_path[tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = sh

    def one(path, leaf):
        keys = tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
        for start in range(len(keys)):
            sh = by_path.get(keys[start:])
            if sh is not None and len(sh.spec) <= leaf.ndim:
                return sh
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def state_shardings(params, optimizer: optax.GradientTransformation, mesh: Mesh):
    """Shardings of the train state around params (arrays or ShapeDtypeStructs with shardings)."""
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    opt_sh = _opt_shardings(jax.eval_shape(optimizer.init, params), param_sh, mesh)
    return {"params": param_sh, "opt_state": opt_sh, "step": NamedSharding(mesh, P())}


def init_state(params, optimizer: optax.GradientTransformation, mesh: Mesh):
    """(state, state_shardings) around sharded params; the optimizer state is created sharded."""
    sh = state_shardings(params, optimizer, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=sh["opt_state"])(params)
    state = {"params": params, "opt_state": opt_state, "step": jax.device_put(jnp.zeros((), jnp.int32), sh["step"])}
    return state, sh


def abstract_state(state_shardings, params_abstract, optimizer) -> Any:
    """ShapeDtypeStructs (with shardings) of a train state: the restore target of a checkpoint."""
    opt_abstract = jax.eval_shape(optimizer.init, params_abstract)
    shapes = {"params": params_abstract, "opt_state": opt_abstract,
              "step": jax.ShapeDtypeStruct((), jnp.int32)}
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, state_shardings)


def micro_batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
    """Sharding of a [micro, batch, ...] array: micro-batches replicated, rows over the batch axes."""
    return NamedSharding(mesh, logical_to_spec((None, "batch") + (None,) * (ndim - 2), rules))


def process_rows(mesh: Mesh, rules, rows: int) -> slice:
    """The rows of a [micro, rows, ...] batch that this process's devices hold: a contiguous range
    (all of them when the batch axes do not span processes). Each process builds and feeds only these."""
    spans = {(i[1].start or 0, rows if i[1].stop is None else i[1].stop)
             for i in micro_batch_sharding(mesh, rules, 2).addressable_devices_indices_map((1, rows)).values()}
    start, stop = min(a for a, _ in spans), max(b for _, b in spans)
    if sum(b - a for a, b in spans) != stop - start:
        raise ValueError(f"this process's devices hold rows {sorted(spans)} of the batch, not one range: "
                         f"order the mesh's devices by process")
    return slice(start, stop)


def put_batch(local: Mapping[str, np.ndarray], mesh: Mesh, rules) -> dict[str, jax.Array]:
    """This process's rows of a [micro, batch, ...] batch -> global sharded arrays."""
    return {k: jax.make_array_from_process_local_data(micro_batch_sharding(mesh, rules, v.ndim), v)
            for k, v in local.items()}


def _identity(name: str) -> float:
    """The neutral start of a metric's combination across micro-batches."""
    return -jnp.inf if name.endswith("_max") else jnp.inf if name.endswith("_min") else 0.0


def _combine(name: str, a, b):
    if name.endswith("_max"):
        return jnp.maximum(a, b)
    if name.endswith("_min"):
        return jnp.minimum(a, b)
    return a + b


def make_train_step(graphdef, loss_fn: LossFn, normalizer: Callable[[Batch], jax.Array],
                    optimizer: optax.GradientTransformation, state_shardings, batch_shardings,
                    mesh: Mesh, rules):
    """The jitted `(state, batch) -> (state, metrics)` step.

    Args:
      loss_fn: (model, micro_batch) -> (loss_sum, metric_sums); batch arrays carry a leading
        micro-batch axis that the step scans over. Metric names ending in _max/_min combine by
        max/min across micro-batches, the others by sum.
      normalizer: batch -> the scalar that the summed loss (and gradient) is divided by.
    """

    def grads(params, micro):
        def f(p):
            return loss_fn(nnx.merge(graphdef, p), micro)

        return jax.value_and_grad(f, has_aux=True)(params)

    def step(state, batch):
        with activation_sharding(mesh, rules):
            params = state["params"]
            first = jax.tree.map(lambda x: x[0], batch)
            (_, aux_shape), _ = jax.eval_shape(grads, params, first)
            zero = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
                    {k: jnp.full(v.shape, _identity(k), v.dtype) for k, v in aux_shape.items()})

            def body(carry, micro):
                g_acc, l_acc, aux_acc = carry
                (loss_sum, aux), g = grads(params, micro)
                aux_acc = {k: _combine(k, aux_acc[k], aux[k]) for k in aux}
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + loss_sum, aux_acc), None

            n_micro = jax.tree.leaves(batch)[0].shape[0]
            if n_micro == 1:
                carry, _ = body(zero, first)
            else:
                carry, _ = jax.lax.scan(body, zero, batch)
            g_sum, loss_sum, aux = carry
            denom = jnp.maximum(normalizer(batch).astype(jnp.float32), 1e-9)
            g = jax.tree.map(lambda x: (x / denom).astype(x.dtype), g_sum)
            loss = loss_sum / denom
            grad_norm = optax.global_norm(g)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            updates, opt_state = optimizer.update(g, state["opt_state"], params)
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
            new_params = keep(optax.apply_updates(params, updates), params)
            opt_state = keep(opt_state, state["opt_state"])
            new_state = {"params": new_params, "opt_state": opt_state,
                         "step": state["step"] + finite.astype(jnp.int32)}
            metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": (~finite).astype(jnp.int32),
                       "normalizer": denom, **aux}
            return new_state, metrics

    return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))


def model_config(model_cfg):
    """The Qwen3Config a ModelConfig describes (a HF checkpoint's config.json, or a preset).

    The same on every backend: the model code a CPU test runs is the code a TPU or GPU runs.
    """
    from qedjax import convert
    from qedjax.models.qwen3 import Qwen3Config

    dtypes = dict(param_dtype=model_cfg.param_dtype, dtype=model_cfg.dtype, remat=model_cfg.remat,
                  attention_block=model_cfg.attention_block, attention=model_cfg.attention)
    if model_cfg.hf_path:
        return convert.read_config(model_cfg.hf_path, **dtypes)
    return Qwen3Config.preset(model_cfg.preset, **dtypes)


def abstract_params(model_cfg, mesh: Mesh, rules, *, layers: int | None = None):
    """(config, graphdef, params as ShapeDtypeStructs with shardings): a restore target, no memory.

    `layers` cuts the model to that many blocks (qedjax.fit extrapolates memory from shallow copies).
    """
    from qedjax import convert
    from qedjax.sharding import state_shardings

    config = model_config(model_cfg)
    kernels.check(config.attention, mesh.devices.flat[0].platform)  # model.attention=splash off a TPU: now
    if layers is not None:
        config = dataclasses.replace(config, num_hidden_layers=layers)
    graphdef, abstract = convert.abstract_model(config)
    shardings = state_shardings(abstract, mesh, rules)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nnx.to_pure_dict(abstract), shardings)
    return config, graphdef, target


def init_params(model_cfg, mesh: Mesh, rules, *, seed: int = 0, vocab_size: int | None = None):
    """(config, graphdef, params) from a Hugging Face checkpoint or a preset, created in their shards.

    Args:
      model_cfg: qedjax.config.ModelConfig.
      vocab_size: the tokenizer's size; an error if the model's vocabulary is smaller.
    """
    from qedjax import convert
    from qedjax.models.qwen3 import Qwen3
    from qedjax.sharding import init_sharded, state_shardings

    config = model_config(model_cfg)
    kernels.check(config.attention, mesh.devices.flat[0].platform)  # before the init compiles
    if model_cfg.hf_path:
        _, abstract = convert.abstract_model(config)
        config, graphdef, params = convert.load_params(
            model_cfg.hf_path, dtype=model_cfg.param_dtype, compute_dtype=model_cfg.dtype, config=config,
            shardings=state_shardings(abstract, mesh, rules))
    else:
        graphdef, params = init_sharded(lambda: Qwen3(config, rngs=nnx.Rngs(seed)), mesh, rules)
    if vocab_size is not None and vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size} tokens but the model's vocabulary is "
                         f"{config.vocab_size}")
    return config, graphdef, params
