"""Benchmark of the SFT input: start-up time (launch to the first SFT step) and peak host memory for
a data set of FineProofs-SFT's shape, generated locally.

FineProofs-SFT has 7,777 rows (4,281 unique problems) of a problem, a long thinking block and a
proof, 8k-49k tokens each. This script writes that shape with the demo's byte-level BPE tokenizer
(qedjax/toy.py, 512 tokens): --rows rows whose token counts are drawn uniformly from
[--min-tokens, --max-tokens] (words of random digits; a row's length is calibrated on the
tokenizer, within a few percent), in the columns problem / reasoning_content / proof. It then runs
`python -m qedjax.launch` on a tiny model (preset tiny, sft.steps=1 unless --epochs) and measures:
- start-up: from the launch of the process(es) to the first SFT step's metrics row on disk
  (tokenizer, reading and checking rows, the model's init, the step's compilation and the step);
- peak host memory: the maximum resident set of each launched process (getrusage of the child).

`--root` picks the qedjax checkout the launch imports (PYTHONPATH), so one command measures the
code before and after a change on the same data:
  .venv/bin/python tools/bench_input.py --rows 4281                    # this checkout
  .venv/bin/python tools/bench_input.py --rows 4281 --root ../main     # another checkout
  .venv/bin/python tools/bench_input.py --rows 4281 --processes 2      # two jax.distributed processes
  .venv/bin/python tools/bench_input.py --rows 4281 --epochs 1         # step count from one epoch's rows

The data and tokenizer are cached in --work (reused when the same shape is asked again). The model
step is cheap on purpose (tiny preset, --seq-len 8192, longer rows truncated by data.overlong): what
is measured is the input, not the model.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time

import yaml

# tools/, the script's own folder
from benchlib import ROOT, print_footer, print_header


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=4281, help="rows (FineProofs-SFT's unique subset: 4,281)")
    p.add_argument("--min-tokens", type=int, default=8192)
    p.add_argument("--max-tokens", type=int, default=49152)
    p.add_argument("--seq-len", type=int, default=8192, help="sft.data.seq_len (longer rows are truncated)")
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--processes", type=int, default=1, help="jax.distributed processes (8 CPU devices in all)")
    p.add_argument("--epochs", type=float, default=None,
                   help="run by epochs (the step count needs one epoch's packed rows) instead of sft.steps=1")
    p.add_argument("--root", default=ROOT, help="the qedjax checkout to launch (its PYTHONPATH)")
    p.add_argument("--work", default="/tmp/qedjax_bench_input", help="cache of the data and the tokenizer")
    p.add_argument("--timeout", type=float, default=3600, help="hang guard per launch, seconds")
    return p.parse_args(argv)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(str(rng.randrange(10 ** rng.randint(1, 6))) for _ in range(n))


def write_data(args, tokenizer_dir: str, path: str) -> dict:
    """FineProofs-SFT-shaped rows: a short problem, a long thinking block, a proof (~1/4 of the
    thinking). Returns the shape actually written (tokens of the sampled rows, by the tokenizer)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(0)
    sample = _words(rng, 4000)
    words_per_token = 4000 / len(tok(sample, add_special_tokens=False)["input_ids"])
    lengths, checked = [], []
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for i in range(args.rows):
            target = rng.randint(args.min_tokens, args.max_tokens)
            problem = "Prove that " + _words(rng, int(200 * words_per_token))
            rest = int((target - 200) * words_per_token)
            row = {"problem": problem, "reasoning_content": _words(rng, rest * 4 // 5),
                   "proof": _words(rng, rest - rest * 4 // 5)}
            f.write(json.dumps(row) + "\n")
            lengths.append(target)
            if i % max(1, args.rows // 20) == 0:  # measure a sample: the calibration's error
                text = row["problem"] + row["reasoning_content"] + row["proof"]
                checked.append((target, len(tok(text, add_special_tokens=False)["input_ids"])))
    os.replace(tmp, path)
    return {"rows": args.rows, "tokens_target_mean": sum(lengths) / len(lengths),
            "sample_tokens_over_target": sum(b for _, b in checked) / sum(a for a, _ in checked),
            "bytes": os.path.getsize(path)}


def prepare(args) -> tuple[str, str, dict]:
    sys.path.insert(0, args.root)
    from qedjax import toy

    os.makedirs(args.work, exist_ok=True)
    tokenizer_dir = os.path.join(args.work, "tokenizer")
    if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
        toy.build_tokenizer(tokenizer_dir, vocab_size=512)
    name = f"sft_{args.rows}x{args.min_tokens}-{args.max_tokens}"
    path = os.path.join(args.work, name + ".jsonl")
    info_path = os.path.join(args.work, name + ".json")
    if not os.path.exists(path) or not os.path.exists(info_path):
        info = write_data(args, tokenizer_dir, path)
        with open(info_path, "w") as f:
            json.dump(info, f)
    with open(info_path) as f:
        return tokenizer_dir, path, json.load(f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_step(metrics: str) -> bool:
    if not os.path.exists(metrics):
        return False
    with open(metrics) as f:
        return any('"loss"' in line and '"sft"' in line for line in f)


def launch(args, tokenizer_dir: str, data_path: str) -> dict:
    run_dir = os.path.join(args.work, f"run_{os.getpid()}_{time.time_ns()}")
    sft = {"global_batch": args.global_batch, "log_every": 1,
           "data": {"path": data_path, "seq_len": args.seq_len, "overlong": "truncate"},
           "checkpoint": {"every": 10 ** 6, "keep": 1}}
    if args.epochs is None:
        sft["steps"] = 1
    else:
        sft["epochs"] = args.epochs
    config = {"run": {"dir": run_dir, "seed": 0, "mesh": "fsdp=8"},
              "model": {"preset": "tiny", "tokenizer": tokenizer_dir}, "sft": sft}
    os.makedirs(run_dir)
    config_path = os.path.join(run_dir, "bench.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(config, f)
    n = args.processes
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.path.abspath(args.root),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // n}", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "qedjax.launch", "--config", config_path]
    if n > 1:
        port = _free_port()
        commands = [command + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
                               "--process-id", str(i)] for i in range(n)]
    else:
        commands = [command]
    logs = [open(os.path.join(run_dir, f"process_{i}.log"), "w") for i in range(n)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, cwd=run_dir, stdout=log, stderr=subprocess.STDOUT)
             for c, log in zip(commands, logs)]
    first, peaks, codes = None, {}, {}
    metrics = os.path.join(run_dir, "metrics.jsonl")
    while len(codes) < n:
        if first is None and _first_step(metrics):
            first = time.perf_counter() - t0
        for i, p in enumerate(procs):
            if i in codes:
                continue
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                codes[i] = os.waitstatus_to_exitcode(status)
                peaks[i] = usage.ru_maxrss / 2 ** 20  # KiB -> GiB
                p.returncode = codes[i]
        if time.perf_counter() - t0 > args.timeout:
            for p in procs:
                p.kill()
            raise SystemExit(f"launch did not finish within {args.timeout} s; logs in {run_dir}")
        time.sleep(0.1)
    for log in logs:
        log.close()
    if first is None and _first_step(metrics):
        first = time.perf_counter() - t0
    if any(codes.values()):
        with open(os.path.join(run_dir, "process_0.log")) as f:
            raise SystemExit(f"launch failed ({codes}); log of process 0:\n{f.read()[-3000:]}")
    return {"first_step_s": first, "total_s": time.perf_counter() - t0,
            "peak_rss_gib": [round(peaks[i], 3) for i in range(n)], "run_dir": run_dir}


def main(argv=None):
    args = parse_args(argv)
    tokenizer_dir, data_path, info = prepare(args)
    print_header(f"qedjax at {os.path.abspath(args.root)}; {args.processes} process(es), 8 CPU devices in all")
    print(f"data: {info['rows']} rows, {info['bytes'] / 2 ** 20:.0f} MiB JSONL, mean {info['tokens_target_mean']:.0f} "
          f"tokens/row asked ({args.min_tokens}-{args.max_tokens}; sampled rows measure "
          f"{info['sample_tokens_over_target']:.3f}x that), seq_len {args.seq_len}, global batch "
          f"{args.global_batch}, " + (f"epochs {args.epochs}" if args.epochs is not None else "sft.steps=1"),
          flush=True)
    out = launch(args, tokenizer_dir, data_path)
    print(f"start-up (launch -> first SFT step on disk): {out['first_step_s']:.1f} s; whole launch "
          f"{out['total_s']:.1f} s; peak host memory per process: "
          + ", ".join(f"{g:.2f} GiB" for g in out["peak_rss_gib"]))
    print(json.dumps({k: v for k, v in out.items() if k != "run_dir"}))
    print_footer()


if __name__ == "__main__":
    main()
