"""The optimizer's fused step (`Optimizer.apply`) against optax's own update + apply_updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qedjax.optim import OptimConfig, make_optimizer


@pytest.mark.parametrize("clip_norm", [1.0, None])
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_apply_matches_optax(clip_norm, schedule):
    params = {"embed_tokens": jnp.full((5, 3), 0.3), "w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4),
              "scale": jnp.ones(4)}
    opt = make_optimizer(OptimConfig(lr=1e-2, schedule=schedule, warmup_ratio=0.2, weight_decay=0.1,
                                     clip_norm=clip_norm), 10)
    ref_p, ref_s = params, opt.init(params)
    p, s = params, opt.init(params)
    update, apply = jax.jit(opt.update), jax.jit(opt.apply)
    for i in range(5):
        # Step 1 is large enough to be clipped; step 3 is skipped (as a non-finite step would be).
        g = jax.tree.map(lambda x: jnp.sin(3.0 * (i + 1) * x) * (5.0 if i == 1 else 0.1), params)
        ok = i != 3
        if ok:
            u, ref_s = update(g, ref_s, ref_p)
            ref_p = optax.apply_updates(ref_p, u)
        p, s = apply(g, s, p, jnp.asarray(ok))
        assert jax.tree.structure(s) == jax.tree.structure(ref_s)
        for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((ref_p, ref_s))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert int(s[1][0].count if clip_norm else s[0].count) == 4
