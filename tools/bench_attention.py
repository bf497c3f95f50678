"""Dense vs blockwise attention inside the qedjax model: forward and forward+backward time at B x T.

The model is a random `bench-100m` (80M parameters, fp32) built once per attention block size;
`--blocks 0` is the dense path (the whole T x T score matrix, masked), any other value routes
queries longer than it through `flash_attention` with that block size. Each figure is the
median of `--repeats` jitted calls after a compile and a warm-up call. Comparing two checkouts
(before and after a change): run the script from each with PYTHONPATH pointing at it.

    python tools/bench_attention.py --seq 2048 --blocks 0 1024 512
    python tools/bench_attention.py --seq 1024 --blocks 0 512 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from qedjax.models.qwen3 import Qwen3, Qwen3Config  # noqa: E402


def timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench-100m")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--blocks", type=int, nargs="+", default=[0, 1024, 512])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 32768, (args.batch, args.seq)), jnp.int32)
    print(f"# {args.preset}, {args.batch} x {args.seq}, fp32, jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    for block in args.blocks:
        cfg = Qwen3Config.preset(args.preset, attention_block=block)
        model = Qwen3(cfg, rngs=nnx.Rngs(0))
        forward = nnx.jit(lambda m, x: m(x))
        grad = nnx.jit(nnx.grad(lambda m, x: jnp.mean(m(x) ** 2)))
        name = "dense" if block == 0 else f"blockwise {block}"
        print(f"{name:>16}: forward {timed(forward, model, tokens, repeats=args.repeats):6.2f} s, "
              f"forward+backward {timed(grad, model, tokens, repeats=max(1, args.repeats - 1)):6.2f} s",
              flush=True)


if __name__ == "__main__":
    main()
