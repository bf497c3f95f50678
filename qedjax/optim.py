"""The optimizer: AdamW with warmup + cosine or constant schedules, global-norm clipping, and a
weight-decay mask (no decay on norm scales and embeddings unless configured).

`make_optimizer` returns optax's chain; the train step runs its `update` and `optax.apply_updates`
on every backend.
"""

from __future__ import annotations

import dataclasses

import jax
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


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay) after optional global-norm clipping."""
    adamw = optax.adamw(learning_rate(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=lambda p: decay_mask(p, cfg.decay_norms_and_embeddings))
    return adamw if cfg.clip_norm is None else optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
