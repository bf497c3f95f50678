"""Comparing two correct training runs that sum in different orders (another mesh, micro-batching,
two processes): what must agree tightly, and how far parameters may drift after optimizer steps.

- Gradients are compared tightly. `capture_grads()` is an optax transformation that leaves the
  parameters alone and keeps the last gradient it saw as its state, so one train step's gradient
  comes out of the real step function unchanged (no `p - lr * g` rounding).
- Parameters after AdamW steps cannot be compared tightly: Adam's early updates are about
  `lr * sign(g)`, so where a gradient entry nearly cancels, another (equally correct) summation order
  may flip its sign and move that parameter by up to about `lr` either way. For the first steps the
  bias-corrected |m| / sqrt(v) is at most about 1 (Cauchy-Schwarz over the EMA weights; 1.001 at
  step 2 with b1=0.9, b2=0.999), so two runs drift apart by at most `2 * sum(lr_t)` (plus decoupled
  weight decay, which moves both runs alike). That bound still catches a wrong restore or a step
  trained twice; the gradient check catches a wrong all-reduce or a dropped micro-batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# A gradient entry is a sum over every token of the batch; reordering that sum in fp32 changes it by
# a few ulps of its largest terms. Measured across the test meshes the largest difference is 1.2e-6 of
# the leaf's largest entry (data=8 against one device); 1e-4 leaves two orders of margin for other
# CPUs' kernels, while a mean in place of the data-parallel sum or a dropped micro-batch moves
# almost every entry by 10% to 100% of that scale (both tried: the tests fail).
GRAD_RTOL = 1e-4


class _Captured(NamedTuple):
    grads: optax.Params


def capture_grads() -> optax.GradientTransformation:
    """Zero updates; the state is the gradient of the last step (sharded like the parameters)."""
    def init(params):
        return _Captured(jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        del state, params
        return jax.tree.map(jnp.zeros_like, grads), _Captured(grads)

    return optax.GradientTransformation(init, update)


def captured(opt_state) -> dict:
    """The gradient a `capture_grads()` state holds, on the host."""
    return jax.device_get(opt_state.grads)


def assert_grads_close(got, want, rtol: float = GRAD_RTOL, where: str = "") -> None:
    """Leaf by leaf, |got - want| <= rtol * max|want| of that leaf."""
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = np.abs(b).max()
        assert scale > 0, f"{where}{jax.tree_util.keystr(path)}: the gradient is all zero (nothing to compare)"
        np.testing.assert_allclose(a, b, rtol=0, atol=rtol * scale, err_msg=f"{where}{jax.tree_util.keystr(path)}")


def adam_drift_bound(lrs) -> float:
    """How far two correct AdamW runs may move one parameter apart after steps with these rates."""
    return 2.0 * float(np.sum(lrs))


def assert_params_within(got, want, bound: float, where: str = "") -> None:
    """Every parameter within `bound` of the other run's (bound 0: bit-identical)."""
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        if bound == 0:
            np.testing.assert_array_equal(a, b, err_msg=f"{where}{jax.tree_util.keystr(path)}")
        else:
            np.testing.assert_allclose(a, b, rtol=0, atol=bound, err_msg=f"{where}{jax.tree_util.keystr(path)}")
