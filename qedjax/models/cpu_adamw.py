"""AdamW's update of fp32 parameters and moments in one pass on the CPU, as a custom call (issue 22).

`optim.make_optimizer`'s `apply` written in JAX leaves XLA:CPU two fusions per parameter (the new
moments, then the new parameter from them, kept apart so the second does not read a moment whose
donated buffer the first has overwritten): about 40 bytes of memory traffic per parameter. This
custom call (csrc/cpu_adamw.cc, built and loaded with cpu_gemm's library) reads each element of the
parameter, gradient and moments once and writes the parameter and moments back in place: 28 bytes.
`Optimizer.apply(..., kernel=cpu_adamw.update)` uses it; `train.default_adamw_kernel` says where.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qedjax.models import cpu_gemm


def update(scalars: jax.Array, params: Sequence[jax.Array], grads: Sequence[jax.Array], mu: Sequence[jax.Array],
           nu: Sequence[jax.Array], *, b1: float, b2: float, eps: float, weight_decay: float):
    """(params, mu, nu) after one AdamW step of every leaf, each an updated list of fp32 arrays.

    scalars: f32[5] = (ok, grad_scale, bc1, bc2, step_size): where ok is 0 nothing changes; the
    gradient is multiplied by grad_scale (clipping), the moments' bias corrections are bc1 and bc2,
    and step_size is the signed learning rate (-lr). weight_decay applies to every leaf given.
    """
    reason = cpu_gemm.available()
    if reason is not None:
        raise RuntimeError(reason)
    leaves = (params, grads, mu, nu)
    n = len(params)
    if any(len(x) != n for x in leaves):
        raise ValueError(f"cpu_adamw: {[len(x) for x in leaves]} params, grads, mu, nu")
    for p, *rest in zip(*leaves):
        if any(x.dtype != jnp.float32 or x.shape != p.shape for x in (p, *rest)):
            raise ValueError(f"cpu_adamw: a parameter, gradient and moments must be fp32 of one shape, got "
                             f"{[f'{x.dtype}{list(x.shape)}' for x in (p, *rest)]}")
    if n == 0:
        return [], [], []
    shapes = [jax.ShapeDtypeStruct(p.shape, jnp.float32) for p in params] * 3
    # operand 0 is `scalars`; parameters 1..n, gradients n+1..2n, mu 2n+1..3n, nu 3n+1..4n
    aliases = {1 + i: i for i in range(n)}
    aliases |= {1 + 2 * n + i: n + i for i in range(n)} | {1 + 3 * n + i: 2 * n + i for i in range(n)}
    call = jax.ffi.ffi_call(cpu_gemm.ADAMW_TARGET, shapes, input_output_aliases=aliases)
    # The coefficients as fp32, each rounded once from Python's float, as JAX rounds (1 - b1) * g.
    f32 = np.float32
    out = call(scalars.astype(jnp.float32), *params, *grads, *mu, *nu, b1=f32(b1), b2=f32(b2),
               one_minus_b1=f32(1 - b1), one_minus_b2=f32(1 - b2), eps=f32(eps),
               weight_decay=f32(weight_decay), threads=cpu_gemm.threads())
    return list(out[:n]), list(out[n:2 * n]), list(out[2 * n:])
