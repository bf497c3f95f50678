"""Attention by backend (qedjax/models/kernels.py): splash attention's numerics on the CPU in Pallas
interpret mode against the dense XLA attention, its per-shard wiring on a mesh, the choice of kernel
by the platform a program is compiled for, and cuDNN's parity on a GPU (skipped without one).

That a TPU compile gets splash is checked in tests/test_fit.py (it needs libtpu).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qedjax.models import kernels
from qedjax.sharding import TRAIN_RULES, activation_sharding, make_mesh

# Grouped-query heads as the 4B model has them (K = 2 kv heads x G = 2 queries each) at splash's
# lane width (H = 128), over rows of T = 256 tokens: two blocks of 128 under the causal mask.
B, T, K, G, H = 2, 256, 2, 2, 128
# Packed rows: two documents then padding (segment 0) in row 0, one document in row 1.
SEGMENTS = np.asarray([[1] * 100 + [2] * 150 + [0] * 6, [3] * 256], np.int32)
# fp32 rounding: each output and gradient entry is a sum of at most T products of size ~1, so it may
# differ from the reference's by about T x 2^-24 per sum; four times that is the bound.
ATOL = 4 * T * 2.0 ** -24


def _inputs(seed=0, b=B, t=T):
    rs = np.random.RandomState(seed)
    q = jnp.asarray(rs.randn(b, t, K, G, H), jnp.float32)
    k, v = (jnp.asarray(rs.randn(b, t, K, H), jnp.float32) for _ in range(2))
    return q, k, v, jnp.asarray(rs.randn(b, t, K, G, H), jnp.float32)


def _grads(fn, q, k, v, seg, w):
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, seg) * w), argnums=(0, 1, 2))(q, k, v)


def _splash(q, k, v, seg):
    return kernels.splash_attention(q, k, v, seg, interpret=True)


@pytest.fixture(scope="module")
def splash_and_reference():
    q, k, v, w = _inputs()
    seg = jnp.asarray(SEGMENTS)
    return ((_splash(q, k, v, seg), _grads(_splash, q, k, v, seg, w)),
            (kernels.reference_causal(q, k, v, seg), _grads(kernels.reference_causal, q, k, v, seg, w)))


def test_splash_matches_the_reference_forward(splash_and_reference):
    (out, _), (ref, _) = splash_and_reference
    # Every position, padding included (it sees the padding before it, as in the reference).
    np.testing.assert_allclose(out, ref, atol=ATOL)
    # A query at the start of document 2 sees itself only: its output is its own value.
    np.testing.assert_allclose(out[0, 100, 0, 0], _inputs()[2][0, 100, 0], atol=ATOL)


def test_splash_matches_the_reference_gradients(splash_and_reference):
    (_, grads), (_, ref) = splash_and_reference
    for name, a, b in zip("qkv", grads, ref):
        np.testing.assert_allclose(a, b, atol=ATOL, err_msg=f"d{name}")


def test_splash_runs_per_shard_on_a_mesh():
    """Under a mesh (4 rows over data x fsdp = 4 batch shards, the 2 kv heads over tensor = 2) the
    kernel runs per shard through shard_map and gives the unsharded reference's outputs."""
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    q, k, v, _ = _inputs(1, b=4, t=128)
    seg = jnp.asarray(np.r_[SEGMENTS[:, :128], SEGMENTS[::-1, 128:]], jnp.int32)

    @jax.jit
    def run(q, k, v, seg):
        with activation_sharding(mesh, TRAIN_RULES):
            return _splash(q, k, v, seg)

    np.testing.assert_allclose(run(q, k, v, seg), kernels.reference_causal(q, k, v, seg), atol=ATOL)


def test_remat_keeps_the_kernels_outputs_and_the_gradients():
    """Under remat with kernels.REMAT_POLICY the backward pass uses splash's saved output and
    log-sum-exp: the compiled value-and-gradient runs the kernels as often as without remat (the
    forward once, dQ, dK/dV), where plain remat runs the forward again, and the gradients are those
    without remat. The three programs share one kernel (one shape), built under different traces."""
    import re

    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    q, k, v, w = _inputs(3, b=4, t=128)
    seg = jnp.asarray(np.r_[SEGMENTS[:, :128], SEGMENTS[::-1, 128:]], jnp.int32)

    def block(q, k, v):  # work before and after the kernel, as in a model's block
        with activation_sharding(mesh, TRAIN_RULES):
            return jnp.tanh(_splash(jnp.sin(q), 2 * k, v, seg)) * w

    runs = {"none": block, "remat": jax.checkpoint(block),
            "policy": jax.checkpoint(block, policy=kernels.REMAT_POLICY)}
    loops, results = {}, {}
    for name, fn in runs.items():
        step = jax.jit(jax.value_and_grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2)))
        # In interpret mode each kernel is a loop over its grid in the compiled program.
        loops[name] = len(re.findall(r"\bwhile\(", step.lower(q, k, v).compile().as_text()))
        results[name] = step(q, k, v)
    assert loops["policy"] == loops["none"] < loops["remat"], loops
    for name in ("remat", "policy"):
        for a, b in zip(jax.tree.leaves(results[name]), jax.tree.leaves(results["none"])):
            np.testing.assert_allclose(a, b, atol=ATOL, err_msg=name)


def test_the_kernel_follows_the_platform_and_the_config():
    assert [kernels.choose("auto", p) for p in ("tpu", "gpu", "cpu")] == ["splash", "cudnn", "xla"]
    assert kernels.choose("xla", "tpu") == "xla"
    with pytest.raises(ValueError, match="model.attention=splash runs on tpu only; this program is compiled for cpu"):
        kernels.choose("splash", "cpu")
    with pytest.raises(ValueError, match="model.attention=cudnn runs on gpu"):
        kernels.choose("cudnn", "tpu")
    with pytest.raises(ValueError, match="model.attention must be one of"):
        kernels.check("flash", "tpu")
    # The platform is the mesh's while a program is traced under one, else the default backend's.
    assert kernels.platform() == "cpu"
    with activation_sharding(make_mesh("data=8"), TRAIN_RULES):
        assert kernels.platform() == "cpu"


def test_a_kernel_the_platform_lacks_fails_before_anything_compiles():
    from qedjax import train
    from qedjax.config import ModelConfig, load_config

    with pytest.raises(ValueError, match="model.attention must be one of"):
        load_config(None, ["model.attention=flash"])
    mesh = make_mesh("fsdp=8")
    with pytest.raises(ValueError, match="model.attention=splash runs on tpu only"):
        train.init_params(ModelConfig(preset="tiny", attention="splash"), mesh, TRAIN_RULES)
    assert train.model_config(ModelConfig(preset="tiny", attention="xla")).attention == "xla"


def test_decoding_and_prefills_take_the_xla_path():
    """A cache prefill (queries at slots 10..17 of 24) takes the XLA path under `auto` even where the
    platform's kernel would be splash; naming splash there is an error."""
    q, k, v, _ = _inputs(2, b=1, t=24)
    q = q[:, :8]
    args = (jnp.ones((1, 8), jnp.int32), jnp.ones((1, 24), jnp.int32),
            10 + jnp.arange(8, dtype=jnp.int32)[None], jnp.arange(24, dtype=jnp.int32))
    out = kernels.attention(q, k, v, *args, kind="auto", full_row=False)
    from qedjax.models.attention import dense_attention

    np.testing.assert_allclose(out, dense_attention(q, k, v, *args), atol=ATOL)
    with pytest.raises(ValueError, match="decoding and cache prefills take the XLA path"):
        kernels.attention(q, k, v, *args, kind="splash", full_row=False, interpret=True)


def _cuda_devices():
    try:
        return jax.devices("cuda")
    except RuntimeError:
        return []


@pytest.mark.gpu
def test_cudnn_matches_the_reference_on_a_gpu():
    """cuDNN's flash attention against the XLA path in fp32 on the GPU (bf16 parity and speed:
    tools/gpu_check.py). Runs with JAX_PLATFORMS=cuda,cpu on a machine with a CUDA GPU."""
    devices = _cuda_devices()
    if not devices:
        pytest.skip("needs a CUDA GPU visible to JAX (JAX_PLATFORMS=cuda,cpu)")
    q, k, v, w = (jax.device_put(x.astype(jnp.bfloat16), devices[0]) for x in _inputs())
    seg = jax.device_put(jnp.asarray(SEGMENTS), devices[0])
    out = jax.jit(kernels.cudnn_attention)(q, k, v, seg).astype(jnp.float32)
    ref = jax.jit(kernels.reference_causal)(*(x.astype(jnp.float32) for x in (q, k, v)), seg)
    # bf16 inputs: probabilities and products rounded to bf16 (relative 2^-8) a few times over.
    scale = float(jnp.abs(ref).max())
    assert float(jnp.abs(out - ref).max()) <= 4 * 2.0 ** -8 * scale
    grads = _grads(jax.jit(kernels.cudnn_attention), q, k, v, seg, w.astype(jnp.bfloat16))
    ref_grads = _grads(kernels.reference_causal, *(x.astype(jnp.float32) for x in (q, k, v)), seg,
                       w.astype(jnp.float32))
    for name, a, b in zip("qkv", grads, ref_grads):
        assert float(jnp.abs(a.astype(jnp.float32) - b).max()) <= 8 * 2.0 ** -8 * float(jnp.abs(b).max()), name
