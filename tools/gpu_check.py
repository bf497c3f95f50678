"""cuDNN attention on a GPU: parity against the XLA path, and a 4B-shaped layer's step time and MFU.

    JAX_PLATFORMS=cuda,cpu .venv/bin/python tools/gpu_check.py            # H100 / H200: ~2 minutes

Prints one markdown block for docs/BENCHMARKS.md:
  parity  qedjax.models.kernels.cudnn_attention (bf16, packed rows of 2,048 tokens: three documents
          and padding, 32 query heads over 8 kv heads of 128) against the dense XLA attention in fp32:
          the largest error of the outputs and of dq, dk, dv relative to the reference's largest
          entry, beside the bound tests/test_kernels.py uses (a few bf16 roundings, 2^-8 each).
  speed   one Qwen3-4B block (bf16 weights and activations, one row of T tokens), forward + backward
          (gradients of the weights and the input), jitted, timed over --iters runs after a warm-up,
          with model.attention=cudnn and =xla; MFU = model FLOPs / time / the GPU's dense bf16 peak,
          model FLOPs = 6 x T x (the block's matmul parameters) + 6 x T^2 x N x H (causal attention).
`--kinds xla --preset tiny --seq 256 --no-parity` runs the timing path on a CPU (a check of the script).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

# Dense bf16 tensor-core peaks, FLOP/s (NVIDIA's datasheets: H100 SXM and H200 989.4 TFLOP/s,
# H100 PCIe 756, A100 312); a device not listed needs --peak.
PEAKS = {"H200": 989.4e12, "H100 PCIe": 756e12, "H100": 989.4e12, "A100": 312e12}


def parity(seq: int = 2048):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qedjax.models import kernels

    b, k, g, h = 1, 8, 4, 128
    rs = np.random.RandomState(0)
    q = jnp.asarray(rs.randn(b, seq, k, g, h), jnp.float32)
    kk, v = (jnp.asarray(rs.randn(b, seq, k, h), jnp.float32) for _ in range(2))
    w = jnp.asarray(rs.randn(b, seq, k, g, h), jnp.float32)
    cut = [seq // 4, seq // 2 + 100, seq - 64]
    seg = jnp.asarray(np.searchsorted(cut, np.arange(seq), side="right")[None] + 1, jnp.int32)
    seg = jnp.where(jnp.arange(seq)[None] >= cut[-1], 0, seg)  # the last 64 tokens: padding

    def loss(fn):
        return jax.jit(jax.value_and_grad(
            lambda q, k, v: jnp.sum(fn(q, k, v, seg).astype(jnp.float32) * w), argnums=(0, 1, 2)))

    bf = [x.astype(jnp.bfloat16) for x in (q, kk, v)]
    out = jax.jit(kernels.cudnn_attention)(*bf, seg).astype(jnp.float32)
    ref = jax.jit(kernels.reference_causal)(q, kk, v, seg)
    _, grads = loss(kernels.cudnn_attention)(*bf)
    _, ref_grads = loss(kernels.reference_causal)(q, kk, v)
    rel = lambda a, r: float(jnp.abs(a.astype(jnp.float32) - r).max() / jnp.abs(r).max())  # noqa: E731
    rows = [("out", rel(out, ref), 4 * 2.0 ** -8)]
    rows += [(f"d{n}", rel(a, r), 8 * 2.0 ** -8) for n, a, r in zip("qkv", grads, ref_grads)]
    return rows


def layer_time(preset: str, seq: int, kind: str, iters: int):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qedjax.models.qwen3 import Block, Qwen3Config

    cfg = Qwen3Config.preset(preset, num_hidden_layers=1, param_dtype="bfloat16", dtype="bfloat16", attention=kind)
    block = Block(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(block)
    x = jax.random.normal(jax.random.key(1), (1, seq, cfg.hidden_size), jnp.bfloat16)
    pos = jnp.arange(seq, dtype=jnp.int32)[None]
    seg = jnp.ones((1, seq), jnp.int32)

    @jax.jit
    def step(params, x):
        def f(params, x):
            out, _ = nnx.merge(graphdef, params)(x, pos, seg, pos[0], None)
            return jnp.sum(out.astype(jnp.float32) ** 2)
        return jax.grad(f, argnums=(0, 1))(params, x)

    jax.block_until_ready(step(params, x))  # compile and warm up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(step(params, x))
        times.append(time.perf_counter() - t0)
    d, n, k, h, f = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
    matmul_params = 2 * d * n * h + 2 * d * k * h + 3 * d * f
    flops = 6 * seq * matmul_params + 6 * seq * seq * n * h
    return statistics.median(times), flops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--kinds", nargs="+", default=["cudnn", "xla"])
    p.add_argument("--preset", default="qwen3-4b")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--peak", type=float, default=None, help="dense bf16 FLOP/s of the device")
    p.add_argument("--no-parity", action="store_true")
    args = p.parse_args()

    import jax

    device = jax.devices()[0]
    peak = args.peak or next((v for k, v in PEAKS.items() if k in device.device_kind), None)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        smi = "no nvidia-smi"
    print(f"### cuDNN attention on {device.device_kind} (tools/gpu_check.py)\n")
    print(f"jax {jax.__version__}, {device.platform}; nvidia-smi: {smi}; peak used for MFU: "
          f"{peak / 1e12:.1f} TFLOP/s\n" if peak else f"jax {jax.__version__}, {device.platform}; no peak known (--peak)\n")
    if not args.no_parity:
        print("| parity (bf16 cuDNN vs fp32 XLA, 1 x 2048, packed) | max error / max reference | bound |")
        print("|---|---|---|")
        for name, err, bound in parity():
            print(f"| {name} | {err:.2e} | {bound:.2e} {'ok' if err <= bound else 'EXCEEDED'} |")
        print()
    print(f"| {args.preset} block, fwd + bwd, bf16, 1 row | " + " | ".join(
        f"{k} ms | {k} MFU" for k in args.kinds) + " |")
    print("|---|" + "---|---|" * len(args.kinds))
    for seq in args.seq:
        cells = []
        for kind in args.kinds:
            seconds, flops = layer_time(args.preset, seq, kind, args.iters)
            mfu = f"{flops / seconds / peak:.1%}" if peak else "-"
            cells.append(f"{seconds * 1e3:.2f} | {mfu}")
        print(f"| T = {seq:,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
