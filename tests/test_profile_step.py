"""tools/profile_step.py against XLA:CPU's real output: its HLO parser and its reading of a trace."""

import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import profile_step  # noqa: E402


def _compiled():
    f = jax.jit(lambda a, b: jnp.exp(a @ b) + 1.0)
    a, b = jnp.ones((64, 32)), jnp.ones((32, 16))
    return f, (a, b), f.lower(a, b).compile()


def _parsed(compiled):
    instrs = profile_step.parse_hlo(compiled.as_text())
    return instrs, profile_step.by_computation(instrs)


def test_parser_counts_the_matmul_flops_of_the_compiled_program():
    _, _, compiled = _compiled()
    instrs, by_comp = _parsed(compiled)
    entry = [n for n, ins in instrs.items() if ins["comp"].startswith("main")]
    kinds = [profile_step.classify(n, instrs, by_comp) for n in entry]
    assert sum(f for c, f in kinds if c == "matmul") == 2 * 64 * 16 * 32
    assert any(c == "elementwise" for c, _ in kinds)  # the exp and the add: a loop fusion


def test_headers_with_index_comments_start_a_computation():
    text = "\n".join([
        "%fused_a (p0: f32[4,8], p1: f32[8,2], /*index=2*/p2: f32[]) -> f32[4,2] {",
        "  %p0 = f32[4,8]{1,0} parameter(0)",
        "  %p1 = f32[8,2]{1,0} parameter(1)",
        "  ROOT %d = f32[4,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}",
        "}",
        "%fused_b (q0: f32[4,2]) -> f32[4,2] {",
        "  ROOT %q0 = f32[4,2]{1,0} parameter(0)",
        "}",
        "ENTRY %main.1 (x: f32[4,8], y: f32[8,2]) -> f32[4,2] {",
        "  %f = f32[4,2]{1,0} fusion(%x, %y), kind=kCustom, calls=%fused_a",
        "  ROOT %g = f32[4,2]{1,0} fusion(%f), kind=kLoop, calls=%fused_b",
        "}",
    ])
    instrs = profile_step.parse_hlo(text)
    assert instrs["d"]["comp"] == "fused_a" and instrs["q0"]["comp"] == "fused_b"
    by_comp = profile_step.by_computation(instrs)
    assert profile_step.classify("f", instrs, by_comp) == ("matmul", 2 * 4 * 2 * 8)
    assert profile_step.classify("g", instrs, by_comp) == ("elementwise", 0.0)


def test_trace_names_the_compiled_thunks():
    f, args, compiled = _compiled()
    instrs, _ = _parsed(compiled)
    np.asarray(compiled(*args))
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(3):
            np.asarray(compiled(*args))
        jax.profiler.stop_trace()
        times, calls = profile_step.thunk_times(d)
    entry = {n for n, ins in instrs.items() if ins["comp"].startswith("main")}
    traced = entry & set(times)
    assert traced, (sorted(times)[:10], sorted(entry))
    assert all(calls[n] == 3 for n in traced)  # one event per thunk per call


def test_the_attention_kernel_is_its_own_category():
    """The C++ attention kernel's custom calls (forward and backward) count as attention, not
    "other" (skipped where MKL cannot run)."""
    from qedjax.models import cpu_attention, cpu_gemm

    if cpu_gemm.available() is not None:
        import pytest

        pytest.skip(cpu_gemm.available())
    q, k = jnp.ones((1, 16, 1, 2, 8)), jnp.ones((1, 16, 1, 8))
    seg, slots = jnp.ones((1, 16), jnp.int32), jnp.arange(16, dtype=jnp.int32)

    def loss(q, k):
        return cpu_attention.flash_attention(q, k, k, seg, seg, slots[None], slots, 8, 8).sum()

    instrs, by_comp = _parsed(jax.jit(jax.grad(loss, argnums=(0, 1))).lower(q, k).compile())
    kinds = {n: profile_step.classify(n, instrs, by_comp)[0] for n, ins in instrs.items()
             if ins["opcode"] == "custom-call"}
    assert sorted(kinds.values()) == ["attention", "attention"], kinds
