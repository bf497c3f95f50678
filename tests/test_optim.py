"""The optimizer's fused step (`Optimizer.apply`), in JAX and as the single-pass AdamW custom call
(models/cpu_adamw.py), against optax's own update + apply_updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qedjax.models import cpu_adamw, cpu_gemm
from qedjax.optim import OptimConfig, make_optimizer

KERNELS = [None, pytest.param(cpu_adamw.update, id="cpu_adamw",
                              marks=pytest.mark.skipif(cpu_gemm.available() is not None,
                                                       reason=str(cpu_gemm.available())))]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("clip_norm", [1.0, None])
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_apply_matches_optax(clip_norm, schedule, kernel):
    """Each step's parameters and state equal optax's to fp32 rounding (the forms differ in order: optax
    divides each gradient by the norm, `apply` multiplies it by clip_norm / norm), a skipped step
    changes nothing. "big" (137,100 elements) makes the custom call split the update over two threads
    inside one leaf and across leaves."""
    params = {"embed_tokens": jnp.full((5, 3), 0.3), "w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4),
              "scale": jnp.ones(4), "big": jnp.linspace(-2.0, 2.0, 300 * 457).reshape(300, 457)}
    opt = make_optimizer(OptimConfig(lr=1e-2, schedule=schedule, warmup_ratio=0.2, weight_decay=0.1,
                                     clip_norm=clip_norm), 10)
    ref_p, ref_s = params, opt.init(params)
    p, s = params, opt.init(params)
    update = jax.jit(opt.update)
    apply = jax.jit(lambda *a: opt.apply(*a, kernel=kernel))
    hlo = apply.lower(params, s, params, jnp.asarray(True)).compile().as_text()
    # two calls: one for the decayed matrices, one for the embedding and the scale
    assert hlo.count(f'custom_call_target="{cpu_gemm.ADAMW_TARGET}"') == (2 if kernel else 0)
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


@pytest.mark.skipif(cpu_gemm.available() is not None, reason=str(cpu_gemm.available()))
def test_kernel_leaves_other_dtypes_to_jax_and_checks_its_operands():
    """A bf16 parameter takes JAX's update (the kernel is fp32 only), with the same result as without
    the kernel; operands of the wrong dtype or shape are refused by name."""
    params = {"w": jnp.linspace(-1.0, 1.0, 12, dtype=jnp.bfloat16).reshape(3, 4), "b": jnp.ones(4)}
    opt = make_optimizer(OptimConfig(lr=1e-2, warmup_ratio=0.0, weight_decay=0.1), 10)
    g = jax.tree.map(lambda x: jnp.cos(x), params)
    s = opt.init(params)
    with_kernel = jax.jit(lambda *a: opt.apply(*a, kernel=cpu_adamw.update))
    assert cpu_gemm.ADAMW_TARGET not in with_kernel.lower(g, s, params, jnp.asarray(True)).compile().as_text()
    for a, b in zip(jax.tree.leaves(with_kernel(g, s, params, jnp.asarray(True))),
                    jax.tree.leaves(jax.jit(opt.apply)(g, s, params, jnp.asarray(True)))):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    x, y = jnp.ones((2, 3)), jnp.ones((3, 2))
    with pytest.raises(ValueError, match=r"fp32 of one shape.*float32\[2, 3\].*float32\[3, 2\]"):
        cpu_adamw.update(jnp.ones(5), [x], [y], [x], [x], b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    with pytest.raises(ValueError, match="params, grads, mu, nu"):
        cpu_adamw.update(jnp.ones(5), [x], [], [x], [x], b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)


def test_train_step_takes_the_kernel_on_one_cpu_device_only():
    """train.default_adamw_kernel: on a one-device CPU mesh where the custom calls run; asking for it on
    a larger mesh (no sharding rule) fails before anything compiles."""
    from qedjax import sharding, train

    assert train.default_adamw_kernel("cpu", 1) == (cpu_gemm.available() is None)
    assert not train.default_adamw_kernel("cpu", 8) and not train.default_adamw_kernel("tpu", 1)
    mesh = sharding.make_mesh("data=2", devices=jax.devices()[:2])
    with pytest.raises(ValueError, match="one-device CPU mesh, not 2 cpu"):
        train.make_train_step(None, None, None, None, None, None, mesh, sharding.TRAIN_RULES, adamw_kernel=True)
