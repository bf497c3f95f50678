"""CPU benchmark: qedjax forward pass vs transformers on PyTorch, and checkpoint load time and memory.

1. Forward: one random Hugging Face Qwen3 (fp32) is saved and loaded into qedjax with convert.load_hf,
   so both run the same weights. The jitted qedjax forward and `model(tokens)` in torch (eval,
   no_grad, use_cache=False, sdpa attention) are timed in alternation, one call each per round, on
   the same [B, T] tokens; both return fp32 logits [B, T, V]. The jit compile is timed on its own and
   excluded from throughput. Logits are compared first, so both sides compute the same thing.
2. Load: a random checkpoint of a preset's shape (qwen3-0.6b by default) is streamed to disk once,
   then `convert.load_hf` and `AutoModelForCausalLM.from_pretrained` each load it in a fresh
   subprocess; the child reports seconds and peak RSS (ru_maxrss, reset after imports through
   /proc/self/clear_refs) above its RSS after imports. RSS counts the pages of a memory-mapped file
   that the process has touched. The file is read once before the first child, so every load reads
   it from the page cache. qedjax's writer starts the tensor data 64-byte aligned, which lets
   load_hf on CPU keep the file's pages as the parameters, as from_pretrained does; the header line
   says whether the checkpoint is (one from another writer may not be: then every tensor is copied).

Threads: `--threads N` pins the whole process (and the load children) to N cores with
sched_setaffinity before jax or torch start; XLA's CPU thread pool sizes itself to the cores it may
use, and torch.set_num_threads(N) is set to match.

Timings on a shared machine are noisy: rounds alternate which framework goes first, figures are the
median over rounds (best in brackets), and the ratio is the median of per-round ratios. "contention"
is the median share of each call's wall time during which some task waited for a CPU (Linux PSI);
figures with more than a few percent were taken while other jobs shared the cores. Under contention
torch's OpenMP threads spin while they wait for each other, so its CPU s/call grows and it slows
down more than XLA does.

Usage:
  .venv/bin/python tools/bench_forward.py                      # bench-100m, 4x256 and 1x1024, load test
  .venv/bin/python tools/bench_forward.py --batch 8 --seq 128 --repeats 9 --skip-load
  .venv/bin/python tools/bench_forward.py --skip-forward --load-dtype bfloat16  # the load alone
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

# tools/, the script's own folder
from benchlib import ROOT, pin_threads, print_footer, print_header

# transformers maps safetensors lazily: a weight costs time and memory only when first read, so
# "transformers+read" also reads every weight once, which is when a first forward would pay for it.
LOADERS = ("qedjax", "transformers", "transformers+read")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench-100m", help="model preset for the forward benchmark")
    p.add_argument("--batch", type=int, nargs="+", default=[4, 1], help="batch sizes, paired with --seq")
    p.add_argument("--seq", type=int, nargs="+", default=[256, 1024], help="sequence lengths")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per framework and shape")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="cores for both frameworks (default: all this process may use)")
    p.add_argument("--skip-load", action="store_true", help="skip the load-time benchmark")
    p.add_argument("--skip-forward", action="store_true", help="skip the forward benchmark (load only)")
    p.add_argument("--load-preset", default="qwen3-0.6b", help="model shape of the load benchmark")
    p.add_argument("--load-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype of the checkpoint on disk and of both loaded models")
    p.add_argument("--load-repeats", type=int, default=3, help="fresh subprocesses per loader")
    p.add_argument("--ckpt-dir", default=None,
                   help="where the random load checkpoint lives (reused if present; default under /tmp)")
    p.add_argument("--load-child", choices=LOADERS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if len(args.batch) != len(args.seq):
        p.error(f"--batch and --seq pair up: got {len(args.batch)} batch sizes and {len(args.seq)} lengths")
    return args


def rss_mib() -> tuple[float, float]:
    """(peak RSS so far, current RSS) of this process in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    with open("/proc/self/status") as f:
        current = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    return peak, current


# ----------------------------------------------------------------------------------------- forward


def bench_forward(args) -> list[dict]:
    import jax
    import numpy as np
    import torch
    from flax import nnx

    from qedjax import convert, train
    from qedjax.config import ModelConfig
    from qedjax.models.qwen3 import Qwen3Config

    sys.path.insert(0, ROOT)
    from tests.hf_utils import random_hf_model

    torch.set_num_threads(args.threads)
    cfg = Qwen3Config.preset(args.preset)
    hf = random_hf_model(cfg).eval()
    with tempfile.TemporaryDirectory(prefix="bench-forward-") as d:
        hf.save_pretrained(d)
        # the model as the stages build it from `model.hf_path` (the attention blocking is the backend's)
        model = convert.load_hf(d, dtype="float32", config=train.model_config(ModelConfig(hf_path=d)))
    graphdef, state = nnx.split(model)
    n_params = sum(x.size for x in jax.tree.leaves(state))
    print(f"# {args.preset}: {n_params / 1e6:.1f}M params, fp32; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads, attn={hf.config._attn_implementation}), "
          f"jax {jax.__version__} ({jax.devices()[0].platform}, XLA uses every pinned core)", flush=True)

    @jax.jit
    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    rows = []
    for b, t in zip(args.batch, args.seq):
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t), dtype=np.int32)
        tokens_pt = torch.as_tensor(tokens, dtype=torch.long)

        compile_s, _, _, compiled = timed(lambda: forward.lower(state, tokens).compile())
        cost = compiled.cost_analysis()
        flops = (cost[0] if isinstance(cost, list) else cost).get("flops", float("nan"))

        def run_jax():
            return timed(lambda: jax.block_until_ready(compiled(state, tokens)))

        def run_torch():
            with torch.no_grad():
                return timed(lambda: hf(tokens_pt, use_cache=False).logits)

        jax_first, _, _, ours = run_jax()  # first calls pay for allocation and library caches
        torch_first, _, _, theirs = run_torch()
        ours, theirs = np.asarray(ours), theirs.numpy()
        max_diff = float(np.abs(ours - theirs).max())
        scale = float(np.abs(theirs).max())
        if not max_diff <= 1e-3 * max(scale, 1.0):
            raise SystemExit(f"logits disagree at {b}x{t}: max abs diff {max_diff:.3g} (max |logit| {scale:.3g})")

        samples: dict[str, list[tuple]] = {"jax": [], "torch": []}  # (wall, cpu, contention) per call
        for r in range(args.repeats):
            for name in ("jax", "torch") if r % 2 == 0 else ("torch", "jax"):
                samples[name].append((run_jax if name == "jax" else run_torch)()[:3])
        row = dict(batch=b, seq=t, compile_s=compile_s, jax_first_s=jax_first, torch_first_s=torch_first,
                   max_abs_diff=max_diff, max_abs_logit=scale, gflop=flops / 1e9)
        for name, runs in samples.items():
            row.update({f"{name}_wall": [x[0] for x in runs], f"{name}_cpu": [x[1] for x in runs],
                        f"{name}_stall": [x[2] for x in runs]})
        rows.append(row)
        print_forward_row(row, header=len(rows) == 1)
    for row in rows:
        print(f"# {row['batch']}x{row['seq']}: {row['gflop']:.0f} GFLOP per call (XLA cost analysis); first call "
              f"after compile: qedjax {row['jax_first_s']:.2f}s, torch {row['torch_first_s']:.2f}s; "
              f"max |logit| {row['max_abs_logit']:.1f}")
    return rows


def cpu_stall_us() -> float:
    """Microseconds any task on this machine has waited for a CPU (Linux PSI); NaN where unavailable.

    Alone on its cores, a run barely moves it; other people's jobs on the same cores show up here.
    """
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().rsplit("total=", 1)[1])
    except (OSError, IndexError, ValueError):
        return float("nan")


def timed(fn):
    """(wall seconds, process CPU seconds, fraction of the wall time with CPU contention, result)."""
    wall, cpu, stall = time.perf_counter(), time.process_time(), cpu_stall_us()
    out = fn()
    wall = time.perf_counter() - wall
    return wall, time.process_time() - cpu, (cpu_stall_us() - stall) / 1e6 / wall, out


def print_forward_row(row: dict, header: bool):
    """tok/s from the median wall time [best]; the ratio is the median of per-round ratios."""
    med = statistics.median
    tokens = row["batch"] * row["seq"]
    ratio = med(t / j for j, t in zip(row["jax_wall"], row["torch_wall"]))
    if header:
        print(f"{'B x T':>13} | {'qedjax tok/s':>15} | {'torch tok/s':>15} | {'qedjax/torch':>12} | "
              f"{'CPU s/call jax, torch':>21} | {'contention':>10} | {'jit compile s':>13} | {'max|dlogit|':>11}")
    print(f"{row['batch']:>5} x {row['seq']:<5} | {tokens / med(row['jax_wall']):>6.0f} [{tokens / min(row['jax_wall']):>6.0f}] | "
          f"{tokens / med(row['torch_wall']):>6.0f} [{tokens / min(row['torch_wall']):>6.0f}] | {ratio:>12.2f} | "
          f"{med(row['jax_cpu']):>10.2f}, {med(row['torch_cpu']):>8.2f} | "
          f"{med(row['jax_stall'] + row['torch_stall']):>10.0%} | {row['compile_s']:>13.2f} | "
          f"{row['max_abs_diff']:>11.1e}", flush=True)


# -------------------------------------------------------------------------------------------- load


def write_random_checkpoint(preset: str, dtype: str, out_dir: str):
    """A random HF checkpoint of `preset`'s shape, streamed tensor by tensor (never whole in memory)."""
    import functools

    import numpy as np
    from flax import nnx

    from qedjax import convert
    from qedjax.models.qwen3 import Qwen3Config
    from qedjax.safetensors_io import write_safetensors

    cfg = Qwen3Config.preset(preset, param_dtype=dtype, dtype=dtype)
    abstract = nnx.to_pure_dict(convert.abstract_model(cfg)[1])
    np_dtype = convert.NP_DTYPES[dtype]
    specs = {}
    for key in convert.key_table(cfg):
        ours = functools.reduce(lambda tree, k: tree[k], key.path, abstract)
        specs[key.hf] = (convert.hf_shape(tuple(ours.shape), key.layout), np_dtype)
    rng = np.random.default_rng(0)

    def produce(name):
        shape = specs[name][0]
        if name.endswith("norm.weight"):
            return np.ones(shape, np_dtype)
        return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np_dtype)

    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(out_dir))
    write_safetensors(os.path.join(tmp, "model.safetensors"), specs, produce)
    hf_config = dict(cfg.to_hf(), torch_dtype=dtype, dtype=dtype)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    os.rename(tmp, out_dir)


def load_child(args):
    """Runs in a fresh subprocess: imports one loader's stack, then loads and reports JSON on stdout."""
    if args.load_child == "qedjax":
        import jax
        from flax import nnx

        from qedjax import convert

        jax.devices()  # start the CPU client before the baseline

        def load():
            model = convert.load_hf(args.ckpt_dir, dtype=args.load_dtype)
            jax.block_until_ready(nnx.state(model))
            return model
    else:
        import importlib

        import torch
        import transformers

        importlib.import_module("transformers.models.qwen3.modeling_qwen3")  # else imported inside the load

        torch.set_num_threads(args.threads)

        def load():
            model = transformers.AutoModelForCausalLM.from_pretrained(
                args.ckpt_dir, dtype=getattr(torch, args.load_dtype))
            if args.load_child == "transformers+read":
                with torch.no_grad():
                    for p in model.parameters():
                        p.sum()
            return model
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (ru_maxrss) to the RSS now
        f.write("5")
    _, base = rss_mib()
    start = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - start
    peak, now = rss_mib()
    del model
    print(json.dumps(dict(seconds=seconds, base_mib=base, peak_above_mib=peak - base, after_above_mib=now - base)))


def bench_load(args) -> dict:
    ckpt = args.ckpt_dir or os.path.join(tempfile.gettempdir(), "qedjax-bench-load",
                                         f"{args.load_preset}-{args.load_dtype}")
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        os.makedirs(os.path.dirname(ckpt), exist_ok=True)
        start = time.perf_counter()
        write_random_checkpoint(args.load_preset, args.load_dtype, ckpt)
        print(f"# wrote {ckpt} in {time.perf_counter() - start:.1f}s", flush=True)
    size = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt))
    with open(os.path.join(ckpt, "model.safetensors"), "rb") as f:  # into the page cache for both
        while f.read(1 << 26):
            pass
    results: dict[str, list[dict]] = {loader: [] for loader in LOADERS}
    for r in range(args.load_repeats):
        for loader in LOADERS if r % 2 == 0 else LOADERS[::-1]:
            cmd = [sys.executable, os.path.abspath(__file__), "--load-child", loader, "--ckpt-dir", ckpt,
                   "--load-dtype", args.load_dtype, "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
            results[loader].append(json.loads(out.stdout.strip().splitlines()[-1]))
    with open(os.path.join(ckpt, "model.safetensors"), "rb") as f:
        data_start = 8 + int.from_bytes(f.read(8), "little")
    print(f"# load {args.load_preset} as {args.load_dtype} from {ckpt} ({size / 2**30:.2f} GiB on disk, "
          f"page cache warm, tensor data {'' if data_start % 64 == 0 else 'NOT '}64-byte aligned), "
          f"{args.load_repeats} fresh subprocesses each")
    print(f"{'loader':>17} | {'seconds':>15} | {'peak RSS above base':>19} | {'RSS after load':>14} | "
          f"{'base RSS':>8}")
    for loader, runs in results.items():
        med = {key: statistics.median(x[key] for x in runs) for key in runs[0]}
        print(f"{loader:>17} | {med['seconds']:>6.2f} [{min(x['seconds'] for x in runs):>6.2f}] | "
              f"{med['peak_above_mib']:>15.0f} MiB | {med['after_above_mib']:>10.0f} MiB | "
              f"{med['base_mib']:>4.0f} MiB")
    return dict(checkpoint=ckpt, size_bytes=size, results=results)


def main(argv=None):
    args = parse_args(argv)
    pin_threads(args.threads, torch_threads=False)  # the qedjax load child must not import torch
    if args.load_child:
        load_child(args)
        return
    print_header()
    if not args.skip_forward:
        bench_forward(args)
    if not args.skip_load:
        bench_load(args)
    print_footer()


if __name__ == "__main__":
    main()
