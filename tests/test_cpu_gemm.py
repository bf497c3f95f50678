"""MKL's sgemm as an XLA:CPU custom call (qedjax/models/cpu_gemm.py): its products, its gradients, its
place in the compiled model, and what happens where it cannot run.

Operands are small integers, so every product and sum is exact in fp32 and MKL's results must equal
numpy's whatever order either reduces in."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qedjax.models import cpu_gemm

needs_mkl = pytest.mark.skipif(cpu_gemm.available() is not None, reason=str(cpu_gemm.available()))


def _ints(rng, shape):
    return rng.randint(-3, 4, shape).astype(np.float32)


@needs_mkl
@pytest.mark.parametrize("batch", [(), (3,)])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_gemm_equals_numpy(batch, trans_a, trans_b):
    rng = np.random.RandomState(0)
    m, k, n = 5, 7, 4
    a = _ints(rng, batch + ((k, m) if trans_a else (m, k)))
    b = _ints(rng, batch + ((n, k) if trans_b else (k, n)))
    want = (np.swapaxes(a, -1, -2) if trans_a else a) @ (np.swapaxes(b, -1, -2) if trans_b else b)
    got = jax.jit(cpu_gemm.gemm, static_argnums=(2, 3))(a, b, trans_a, trans_b)
    np.testing.assert_array_equal(got, want)


@needs_mkl
@pytest.mark.parametrize("transpose_w", [False, True])
def test_matmul_gradients_equal_numpy(transpose_w):
    """Both gradients, each a product with other transposes, for w used as is and transposed."""
    rng = np.random.RandomState(1)
    x, dy = _ints(rng, (6, 5)), _ints(rng, (6, 4))
    w = _ints(rng, (4, 5) if transpose_w else (5, 4))
    out, pull = jax.vjp(lambda x, w: cpu_gemm.matmul(x, w, transpose_w), x, w)
    dx, dw = pull(dy)
    w_used = w.T if transpose_w else w
    np.testing.assert_array_equal(out, x @ w_used)
    np.testing.assert_array_equal(dx, dy @ w_used.T)
    np.testing.assert_array_equal(dw, (x.T @ dy).T if transpose_w else x.T @ dy)


@needs_mkl
def test_empty_products():
    """An empty contraction gives zeros (the output buffer is not left as it was), an empty output
    an empty array."""
    np.testing.assert_array_equal(jax.jit(cpu_gemm.gemm)(jnp.ones((3, 0)), jnp.ones((0, 4))), np.zeros((3, 4)))
    assert jax.jit(cpu_gemm.gemm)(jnp.ones((0, 3)), jnp.ones((3, 4))).shape == (0, 4)


@needs_mkl
def test_bad_operands_name_their_shapes():
    f32 = jnp.zeros((2, 3), jnp.float32)
    with pytest.raises(ValueError, match=r"float32 operands.*bfloat16\[2, 3\]"):
        cpu_gemm.gemm(f32, f32.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"\[2, 3\] \(trans_a=False\) and \[2, 3\] \(trans_b=False\) do not multiply"):
        cpu_gemm.gemm(f32, f32)
    with pytest.raises(ValueError, match="2-D operands"):
        cpu_gemm.matmul(jnp.zeros((1, 2, 3)), jnp.zeros((1, 3, 2)))


@needs_mkl
def test_the_mkl_model_calls_it():
    """gemm="mkl" puts MKL's products into the compiled forward and backward (projections, the
    vocabulary), attention_kernel the C++ attention kernel; each independently of the other, and
    neither where off. A silent fallback would fail here."""
    from flax import nnx

    from qedjax.models.qwen3 import Qwen3, Qwen3Config

    tokens = jnp.arange(40, dtype=jnp.int32).reshape(2, 20) % 97
    for gemm, kernel in (("xla", False), ("mkl", False), ("xla-copy", True), ("mkl", True)):
        cfg = Qwen3Config.preset("tiny", gemm=gemm, attention_kernel=kernel, attention_block=8,
                                 attention_dense_max=8)
        graphdef, params = nnx.split(Qwen3(cfg, rngs=nnx.Rngs(0)))

        def loss(params):
            return nnx.merge(graphdef, params)(tokens).mean()

        hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
        found = hlo.count(f'custom_call_target="{cpu_gemm.TARGET}"')
        attention = [hlo.count(f'custom_call_target="{t}"') for t in cpu_gemm.ATTENTION_TARGETS]
        # 7 projections per layer x 3 products (and the tied vocabulary's); attention is the C++
        # kernel (cpu_attention): one forward and one backward call per layer
        assert (found >= 2 * 7 * 3) if gemm == "mkl" else found == 0, (gemm, found)
        assert attention == ([2, 2] if kernel else [0, 0]), (gemm, kernel, attention)


def test_cpu_vendor_reads_proc_cpuinfo():
    """The vendor that picks the CPU defaults (train.default_gemm, qwen3.attention_defaults)."""
    if not os.path.exists("/proc/cpuinfo"):
        assert cpu_gemm.cpu_vendor() is None
        return
    with open("/proc/cpuinfo") as f:
        text = f.read()
    if "vendor_id" not in text:  # not x86
        assert cpu_gemm.cpu_vendor() is None
    else:
        assert cpu_gemm.cpu_vendor() and f"vendor_id\t: {cpu_gemm.cpu_vendor()}\n" in text


def test_where_it_cannot_run():
    """Off Linux or without MKL it says why (and how to install it), and model.gemm: mkl fails at
    config time with that reason."""
    assert "Linux only" in cpu_gemm._why_not("darwin", None)
    assert "pip install -e '.[cpu-blas]'" in cpu_gemm._why_not("linux", None)
    assert cpu_gemm._why_not("linux", cpu_gemm.Path("/lib/libmkl_rt.so.2")) is None


def test_unavailable_mkl_is_a_config_error(monkeypatch):
    from qedjax.config import ModelConfig

    monkeypatch.setattr(cpu_gemm, "available", lambda: "MKL is not installed (test)")
    with pytest.raises(ValueError, match=r"model.gemm is 'mkl' but MKL is not installed \(test\)"):
        ModelConfig(preset="tiny", gemm="mkl")
    from qedjax import train

    assert train.default_gemm("cpu", 1, "GenuineIntel") == "xla-copy"  # unset: XLA's products, no error


def test_build_caches_and_reports_compiler_errors(tmp_path, monkeypatch):
    """The handler is built once per source, jaxlib and CPU into the cache; a compiler that fails is an
    error naming the command."""
    monkeypatch.setenv("QEDJAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "false")  # exits 1 without writing anything
    with pytest.raises(RuntimeError, match="building the MKL custom call failed \\(false -O3"):
        cpu_gemm._build()
    assert not list((tmp_path / "cache").glob("*.so"))
    if not (cpu_gemm.shutil.which("g++") or cpu_gemm.shutil.which("c++")):
        pytest.skip("no C++ compiler here")
    monkeypatch.delenv("CXX")
    built = cpu_gemm._build()
    assert built.parent == tmp_path / "cache" and built.stat().st_size > 0
    assert cpu_gemm._build() == built and built.stat().st_mtime_ns == cpu_gemm._build().stat().st_mtime_ns
    # -march=native: another CPU (other flags) gets a library of its own, never this one
    monkeypatch.setattr(cpu_gemm, "_cpu_flags", lambda: "flags\t\t: fpu sse2")
    assert cpu_gemm._build() != built
