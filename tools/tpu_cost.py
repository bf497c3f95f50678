"""Step time and MFU of the 4B programs, estimated by the TPU compiler's cost model (docs/FIT.md, "Speed").

    .venv/bin/python tools/tpu_cost.py --program sft --seq 2048 49152
    .venv/bin/python tools/tpu_cost.py --program grpo --seq 50176
    .venv/bin/python tools/tpu_cost.py --program prefill --seq 52224

Compiles, with libtpu's compiler on this machine (`make fit-tools`), for --target (default v5p:2x2x1,
a v5p-8) with --mesh (default fsdp=4) and --rows rows per chip (default 1), and reads
`optimal_seconds` (XLA's cost-model time) from `compiled.cost_analysis()`:
  sft      sft.make_step of configs/qwen3-4b-sft.yaml, one micro-batch
  grpo     rl.make_step of configs/qwen3-4b-grpo.yaml, one micro-batch
  prefill  the RC summariser's prefill: the 4B forward over the prompt into a fresh KV cache, the
           summariser's weights sharded as the RC config keeps them (sharding.SUMMARIZER_RULES)

The cost model cannot see inside loops, so every program is made loop-free: one micro-batch (no
scan), the model cut to --layers blocks (2 and 4; the time at the full 36 is extrapolated linearly:
the blocks are identical), the vocabulary chunks of the log-prob loss unrolled (its `lax.map` traced
as a Python loop: the same products as the shipped step), and attention taken out: the model runs a
stand-in of the same inputs and output (q plus the means of k and v: elementwise, O(T)) so that the
compiler's figure is everything but attention ("rest"). Attention's time is then added from a stated
model, per layer and row:
  splash   the kernel's executed FLOPs (the block pairs on or below the diagonal, 512-token blocks:
           forward 2 products, dQ kernel 3, dK/dV kernel 4; under remat the kernel's output is kept,
           models/kernels.py's REMAT_POLICY, so its forward does not run again) at SPLASH_RATE of the
           chip's peak. Splash's own cost-model figures are not used: the model does not see
           inside a Pallas kernel.
  xla      the compiler's own time for models/attention.py's dense path on one layer at --xla-probe
           tokens (loop-free), per executed FLOP, times the blockwise path's executed FLOPs at T
           (block pairs in reach; the forward again under remat). At T = --xla-probe the step is
           also compiled whole with dense attention, for a check of the sum against the compiler.
MFU = model FLOPs / chips / peak / time, model FLOPs = 6 x tokens x (matmul parameters) + 6 x L x T^2 x
N x H per row (causal attention, fwd + bwd; forward-only programs: a third).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys

PEAK = {"v5p": 459e12, "v5e": 197e12, "v6e": 918e12, "v4": 275e12}  # bf16 FLOP/s per chip, cloud.google.com/tpu/docs
# Splash's rate per executed FLOP: 40.9% of v5p's peak, from a measured splash forward on one v5p chip
# (marin-community/marin PR 6330, 2026-06-13: 8,192 tokens, 1 row, 8 heads of 128, static causal mask,
# 512-token blocks, 136 of 256 block pairs visited, 0.778 ms per layer in a 20-layer stack:
# 136 x 4 x 512^2 x 128 x 8 FLOPs / 0.778 ms = 188 TFLOP/s). Taken for the backward kernels too.
SPLASH_RATE = 0.409
BLOCK = 512


def _cost(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("optimal_seconds", float("nan")))


def _stand_in(q, k, v, *args, **kwargs):
    """Attention's inputs and output shapes, no attention: keeps q, k and v (and their projections
    and gradients) in the program at O(T) elementwise cost."""
    return q + (k.mean(axis=1) + v.mean(axis=1))[:, None, :, None, :].astype(q.dtype)


@contextlib.contextmanager
def _patched(attention: str):
    """The program's attention replaced by the stand-in ('none'), and lax.map unrolled."""
    import jax
    import jax.numpy as jnp

    from qedjax.models import kernels

    saved = kernels.attention, jax.lax.map

    def unrolled_map(f, xs):
        n = jax.tree.leaves(xs)[0].shape[0]
        outs = [f(jax.tree.map(lambda x, i=i: x[i], xs)) for i in range(n)]
        return jax.tree.map(lambda *ys: jnp.stack(ys), *outs)

    jax.lax.map = unrolled_map
    if attention == "none":
        kernels.attention = _stand_in
    try:
        yield
    finally:
        kernels.attention, jax.lax.map = saved


CONFIGS = {"sft": "configs/qwen3-4b-sft.yaml", "grpo": "configs/qwen3-4b-grpo.yaml",
           "prefill": "configs/qwen3-4b-grpo-rc.yaml"}


def _program(kind: str, seq: int, layers: int, attention: str, mesh, chips: int, sets=(), rows: int = 1):
    """(jitted fn, abstract args) of one loop-free program with `layers` blocks."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qedjax import fit, train
    from qedjax.config import load_config
    from qedjax.sharding import SUMMARIZER_RULES, activation_sharding, data_sharding

    kernel = {"none": "xla", "dense": "xla"}.get(attention, attention)
    common = [*sets, f"model.attention={kernel}"] + ([f"model.attention_block={seq}"] if attention == "dense" else [])
    if kind == "sft":
        cfg = load_config(CONFIGS[kind], common + [
            f"sft.data.seq_len={seq}", "sft.micro_batches=1", f"sft.global_batch={chips * rows}"])
        [p] = fit.programs(cfg, mesh, ("sft",), layers=layers)
        return p.fn, p.args
    if kind == "grpo":
        cfg = load_config(CONFIGS[kind], common + [
            "grpo.micro_batches=1", "grpo.problems_per_step=1", f"grpo.group_size={chips * rows}",
            f"grpo.sampling.max_new_tokens={seq - fit.DEFAULT_PROMPT_TOKENS + 1}"])
        p = fit.programs(cfg, mesh, ("grpo",), layers=layers)[0]
        assert p.name.endswith(f"x {seq}]"), p.name
        return p.fn, p.args
    # prefill: the summariser's forward over [chips x rows, seq] into a KV cache of seq + 2,048 slots
    cfg = load_config(CONFIGS[kind], common)
    from qedjax.models.qwen3 import KVCache

    config, graphdef, params = train.abstract_params(fit._model_cfg(cfg.model), mesh, SUMMARIZER_RULES, layers=layers)
    params = fit._engine_copy(config, params)
    tokens = jax.ShapeDtypeStruct((chips * rows, seq), jnp.int32, sharding=data_sharding(mesh, SUMMARIZER_RULES))

    def prefill(params, tokens):
        with activation_sharding(mesh, SUMMARIZER_RULES):
            model = nnx.merge(graphdef, params)
            cache = KVCache.init(config, tokens.shape[0], tokens.shape[1] + 2048)
            hidden, cache = model.hidden(tokens, None, jnp.ones_like(tokens), cache)
            return model.logits(hidden[:, -1]), cache

    return jax.jit(prefill), (params, tokens)


def compile_time(kind, seq, layers, attention, mesh, chips, sets=(), rows=1) -> float:
    with _patched(attention):
        fn, args = _program(kind, seq, layers, attention, mesh, chips, sets, rows)
        seconds = _cost(fn.lower(*args).compile())
    print(f"[cost] {kind} T={seq} x {rows} per chip, {layers} blocks, attention {attention}: {seconds * 1e3:.2f} ms", file=sys.stderr,
          flush=True)
    return seconds


def _executed_pairs(t: int, block: int) -> float:
    """Fraction of the T x T block pairs a causal kernel visits (on or below the diagonal)."""
    n = -(-t // block)
    return (n + 1) / (2 * n)


def xla_attention_probe(t: int, mesh, chips: int, backward: bool, m) -> float:
    """The compiler's seconds per executed FLOP of the dense XLA attention (one layer, one row per chip)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from qedjax.models.kernels import reference_causal

    batch = NamedSharding(mesh, P(("data", "fsdp")))
    q = jax.ShapeDtypeStruct((chips, t, m.kv, m.groups, m.head_dim), jnp.bfloat16, sharding=batch)
    kv = jax.ShapeDtypeStruct((chips, t, m.kv, m.head_dim), jnp.bfloat16, sharding=batch)
    seg = jax.ShapeDtypeStruct((chips, t), jnp.int32, sharding=batch)
    if backward:
        def fn(q, k, v, s):
            return jax.grad(lambda q, k, v: reference_causal(q, k, v, s).astype(jnp.float32).sum(), (0, 1, 2))(q, k, v)
    else:
        fn = reference_causal
    seconds = _cost(jax.jit(fn).lower(q, kv, kv, seg).compile())
    products = 6 if backward else 2  # forward QK and PV; the backward adds dV, dP, dQ, dK (dense: all of T x T)
    return seconds / (products * 2 * t * t * m.heads * m.head_dim)


@dataclasses.dataclass(frozen=True)
class Model:
    layers: int
    hidden: int
    heads: int
    kv: int
    head_dim: int
    mlp: int
    vocab: int

    @property
    def groups(self) -> int:
        return self.heads // self.kv

    @property
    def layer_params(self) -> int:
        d, n, k, h = self.hidden, self.heads, self.kv, self.head_dim
        return 2 * d * n * h + 2 * d * k * h + 3 * d * self.mlp

    def model_flops(self, t: int, train: bool) -> float:
        """Per row: matmul FLOPs and causal attention, fwd + bwd (train) or forward only."""
        passes = 3 if train else 1
        head = self.hidden * self.vocab if train else 0  # a prefill projects only its last token
        return passes * (2 * t * (self.layers * self.layer_params + head)
                         + self.layers * 2 * t * t * self.heads * self.head_dim)

    def splash_flops(self, t: int, train: bool) -> float:
        """Executed FLOPs of the splash kernels per row: forward (2 products), dQ (3), dK/dV (4), over
        the visited block pairs. Remat keeps the kernel's output (kernels.REMAT_POLICY): no forward again."""
        products = (2 + 3 + 4) if train else 2
        return self.layers * products * 2 * t * t * self.heads * self.head_dim * _executed_pairs(t, BLOCK)

    def xla_flops(self, t: int, block: int, train: bool, remat: bool = True) -> float:
        """Executed FLOPs of the blockwise XLA path per row: forward (2 products), its backward
        (scores again, dV, dP, dQ, dK: 5), and the forward again under remat."""
        products = (2 + 5 + 2 * remat) if train else 2
        frac = _executed_pairs(t, block) if t > block else 1.0
        return self.layers * products * 2 * t * t * self.heads * self.head_dim * frac


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--program", choices=("sft", "grpo", "prefill"), default="sft")
    p.add_argument("--seq", type=int, nargs="+", default=[2048])
    p.add_argument("--layers", type=int, nargs=2, default=[2, 4])
    p.add_argument("--target", default="v5p:2x2x1")
    p.add_argument("--mesh", default="fsdp=4")
    p.add_argument("--xla-probe", type=int, default=2048, help="T of the dense XLA attention whose rate is used")
    p.add_argument("--rows", type=int, default=1, help="rows per chip in the micro-batch")
    p.add_argument("--set", nargs="*", default=[], help="config overrides (e.g. model.remat=false)")
    p.add_argument("--whole", nargs="*", default=["dense", "splash"],
                   help="also compile at T = --xla-probe with these attentions in the program (dense, splash)")
    args = p.parse_args()

    from qedjax import fit
    from qedjax.config import load_config
    from qedjax.models.qwen3 import PRESETS

    fit._load_libtpu()
    mesh = fit.target_mesh(args.target, args.mesh)
    chips = mesh.devices.size
    peak = PEAK[args.target.split(":")[0]]
    pr = PRESETS["qwen3-4b-thinking-2507"]
    m = Model(pr["num_hidden_layers"], pr["hidden_size"], pr["num_attention_heads"], pr["num_key_value_heads"],
              pr["head_dim"], pr["intermediate_size"], pr["vocab_size"])
    train = args.program != "prefill"
    remat = load_config(CONFIGS[args.program], args.set).model.remat
    a, b = args.layers
    extrapolate = lambda ta, tb: ta + (tb - ta) * (m.layers - a) / (b - a)  # noqa: E731
    xla_rate = xla_attention_probe(args.xla_probe, mesh, chips, train, m)
    for t in args.seq:
        rest = extrapolate(*(compile_time(args.program, t, n, "none", mesh, chips, args.set, args.rows)
                             for n in (a, b)))
        splash_s = args.rows * m.splash_flops(t, train) / (SPLASH_RATE * peak)
        from qedjax.models.qwen3 import flash_block

        block = flash_block(t, 512) or t
        xla_s = args.rows * m.xla_flops(t, block, train, remat) * xla_rate
        flops = args.rows * m.model_flops(t, train)
        row = {"program": args.program, "target": args.target, "mesh": args.mesh, "seq": t, "rows": args.rows,
               "set": args.set,
               "rest_s": rest, "splash_attention_s": splash_s, "xla_attention_s": xla_s,
               "splash_step_s": rest + splash_s, "xla_step_s": rest + xla_s, "model_tflop_per_chip": flops / 1e12,
               "mfu_splash": flops / peak / (rest + splash_s), "mfu_xla": flops / peak / (rest + xla_s),
               "xla_attention_rate_of_peak": 1 / xla_rate / peak}
        if t == args.xla_probe:
            for attention in args.whole:  # the whole program as the compiler sees it, for comparison
                row[f"compiler_{attention}_s"] = extrapolate(
                    *(compile_time(args.program, t, n, attention, mesh, chips, args.set, args.rows) for n in (a, b)))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
