"""One layer's attention core, forward and backward: qedjax's attention against torch's sdpa.

The inputs are one bench-100m layer's queries, keys and values at B x T ([B, T, 2 key heads, 5 query
heads each, 64]), causal, one segment. qedjax runs `flash_attention` (or `dense_attention` with
`--block 0`) under a jitted `jax.grad` of a fixed random projection of its output, as the JAX loops
and, where MKL can run, as the C++ kernel (qedjax/models/cpu_attention.py); torch runs
`scaled_dot_product_attention(is_causal=True)` and `.backward()` on the same inputs, the key heads
repeated for it. With `--before DIR`, the attention module of another checkout (DIR/qedjax/models/
attention.py, e.g. a `git worktree` of the commit before a change) runs beside it in the same process,
and its gradients are compared with this checkout's. Calls alternate between the variants, the order
rotating every round; each figure is the median of `--repeats` calls after two warm-up rounds.

    python tools/bench_attention_core.py --batch 1 --seq 2048
    python tools/bench_attention_core.py --batch 1 --seq 2048 --kernel 128 128 --kernel 32 64
    git worktree add /tmp/before f1f6abf && python tools/bench_attention_core.py --before /tmp/before
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time

from benchlib import ROOT, pin_threads, print_footer, print_header  # tools/, the script's own folder

KV_HEADS, GROUPS, HEAD_DIM = 2, 5, 64  # bench-100m


def load_attention(checkout: str, name: str):
    """The attention module of a checkout, by path (the installed `qedjax` may be another checkout's)."""
    path = os.path.join(checkout, "qedjax", "models", "attention.py")
    if not os.path.exists(path):
        raise SystemExit(f"{checkout}: no qedjax/models/attention.py there")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--block", type=int, default=256, help="flash_attention's block; 0 for the dense path")
    p.add_argument("--kernel", type=int, nargs=2, action="append", default=[], metavar=("BLOCK_Q", "BLOCK_K"),
                   help="also run the C++ kernel with these blocks (query positions, keys) besides its "
                        "default ones; repeatable")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--before", default=None, help="another checkout whose attention runs beside this one")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = p.parse_args(argv)
    pin_threads(args.threads)
    print_header()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    b, t = args.batch, args.seq
    rng = np.random.default_rng(0)
    q, ct = (rng.standard_normal((b, t, KV_HEADS, GROUPS, HEAD_DIM), np.float32) for _ in range(2))
    k, v = (rng.standard_normal((b, t, KV_HEADS, HEAD_DIM), np.float32) for _ in range(2))
    seg = jnp.ones((b, t), jnp.int32)
    slots = jnp.arange(t, dtype=jnp.int32)

    def jax_grad(module, **kw):
        def loss(q, k, v):
            args_ = (q, k, v, seg, seg, jnp.broadcast_to(slots, (b, t)), slots)
            out = module.flash_attention(*args_, block=args.block, **kw) if args.block else module.dense_attention(*args_)
            return jnp.sum(out * ct)

        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        inputs = tuple(jnp.asarray(x) for x in (q, k, v))
        return lambda: jax.block_until_ready(fn(*inputs))

    from qedjax.models import cpu_attention, cpu_gemm

    here = load_attention(ROOT, "attention_here")
    variants = {("JAX loops" if args.block else "dense"): jax_grad(here)}
    if args.block and cpu_gemm.available() is None:
        variants[f"kernel {cpu_attention.BLOCK_Q}/{cpu_attention.BLOCK_K}"] = jax_grad(here, kernel=True)
    if args.kernel:
        class Kernel:  # cpu_attention under the attention module's names (its own blocks, any --block)
            def __init__(self, bq, bk):
                self.bq, self.bk = bq, bk

            def flash_attention(self, *a, block=None):
                return cpu_attention.flash_attention(*a, block_q=self.bq, block_k=self.bk)

            dense_attention = flash_attention

        for bq, bk in args.kernel:
            variants[f"kernel {bq}/{bk}"] = jax_grad(Kernel(bq, bk))
    if args.before:
        variants["before"] = jax_grad(load_attention(args.before, "attention_before"))
    first, *others = variants
    for name in others:  # every variant's gradients against the first's
        diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                   for x, y in zip(variants[first](), variants[name]()))
        against = args.before if name == "before" else name
        print(f"# max |gradient difference| of {against} against {first}: {diff:.2e}", flush=True)

    heads = KV_HEADS * GROUPS
    tq = torch.tensor(q).reshape(b, t, heads, HEAD_DIM).transpose(1, 2).contiguous().requires_grad_()
    tk, tv = (torch.tensor(x).transpose(1, 2).repeat_interleave(GROUPS, 1).contiguous().requires_grad_()
              for x in (k, v))
    tct = torch.tensor(ct).reshape(b, t, heads, HEAD_DIM).transpose(1, 2)

    def torch_step():
        out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
        (out * tct).sum().backward()
        tq.grad = tk.grad = tv.grad = None

    variants["torch sdpa"] = torch_step
    times = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.repeats + 2):
        # each variant in each position equally often: a call right after torch's runs slower (its
        # OpenMP threads still spin for a while after it returns)
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            variants[name]()
            if r >= 2:
                times[name].append(time.perf_counter() - start)
    what = f"flash_attention, blocks of {args.block}" if args.block else "dense_attention"
    print(f"# {b} x {t}, {what}, forward + backward, median of {args.repeats} (ms; best in brackets):")
    base = statistics.median(times["torch sdpa"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:>12}: {med * 1e3:8.1f} [{min(ts) * 1e3:8.1f}]   torch / this {base / med:.2f}", flush=True)
    print_footer()


if __name__ == "__main__":
    main()
