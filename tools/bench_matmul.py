"""The train step's matmuls one at a time: XLA:CPU (and which library it gave each) against torch.

    python tools/bench_matmul.py --rows 256 1024 2048

For each number of rows M (batch x sequence), every product of a bench-100m layer's forward and
backward pass and of the vocabulary projection, as the step writes it, timed alone in jax and in
torch (one process; the median of three rounds in alternating order, each the median of --repeats
calls). The weight gradients appear in two forms: the plain contraction over the rows of both
operands, and the product from a transposed copy of the rows (the copy included in the time), which
is what `qwen3.project` does on XLA:CPU with gemm="xla-copy"; torch computes both rows' product its own
way. The library column reads the compiled program: YNNPACK ("ynn") or Eigen's dot ("eigen"). The mkl
column is the same product as MKL's sgemm called from XLA (qedjax/models/cpu_gemm.py, gemm="mkl"),
transposing in place (so no copy form); "-" where this host cannot run it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from benchlib import ROOT, add_host_flags, print_footer, setup_host


def products(d: int, f: int, v: int) -> list[tuple[str, str, str, tuple, tuple]]:
    """(name, einsum spec, 'copy' for the transposed-copy form else '', lhs shape, rhs shape) per row count
    'M' (shapes name M symbolically, filled in by `shapes`)."""
    return [
        ("up/gate forward", "md,df->mf", "", ("M", d), (d, f)),
        ("up/gate dx", "mf,df->md", "", ("M", f), (d, f)),
        ("up/gate dW plain", "md,mf->df", "", ("M", d), ("M", f)),
        ("up/gate dW from copy", "md,mf->df", "copy", ("M", d), ("M", f)),
        ("down forward", "mf,fd->md", "", ("M", f), (f, d)),
        ("down dW plain", "mf,md->fd", "", ("M", f), ("M", d)),
        ("down dW from copy", "mf,md->fd", "copy", ("M", f), ("M", d)),
        ("vocab logits", "md,vd->mv", "", ("M", d), (v, d)),
        ("vocab dh", "mv,vd->md", "", ("M", v), (v, d)),
        ("vocab dE", "mv,md->vd", "", ("M", v), ("M", d)),
    ]


def shapes(shape: tuple, m: int) -> tuple[int, ...]:
    return tuple(m if s == "M" else s for s in shape)


def gemm_transposes(spec: str) -> tuple[bool, bool]:
    """(trans_a, trans_b) that make a 2-D einsum spec op(a) @ op(b)."""
    (lhs, rhs), out = spec.split("->")[0].split(","), spec.split("->")[1]
    (k,) = set(lhs) & set(rhs) - set(out)
    if out != lhs.replace(k, "") + rhs.replace(k, ""):
        raise ValueError(f"{spec} is not a product op(a) @ op(b)")
    return lhs[0] == k, rhs[1] == k


def flops(spec: str, a: tuple, b: tuple) -> float:
    dims = dict(zip(spec.split("->")[0].replace(",", ""), a + b))
    out = 2.0
    for n in dims.values():
        out *= n
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench-100m")
    p.add_argument("--rows", type=int, nargs="+", default=[256, 1024, 2048], help="M = batch x sequence")
    p.add_argument("--repeats", type=int, default=7)
    add_host_flags(p)
    args = p.parse_args(argv)
    setup_host(args)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    sys.path.insert(0, ROOT)
    from qedjax.models import cpu_gemm
    from qedjax.models.qwen3 import Qwen3Config

    mkl_off = cpu_gemm.available()
    if mkl_off:
        print(f"# no mkl column: {mkl_off}")

    cfg = Qwen3Config.preset(args.preset)

    def median_s(fn, n):
        fn()
        out = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
        return statistics.median(out)

    def jax_fn(spec, copy):
        if not copy:
            return jax.jit(lambda a, b: jnp.einsum(spec, a, b))
        lhs, rhs_out = spec.split(",")
        # the rows' axis first in both operands: contract it from a written-out transposed copy
        return jax.jit(lambda a, b: jnp.einsum(f"{lhs[::-1]},{rhs_out}", jax.lax.optimization_barrier(a.T), b))

    rng = np.random.default_rng(0)
    print(f"{'M':>5} | {'product':<22} | {'library':<7} | {'jax GFLOP/s':>11} | {'mkl GFLOP/s':>11} | "
          f"{'torch GFLOP/s':>13} | jax/torch | mkl/torch")
    for m in args.rows:
        for name, spec, copy, a_shape, b_shape in products(cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size):
            a_shape, b_shape = shapes(a_shape, m), shapes(b_shape, m)
            a = rng.standard_normal(a_shape, dtype=np.float32)
            b = rng.standard_normal(b_shape, dtype=np.float32)
            fn = jax_fn(spec, copy)
            ja, jb = jnp.asarray(a), jnp.asarray(b)
            text = fn.lower(ja, jb).compile().as_text()
            library = "ynn" if "__ynn_fusion" in text else "eigen"
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            calls = {"jax": lambda: jax.block_until_ready(fn(ja, jb)), "torch": lambda: torch.einsum(spec, ta, tb)}
            if not (mkl_off or copy):
                mkl_fn = jax.jit(lambda a, b, t=gemm_transposes(spec): cpu_gemm.gemm(a, b, *t))
                calls["mkl"] = lambda: jax.block_until_ready(mkl_fn(ja, jb))
            times = {k: [] for k in calls}
            for r in range(3):  # rounds, order alternating; each a median of --repeats calls
                for k in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
                    times[k].append(median_s(calls[k], args.repeats))
            t_jax, t_torch = statistics.median(times["jax"]), statistics.median(times["torch"])
            fl = flops(spec, a_shape, b_shape)
            t_mkl = statistics.median(times["mkl"]) if "mkl" in times else None
            mkl_rate = f"{fl / t_mkl / 1e9:11.0f}" if t_mkl else f"{'-':>11}"
            mkl_ratio = f"{t_torch / t_mkl:9.2f}" if t_mkl else f"{'-':>9}"
            print(f"{m:>5} | {name:<22} | {library:<7} | {fl / t_jax / 1e9:11.0f} | {mkl_rate} | "
                  f"{fl / t_torch / 1e9:13.0f} | {t_torch / t_jax:9.2f} | {mkl_ratio}", flush=True)
    print_footer()


if __name__ == "__main__":
    main()
