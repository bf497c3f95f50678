"""Peak host memory of `qedjax.export` on a model of a given preset (random params, no download).

    python tools/bench_export.py [--preset qwen3-0.6b] [--dtype bfloat16] [--devices 1] [--dir DIR]

Two fresh processes: the first creates random params in their shards and saves them with the
project's Checkpointer (an Orbax checkpoint like SFT's); the second imports everything, records
its resident-set high-water mark (ru_maxrss) as the baseline, runs export.run on the checkpoint and
reports the high-water mark minus the baseline, next to the size of the parameters and of the
largest tensor (export restores a group of parameters at a time: the embedding is the biggest one).
On CPU the "device" memory that holds restored parameters is host memory, so the figure counts them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _config(preset: str, dtype: str, run_dir: str, mesh: str):
    from qedjax.config import Config, ModelConfig, RunConfig

    return Config(run=RunConfig(dir=run_dir, mesh=mesh), model=ModelConfig(preset=preset, param_dtype=dtype,
                                                                           dtype=dtype))


def save(args) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qedjax import sharding
    from qedjax.checkpoint import CheckpointConfig, Checkpointer
    from qedjax.train import model_config
    from qedjax.models.qwen3 import Qwen3

    cfg = _config(args.preset, args.dtype, args.dir, args.mesh)
    mesh = sharding.make_mesh(cfg.run.mesh)
    config = model_config(cfg.model)
    _, params = sharding.init_sharded(lambda: Qwen3(config, rngs=nnx.Rngs(0)), mesh, sharding.TRAIN_RULES)
    ckpt = Checkpointer(os.path.join(args.dir, "sft", "checkpoints"), CheckpointConfig(async_save=False))
    state = {"params": params, "opt_state": {}, "step": jnp.zeros((), jnp.int32)}
    ckpt.save(1, state, {}, force=True)
    ckpt.close()
    leaves = jax.tree.leaves(params)
    print(json.dumps({"params": int(sum(x.size for x in leaves)), "param_bytes": int(sum(x.nbytes for x in leaves)),
                      "largest_bytes": int(max(x.nbytes for x in leaves))}))


def export(args) -> None:
    import jax

    from qedjax import export as export_lib, sharding

    cfg = _config(args.preset, args.dtype, args.dir, args.mesh)
    mesh = sharding.make_mesh(cfg.run.mesh)
    jax.numpy.zeros(1).block_until_ready()  # backend up before the baseline
    baseline = _maxrss_bytes()
    t0 = time.perf_counter()
    out = export_lib.run(cfg, mesh, args.dir, out=os.path.join(args.dir, "hf"))
    total_s = time.perf_counter() - t0
    peak = _maxrss_bytes()
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    print(json.dumps({"baseline_rss": baseline, "peak_rss": peak, "peak_minus_baseline": peak - baseline,
                      "total_s": total_s, "files": files,
                      "out_bytes": sum(os.path.getsize(os.path.join(out, f)) for f in files)}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-0.6b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--devices", type=int, default=1, help="fake CPU devices (the mesh is fsdp=N)")
    p.add_argument("--dir", help="scratch directory (default: a temporary one, removed afterwards)")
    p.add_argument("--phase", choices=["save", "export"], help=argparse.SUPPRESS)
    args = p.parse_args()
    args.mesh = f"fsdp={args.devices}"
    if args.phase:
        (save if args.phase == "save" else export)(args)
        return 0
    scratch = args.dir or tempfile.mkdtemp(prefix="bench_export-")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}")
    base = [sys.executable, __file__, "--preset", args.preset, "--dtype", args.dtype, "--devices",
            str(args.devices), "--dir", scratch]
    try:
        saved = json.loads(subprocess.run(base + ["--phase", "save"], env=env, check=True, capture_output=True,
                                          text=True).stdout.strip().splitlines()[-1])
        run = subprocess.run(base + ["--phase", "export"], env=env, check=True, capture_output=True, text=True)
        got = json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)
    gib = 2**30
    size = saved["param_bytes"]
    print(f"preset {args.preset} {args.dtype}: {saved['params'] / 1e6:.0f}M params, {size / gib:.2f} GiB; "
          f"mesh fsdp={args.devices} on CPU")
    print(f"  export wrote {got['out_bytes'] / gib:.2f} GiB in {len(got['files'])} file(s) in {got['total_s']:.1f}s")
    peak, largest = got["peak_minus_baseline"], saved["largest_bytes"]
    print(f"  peak RSS - baseline: {peak / gib:.2f} GiB = {peak / size:.2f}x the params = {peak / largest:.1f}x "
          f"the largest tensor ({largest / 2**20:.0f} MiB); baseline {got['baseline_rss'] / gib:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
