"""Benchmark of the SFT train step: qedjax vs transformers + torch AdamW, MFU, and 4B memory.

1. Step throughput. One random Hugging Face Qwen3 (fp32) is saved and loaded into qedjax with
   convert.load_hf, so both sides start from the same weights. Both run one full optimizer step on
   the same [B, T] batch: forward, masked next-token cross-entropy (mean over the target tokens; the
   first quarter of every row is an unmasked "prompt"), backward, global-norm clipping to 1.0 and
   AdamW (lr 1e-4, betas 0.9/0.999, eps 1e-8, weight decay 0.1 on matrices except the embedding).
   qedjax runs `train.make_train_step` with `sft.sft_loss`, the step the SFT stage runs, on a
   one-device mesh; torch runs `Qwen3ForCausalLM` (train mode, sdpa attention) and
   `torch.optim.AdamW`, in a child process of its own (below). The first two steps of each side are
   checked to give the same losses, a third is untimed too, then rounds alternate one step of each
   side, one side at a time; the jit compile and the first three calls are excluded.
2. MFU = 6 * params * tokens/s / peak (params count the tied embedding once; attention scores are
   not in 6N). The peak is measured, not taken from a data sheet: the best rate of a 3072^3 fp32
   matmul in numpy, jax and torch, measured before and after the steps (the machine may be shared,
   and a busy moment only lowers it), is taken as the achievable peak of these cores.
3. Memory of a qwen3-4b train state on fsdp=8, from the compiled step's memory analysis. A child
   process with 8 fake CPU devices builds the abstract state (eval_shape, ShapeDtypeStructs carrying
   the train shardings), then lowers and compiles the step for a [1, 8, 4096] batch with remat on,
   fp32 parameters and bf16 compute, never allocating the state. Compiling all 36 layers on a small
   CPU is slow, so by default the child compiles 2 and 4 layers and the figures are extrapolated
   linearly per layer (`--memory-layers 2 4 36` compiles the real depth too).
4. With `--grpo`, the GRPO step (`train.make_train_step` with `grpo.make_loss`, default LossConfig,
   temperature 1) joins the rounds on the same batch: the unmasked three quarters of each row are
   the response, with random behaviour logprobs and advantages. It has no torch counterpart; its
   time is reported beside the SFT step's (SFT and GRPO share the step; only the loss differs).

Timings on a shared machine are noisy: figures are medians over rounds, best in brackets, and the
ratio is the median of per-round ratios. Torch steps in a spawned child process with the same core
pinning, so that the two frameworks do not share one process's heap (in one process, one side's
allocations fragment the other's and add page faults to its steps).

Usage:
  .venv/bin/python tools/bench_sft.py                            # bench-100m 2x128 and 4x256, 4B memory
  .venv/bin/python tools/bench_sft.py --batch 8 --seq 512 --repeats 3 --skip-memory
  .venv/bin/python tools/bench_sft.py --skip-step --memory-layers 2 4 36
  .venv/bin/python tools/bench_sft.py --batch 8 --seq 320 --grpo --repeats 3 --skip-memory   # 8 x 240 response tokens
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

# tools/, the script's own folder
from benchlib import ROOT, pin_threads, print_footer, print_header

LR, WEIGHT_DECAY, CLIP = 1e-4, 0.1, 1.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench-100m", help="model preset for the step benchmark")
    p.add_argument("--batch", type=int, nargs="+", default=[2, 4], help="batch sizes, paired with --seq")
    p.add_argument("--seq", type=int, nargs="+", default=[128, 256], help="sequence lengths")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per framework and shape")
    p.add_argument("--torch-optim", default="fused", choices=("default", "foreach", "fused"),
                   help="torch.optim.AdamW implementation (fused is the fastest on CPU)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="cores for both frameworks (default: all this process may use)")
    p.add_argument("--skip-step", action="store_true", help="skip the throughput benchmark")
    p.add_argument("--grpo", action="store_true", help="time the GRPO loss step too (qedjax only)")
    p.add_argument("--skip-memory", action="store_true", help="skip the qwen3-4b memory analysis")
    p.add_argument("--memory-preset", default="qwen3-4b")
    p.add_argument("--memory-layers", type=int, nargs="+", default=[2, 4],
                   help="layer counts to compile; the last two are extrapolated to the preset's depth")
    p.add_argument("--memory-batch", type=int, default=8)
    p.add_argument("--memory-seq", type=int, default=4096)
    p.add_argument("--memory-mesh", default="fsdp=8")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if len(args.batch) != len(args.seq):
        p.error(f"--batch and --seq pair up: got {len(args.batch)} batch sizes and {len(args.seq)} lengths")
    return args


def measure_peak(repeats: int = 3, n: int = 3072) -> dict[str, float]:
    """Best GFLOP/s of an [n, n] x [n, n] fp32 matmul in numpy, jax and torch."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    a, b = (np.random.default_rng(i).standard_normal((n, n), dtype=np.float32) for i in range(2))
    ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
    matmul = jax.jit(jnp.matmul)
    calls = {"numpy": lambda: a @ b, "jax": lambda: matmul(ja, jb).block_until_ready(), "torch": lambda: ta @ tb}
    out = {}
    for name, call in calls.items():
        call()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - start)
        out[name] = 2 * n**3 / best / 1e9
    return out


# ------------------------------------------------------------------------------------------- step


def sft_batch(vocab: int, b: int, t: int, seed: int = 0):
    """One packed-SFT-shaped batch: a document per row, the first quarter a prompt without loss."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (b, t + 1), dtype=np.int32)
    mask = np.ones((b, t), np.int32)
    mask[:, : t // 4] = 0
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
            "segment_ids": np.ones((b, t), np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()}


def grpo_batch(batch, seed: int = 1):
    """The SFT batch plus what a GRPO step reads: behaviour logprobs, advantages, token weights."""
    import numpy as np

    rng = np.random.default_rng(seed)
    b, t = batch["tokens"].shape
    mask = batch["loss_mask"].astype(np.float32)
    return dict(batch, behaviour_logp=(-rng.exponential(2.0, (b, t)) * mask).astype(np.float32),
                ref_logp=np.zeros((b, t), np.float32), weight=mask,
                advantage=rng.choice([-1.0, 1.0], b).astype(np.float32))


def qedjax_trainer(model_dir: str, batch, grpo: bool = False, overrides: dict | None = None):
    """(step() -> loss, flops per step): the SFT (or GRPO) stage's jitted step on a one-device mesh.

    `overrides`: Qwen3Config run fields to set over the stage's own."""
    import dataclasses

    import jax

    from qedjax import convert, sft, train
    from qedjax import grpo as grpo_lib
    from qedjax.config import ModelConfig
    from qedjax.optim import OptimConfig, make_optimizer
    from qedjax.sharding import TRAIN_RULES, make_mesh, state_shardings

    mesh = make_mesh("", devices=jax.devices()[:1])
    # the model as the SFT stage builds it from `model.hf_path`
    config = dataclasses.replace(train.model_config(ModelConfig(hf_path=model_dir)), **(overrides or {}))
    _, abstract = convert.abstract_model(config)
    _, graphdef, params = convert.load_params(model_dir, dtype="float32", config=config,
                                              shardings=state_shardings(abstract, mesh, TRAIN_RULES))
    optimizer = make_optimizer(OptimConfig(lr=LR, schedule="constant", warmup_ratio=0.0,
                                           weight_decay=WEIGHT_DECAY, clip_norm=CLIP), 1000)
    state, shardings = train.init_state(params, optimizer, mesh)
    batch_sh = {k: train.micro_batch_sharding(mesh, TRAIN_RULES, v.ndim + 1) for k, v in batch.items()}
    if grpo:
        cfg = grpo_lib.LossConfig()
        loss_fn, normalizer = grpo_lib.make_loss(cfg, 1.0), grpo_lib.normalizer(cfg.aggregation, len(batch["tokens"]))
    else:
        loss_fn, normalizer = sft.sft_loss, sft.target_tokens
    step_fn = train.make_train_step(graphdef, loss_fn, normalizer, optimizer, shardings, batch_sh, mesh, TRAIN_RULES)
    device_batch = train.put_batch({k: v[None] for k, v in batch.items()}, mesh, TRAIN_RULES)
    start = time.perf_counter()
    compiled = step_fn.lower(state, device_batch).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    flops = (cost[0] if isinstance(cost, list) else cost).get("flops", float("nan"))
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], device_batch)
        return float(jax.block_until_ready(metrics)["loss"])

    return step, flops, compile_s


def timed(step):
    """(seconds, loss) of one call of `step`."""
    start = time.perf_counter()
    loss = step()
    return time.perf_counter() - start, loss


def torch_worker(conn, model_dir: str, batch, impl: str, threads: int):
    """The torch side in a spawned child: the parent's pinning, the model loaded from the checkpoint
    qedjax loads, then one timed step per True received, until False."""
    try:
        pin_threads(threads)
        import torch
        import transformers

        model = transformers.Qwen3ForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
        step = torch_trainer(model, batch, impl)
        conn.send(("ready", f"torch {torch.__version__} ({torch.get_num_threads()} threads, "
                            f"attn={model.config._attn_implementation})"))
        while conn.recv():
            conn.send(("step", timed(step)))
    except Exception:  # noqa: BLE001 (the parent reports it and stops)
        import traceback

        conn.send(("error", traceback.format_exc()))


class TorchChild:
    """`torch_worker` in a spawned process; `step()` -> (seconds, loss) as `timed` gives them."""

    def __init__(self, model_dir: str, batch, impl: str, threads: int):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=torch_worker, args=(child, model_dir, batch, impl, threads),
                                daemon=True)
        self.proc.start()
        self.describe = self._reply("ready")

    def _reply(self, kind: str):
        try:
            what, value = self.conn.recv()
        except EOFError:  # it died without a word (a signal, the OOM killer)
            self.proc.join(timeout=60)
            what, value = "error", f"it exited with code {self.proc.exitcode}"
        if what != kind:
            self.close()
            raise SystemExit(f"the torch child process failed:\n{value}")
        return value

    def step(self):
        self.conn.send(True)
        return self._reply("step")

    def close(self):
        try:
            self.conn.send(False)
        except OSError:  # it has exited already
            pass
        self.proc.join(timeout=60)


def torch_trainer(model, batch, impl: str):
    """step() -> loss: the same step as a plain transformers + torch.optim.AdamW loop."""
    import torch
    import torch.nn.functional as F

    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed_tokens" not in n)]
    kwargs = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.999), eps=1e-8, **kwargs)
    tokens = torch.as_tensor(batch["tokens"], dtype=torch.long)
    targets = torch.as_tensor(batch["targets"], dtype=torch.long).flatten()
    mask = torch.as_tensor(batch["loss_mask"], dtype=torch.float32).flatten()

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=tokens, use_cache=False).logits  # [B, T, V] fp32
        loss = (F.cross_entropy(logits.flatten(0, 1), targets, reduction="none") * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        return float(loss.detach())

    return step


def bench_step(args) -> list[dict]:
    import jax

    from qedjax.models.qwen3 import Qwen3Config

    sys.path.insert(0, ROOT)
    from tests.hf_utils import random_hf_model

    cfg = Qwen3Config.preset(args.preset)
    rows = []
    for b, t in zip(args.batch, args.seq):
        batch = sft_batch(cfg.vocab_size, b, t)
        hf = random_hf_model(cfg)
        n_params = sum(p.numel() for p in hf.parameters())  # tied embedding counted once
        with tempfile.TemporaryDirectory(prefix="bench-sft-") as d:
            hf.save_pretrained(d)
            del hf  # the child loads its own copy
            jax_step, hlo_flops, compile_s = qedjax_trainer(d, batch)
            grpo_step = qedjax_trainer(d, grpo_batch(batch), grpo=True)[0] if args.grpo else None
            child = TorchChild(d, batch, args.torch_optim, args.threads)
        if not rows:
            print(f"# {args.preset}: {n_params / 1e6:.1f}M params, fp32, AdamW ({args.torch_optim} in torch); "
                  f"{child.describe}, in a child process; jax {jax.__version__}", flush=True)
        steps = {"jax": lambda: timed(jax_step), "torch": child.step,
                 **({"grpo": lambda: timed(grpo_step)} if args.grpo else {})}
        first = [(steps["jax"](), steps["torch"]()) for _ in range(2)]  # warm-up and parity
        (jax_first, jax_loss0), (torch_first, torch_loss0) = first[0]
        (_, jax_loss1), (_, torch_loss1) = first[1]
        for i, (a, c) in enumerate(((jax_loss0, torch_loss0), (jax_loss1, torch_loss1))):
            if abs(a - c) > 1e-3 * abs(c):
                raise SystemExit(f"losses disagree at {b}x{t} step {i}: qedjax {a:.6f}, torch {c:.6f}")
        for name in steps:  # one more untimed step each
            steps[name]()
        times = {name: [] for name in steps}
        for r in range(args.repeats):
            for name in list(steps) if r % 2 == 0 else list(steps)[::-1]:
                times[name].append(steps[name]()[0])
        child.close()
        t_jax, t_torch = times["jax"], times["torch"]
        row = dict(batch=b, seq=t, tokens=b * t, params=n_params, compile_s=compile_s, jax_first_s=jax_first,
                   torch_first_s=torch_first, losses=[[jax_loss0, torch_loss0], [jax_loss1, torch_loss1]],
                   hlo_gflop=hlo_flops / 1e9, jax_s=t_jax, torch_s=t_torch)
        rows.append(row)
        print(f"# {b}x{t}: qedjax {[round(x, 2) for x in t_jax]} s, torch {[round(x, 2) for x in t_torch]} s",
              flush=True)
        if args.grpo:
            row["grpo_s"] = times["grpo"]
            print(f"# {b}x{t}: qedjax GRPO step {[round(x, 2) for x in times['grpo']]} s: "
                  f"{b * t / statistics.median(times['grpo']):.0f} tok/s, GRPO / SFT step time "
                  f"{statistics.median(g / j for g, j in zip(times['grpo'], t_jax)):.2f}", flush=True)
        del jax_step, grpo_step
    return rows


def print_step_table(rows: list[dict], peak: float):
    print(f"{'B x T':>11} | {'qedjax tok/s':>14} | {'torch tok/s':>14} | {'qedjax/torch':>12} | "
          f"{'MFU jax':>7} | {'MFU torch':>9} | {'HLO GFLOP/s':>11} | {'compile s':>9} | losses step 0, 1")
    for row in rows:
        print_step_row(row, peak)


def print_step_row(row: dict, peak: float):
    med_j, med_t = statistics.median(row["jax_s"]), statistics.median(row["torch_s"])
    ratio = statistics.median(t / j for j, t in zip(row["jax_s"], row["torch_s"]))
    tok, six_n = row["tokens"], 6 * row["params"]
    mfu = lambda s: 100 * six_n * tok / s / 1e9 / peak  # noqa: E731
    print(f"{row['batch']:>4} x {row['seq']:<4} | {tok / med_j:>5.0f} [{tok / min(row['jax_s']):>5.0f}] | "
          f"{tok / med_t:>5.0f} [{tok / min(row['torch_s']):>5.0f}] | {ratio:>12.2f} | {mfu(med_j):>6.1f}% | "
          f"{mfu(med_t):>8.1f}% | {row['hlo_gflop'] / med_j:>11.0f} | {row['compile_s']:>9.1f} | "
          f"{row['losses'][0][0]:.4f}/{row['losses'][0][1]:.4f}, {row['losses'][1][0]:.4f}/{row['losses'][1][1]:.4f}",
          flush=True)


# ----------------------------------------------------------------------------------------- memory


def memory_child(args):
    """Runs with 8 fake CPU devices: compiles the step of each layer count, prints one JSON line each."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from qedjax import convert, sft, train
    from qedjax.models.qwen3 import Qwen3Config
    from qedjax.optim import OptimConfig, make_optimizer
    from qedjax.sharding import TRAIN_RULES, make_mesh, state_shardings

    mesh = make_mesh(args.memory_mesh)
    b, t = args.memory_batch, args.memory_seq
    for layers in args.memory_layers:
        cfg = Qwen3Config.preset(args.memory_preset, num_hidden_layers=layers, remat=True,
                                 param_dtype="float32", dtype="bfloat16")
        graphdef, abstract = convert.abstract_model(cfg)
        param_sh = state_shardings(abstract, mesh, TRAIN_RULES)
        params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              nnx.to_pure_dict(abstract), param_sh)
        optimizer = make_optimizer(OptimConfig(weight_decay=WEIGHT_DECAY), 1000)
        # The shardings init_state gives the optimizer state, here from shapes alone.
        opt_sh = train._opt_shardings(jax.eval_shape(optimizer.init, params), param_sh, mesh)
        shardings = {"params": param_sh, "opt_state": opt_sh, "step": NamedSharding(mesh, P())}
        state = train.abstract_state(shardings, params, optimizer)
        batch_sh = {k: train.micro_batch_sharding(mesh, TRAIN_RULES, 3) for k in
                    ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
        batch = {k: jax.ShapeDtypeStruct((1, b, t), jnp.int32, sharding=s) for k, s in batch_sh.items()}
        step_fn = train.make_train_step(graphdef, sft.sft_loss, sft.target_tokens, optimizer, shardings, batch_sh,
                                        mesh, TRAIN_RULES)
        start = time.perf_counter()
        compiled = step_fn.lower(state, batch).compile()
        seconds = time.perf_counter() - start
        m = compiled.memory_analysis()
        state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) / mesh.size
        print(json.dumps(dict(layers=layers, compile_s=seconds, state_bytes=state_bytes,
                              argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
                              alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes,
                              code=m.generated_code_size_in_bytes)), flush=True)


def bench_memory(args) -> list[dict]:
    from qedjax.models.qwen3 import PRESETS

    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", "--memory-preset", args.memory_preset,
           "--memory-batch", str(args.memory_batch), "--memory-seq", str(args.memory_seq),
           "--memory-mesh", args.memory_mesh, "--memory-layers", *map(str, args.memory_layers)]
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                                      " --xla_force_host_platform_device_count=8").strip())
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=env)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    depth = PRESETS[args.memory_preset]["num_hidden_layers"]
    if depth not in [r["layers"] for r in rows] and len(rows) >= 2:
        a, c = rows[-2], rows[-1]
        extra = {k: a[k] + (c[k] - a[k]) * (depth - a["layers"]) / (c["layers"] - a["layers"])
                 for k in ("state_bytes", "argument", "output", "alias", "temp", "code")}
        rows.append(dict(extra, layers=depth, compile_s=float("nan"), extrapolated=True))
    gib = 2**30
    print(f"# {args.memory_preset} train step on {args.memory_mesh} (8 fake CPU devices), batch "
          f"[1, {args.memory_batch}, {args.memory_seq}], remat, fp32 params + AdamW, bf16 compute; "
          f"compiled.memory_analysis() per device")
    print(f"{'layers':>10} | {'state':>9} | {'arguments':>9} | {'outputs':>9} | {'aliased':>9} | {'temp':>9} | "
          f"{'peak est.':>9} | {'compile s':>9}")
    for r in rows:
        peak = r["argument"] + r["output"] - r["alias"] + r["temp"]
        label = f"{r['layers']}{' (extr.)' if r.get('extrapolated') else ''}"
        print(f"{label:>10} | " + " | ".join(f"{r[k] / gib:>5.2f} GiB" for k in
                                             ("state_bytes", "argument", "output", "alias", "temp"))
              + f" | {peak / gib:>5.2f} GiB | {r['compile_s']:>9.0f}", flush=True)
    return rows


def main(argv=None):
    args = parse_args(argv)
    pin_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return
    print_header()
    if not args.skip_step:
        before = measure_peak()
        print("# matmul GFLOP/s before: " + ", ".join(f"{k} {v:.0f}" for k, v in before.items()), flush=True)
        rows = bench_step(args)
        after = measure_peak()
        peak = max(*before.values(), *after.values())
        print("# matmul GFLOP/s after: " + ", ".join(f"{k} {v:.0f}" for k, v in after.items()) +
              f"; achievable peak (best 3072^3 fp32 matmul) {peak:.0f} GFLOP/s", flush=True)
        print_step_table(rows, peak)
    if not args.skip_memory:
        bench_memory(args)
    print_footer()


if __name__ == "__main__":
    main()
