"""The optimizer: AdamW with warmup + cosine or constant schedules, global-norm clipping, and a
weight-decay mask (no decay on norm scales and embeddings unless configured).

`make_optimizer` returns optax's chain (its `init` and `update`, and so its state and checkpoints)
plus `apply`, the same step written per parameter with the skip of a non-finite step folded in. The
train step calls `apply` on CPU meshes (elsewhere optax's `update`: compiled for a TPU, `apply` moved
8% more bytes, docs/BENCHMARKS.md). With optax's `update`, XLA fuses the moment update into both the new
moment and the parameter update, so the parameter update reads the old moments after the new ones
have overwritten them in the donated buffers, and XLA copies all of Adam's state first; on CPU
these copies and the extra passes over the state cost about a tenth of a small step (issue 22).
`apply` in JAX still reads the moments twice (its moment and parameter updates are two fusions);
on a one-device CPU mesh the train step passes it `models.cpu_adamw.update`, which does the whole
update in one pass in place (`train.default_adamw_kernel`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5
    schedule: str = "cosine"  # cosine | constant (both after a linear warmup)
    warmup_ratio: float = 0.1  # fraction of the total steps spent warming up
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    decay_norms_and_embeddings: bool = False
    clip_norm: float | None = 1.0  # global-norm clipping; None disables it
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")


def learning_rate(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = int(round(cfg.warmup_ratio * total_steps))
    if cfg.schedule == "constant":
        if not warmup:
            return optax.constant_schedule(cfg.lr)
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup),
                                     optax.constant_schedule(cfg.lr)], [warmup])
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else cfg.lr, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def decay_mask(params, decay_norms_and_embeddings: bool = False):
    """True where weight decay applies: matrices, except the embedding table."""
    def keep(path, x):
        names = {str(getattr(k, "key", k)) for k in path}
        if decay_norms_and_embeddings:
            return True
        return x.ndim >= 2 and "embed_tokens" not in names

    return jax.tree_util.tree_map_with_path(keep, params)


class Optimizer(NamedTuple):
    """An optax GradientTransformation (`init`, `update`) and `apply`, its fused step.

    apply(grads, opt_state, params, ok, kernel=None) -> (params, opt_state): one step of `update`
    and `optax.apply_updates`, or, where the scalar `ok` is False, the params and state unchanged.
    Where `kernel` is given (`models.cpu_adamw.update`'s signature; the caller says where it can
    run) and every leaf is fp32, the update of all leaves is that one pass; otherwise JAX's.
    """

    init: Callable
    update: Callable
    apply: Callable


def make_optimizer(cfg: OptimConfig, total_steps: int) -> Optimizer:
    """AdamW (decoupled weight decay) after optional global-norm clipping."""
    lr = learning_rate(cfg, total_steps)
    adamw = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=lambda p: decay_mask(p, cfg.decay_norms_and_embeddings))
    chain = adamw if cfg.clip_norm is None else optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)

    def apply(grads, opt_state, params, ok, kernel=None):
        # The operations of optax's clip_by_global_norm, scale_by_adam, add_decayed_weights,
        # scale_by_learning_rate and apply_updates, in their order. One difference: clipping scales
        # each gradient by the scalar clip_norm / norm (as torch's clip_grad_norm_ does), where optax
        # divides every element by the norm and then multiplies: equal up to rounding, and XLA does
        # not repeat a division in each consumer, so optax's form writes the clipped gradients out
        # and reads them back (an extra pass over them; 115 -> 92 ms per update for bench-100m).
        clip_state, (adam, masked, sched) = (None, opt_state) if cfg.clip_norm is None else opt_state
        flat = [jax.tree.leaves(t) for t in (params, grads, adam.mu, adam.nu)]
        fused = kernel is not None and all(x.dtype == jnp.float32 for xs in flat for x in xs)
        scale = jnp.ones((), jnp.float32)
        if cfg.clip_norm is not None:
            g_norm = optax.tree.norm(grads)
            scale = jnp.where(g_norm < cfg.clip_norm, 1.0, cfg.clip_norm / g_norm)
            if not fused:  # the kernel scales each gradient as it reads it
                grads = jax.tree.map(lambda t: t * scale.astype(t.dtype), grads)
        count = optax.safe_int32_increment(adam.count)
        bc1, bc2 = 1 - cfg.b1**count, 1 - cfg.b2**count
        step_size = -lr(sched.count)
        decay = decay_mask(params, cfg.decay_norms_and_embeddings)
        tick = lambda c: jnp.where(ok, optax.safe_int32_increment(c), c)  # noqa: E731
        inner = lambda mu, nu: (adam._replace(count=tick(adam.count), mu=mu, nu=nu), masked,  # noqa: E731
                                sched._replace(count=tick(sched.count)))
        if fused:
            scalars = jnp.stack([jnp.asarray(x, jnp.float32) for x in (ok, scale, bc1, bc2, step_size)])
            new = [list(flat[0]), list(flat[2]), list(flat[3])]
            decayed = [bool(f) and bool(cfg.weight_decay) for f in jax.tree.leaves(decay)]
            for wd, group in ((cfg.weight_decay, True), (0.0, False)):  # weight decay is one per call
                idx = [i for i, d in enumerate(decayed) if d == group]
                if idx:
                    outs = kernel(scalars, *([xs[i] for i in idx] for xs in flat), b1=cfg.b1, b2=cfg.b2,
                                  eps=cfg.eps, weight_decay=wd)
                    for dst, out in zip(new, outs):
                        for i, x in zip(idx, out):
                            dst[i] = x
            p, mu, nu = (jax.tree.unflatten(jax.tree.structure(params), xs) for xs in new)
            state = inner(mu, nu)
            return p, state if cfg.clip_norm is None else (clip_state, state)

        def leaf(p, g, mu, nu, decayed):
            mu_new = jnp.where(ok, (1 - cfg.b1) * g + cfg.b1 * mu, mu)
            nu_new = jnp.where(ok, (1 - cfg.b2) * (g**2) + cfg.b2 * nu, nu)
            # The barrier keeps XLA from recomputing the moments inside the parameter update (which
            # would read the old moments after they were overwritten in place).
            mu_new, nu_new = jax.lax.optimization_barrier((mu_new, nu_new))
            u = (mu_new / bc1.astype(mu.dtype)) / (jnp.sqrt(nu_new / bc2.astype(nu.dtype)) + cfg.eps)
            if decayed and cfg.weight_decay:
                u = u + cfg.weight_decay * p
            u = jnp.array(step_size, dtype=u.dtype) * u
            return jnp.where(ok, jnp.asarray(p + u).astype(p.dtype), p), mu_new, nu_new

        out = jax.tree.map(leaf, params, grads, adam.mu, adam.nu, decay)
        pick = lambda i: jax.tree.map(lambda _, o: o[i], params, out)  # noqa: E731
        state = inner(pick(1), pick(2))
        return pick(0), state if cfg.clip_norm is None else (clip_state, state)

    return Optimizer(chain.init, chain.update, apply)
