"""The optimizer: warmup + cosine / constant schedules, the weight-decay mask, clipping, against
hand-computed AdamW."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qedjax.optim import OptimConfig, decay_mask, learning_rate, make_optimizer


def test_schedules():
    """Linear warmup over warmup_ratio of the steps, then constant or cosine down to min_lr_ratio."""
    cos = learning_rate(OptimConfig(lr=1.0, warmup_ratio=0.2, min_lr_ratio=0.1), 10)
    np.testing.assert_allclose([float(cos(s)) for s in (0, 1, 2)], [0.0, 0.5, 1.0], atol=1e-7)
    # cosine from step 2 (peak) to step 10 (lr x min_lr_ratio): halfway at step 6
    np.testing.assert_allclose(float(cos(6)), 0.1 + 0.9 * 0.5, atol=1e-6)
    np.testing.assert_allclose(float(cos(10)), 0.1, atol=1e-6)
    const = learning_rate(OptimConfig(lr=2.0, schedule="constant", warmup_ratio=0.0), 10)
    assert [float(const(s)) for s in (0, 5, 100)] == [2.0, 2.0, 2.0]


def test_decay_mask_skips_norms_and_embeddings():
    params = {"embed_tokens": jnp.ones((5, 3)), "w": jnp.ones((3, 4)), "scale": jnp.ones(4)}
    assert decay_mask(params) == {"embed_tokens": False, "w": True, "scale": False}
    assert all(jax.tree.leaves(decay_mask(params, decay_norms_and_embeddings=True)))


def test_adamw_step_by_hand():
    """Two steps of make_optimizer's chain against AdamW written out in float64: the gradient clipped to
    clip_norm by its global norm, bias-corrected moments, decoupled decay on matrices only."""
    cfg = OptimConfig(lr=0.1, schedule="constant", warmup_ratio=0.0, weight_decay=0.5, clip_norm=1.0)
    params = {"w": jnp.asarray([[1.0, -2.0], [0.5, 3.0]]), "scale": jnp.asarray([1.0, 2.0])}
    grads = [{"w": jnp.asarray([[3.0, 0.0], [-4.0, 1.0]]), "scale": jnp.asarray([0.5, -0.5])},
             {"w": jnp.asarray([[0.1, 0.2], [0.0, -0.1]]), "scale": jnp.asarray([0.0, 0.05])}]
    opt = make_optimizer(cfg, 10)
    state, p = opt.init(params), params
    ref = {k: np.asarray(v, np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in ref.items()}
    nu = {k: np.zeros_like(v) for k, v in ref.items()}
    for t, g in enumerate(grads, start=1):
        updates, state = opt.update(g, state, p)
        p = optax.apply_updates(p, updates)
        g64 = {k: np.asarray(v, np.float64) for k, v in g.items()}
        norm = np.sqrt(sum((v**2).sum() for v in g64.values()))
        g64 = {k: v * min(1.0, cfg.clip_norm / norm) for k, v in g64.items()}
        for k in ref:
            mu[k] = cfg.b1 * mu[k] + (1 - cfg.b1) * g64[k]
            nu[k] = cfg.b2 * nu[k] + (1 - cfg.b2) * g64[k] ** 2
            u = (mu[k] / (1 - cfg.b1**t)) / (np.sqrt(nu[k] / (1 - cfg.b2**t)) + cfg.eps)
            ref[k] = ref[k] - cfg.lr * (u + (cfg.weight_decay * ref[k] if k == "w" else 0.0))
        for k in ref:  # fp32 against float64: a few ulps of values of size ~3
            np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=1e-6, atol=1e-6, err_msg=f"{k} step {t}")
