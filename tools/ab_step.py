"""A/B of the SFT step: builds that differ in one of the model's run settings, alternated in one process.

    python tools/ab_step.py --field gemm --values xla-copy mkl --batch 2 4 1 --seq 128 256 2048
    python tools/ab_step.py --field attention_block --values 256 512 --batch 1 --seq 2048
    python tools/ab_step.py --field adamw_kernel --values false true --batch 2 --seq 128

For each shape, one bench-100m SFT step (as tools/bench_sft.py builds it) per value of a Qwen3Config
run field (`qwen3.RUN_FIELDS`: how the model runs, not what it is; or `adamw_kernel`, whether the
train step's AdamW is the single-pass custom call), the same weights and batch,
timed in rounds whose order alternates, so that load and heap state fall on every build alike. A
change that is a choice (a layout, a block size) is decided with this before it becomes a default.
The losses of the builds' first two steps must agree to a relative 1e-4.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

from benchlib import ROOT, add_host_flags, print_footer, setup_host


def parse_value(text: str):
    """'true'/'false' -> bool, digits -> int, 'none' -> None, other words as they are."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    try:
        return int(text)
    except ValueError:
        return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench-100m")
    p.add_argument("--field", required=True, help="a Qwen3Config run field, e.g. gemm or attention_block, "
                   "or adamw_kernel (the train step's)")
    p.add_argument("--values", nargs="+", required=True, help="two or more values of it")
    p.add_argument("--batch", type=int, nargs="+", default=[2, 4, 1])
    p.add_argument("--seq", type=int, nargs="+", default=[128, 256, 2048])
    p.add_argument("--rounds", type=int, default=8, help="timed steps per build and shape")
    add_host_flags(p)
    args = p.parse_args(argv)

    sys.path.insert(0, ROOT)
    from qedjax.models.qwen3 import RUN_FIELDS

    fields = sorted(RUN_FIELDS | {"adamw_kernel"})
    if args.field not in fields:
        raise SystemExit(f"--field must be one of {fields}, got {args.field!r}")
    values = [parse_value(v) for v in args.values]
    if len(values) < 2:
        raise SystemExit("--values needs at least two values to compare")
    if len(args.batch) != len(args.seq):
        raise SystemExit("--batch and --seq pair up: give as many of each")
    setup_host(args, torch_threads=False)

    from bench_sft import qedjax_trainer, sft_batch
    from qedjax.models.qwen3 import Qwen3Config
    from tests.hf_utils import random_hf_model

    cfg = Qwen3Config.preset(args.preset)
    print(f"{'B x T':>10} | " + " | ".join(f"{args.field}={v!s:>6} s/step" for v in values)
          + " | time of the first / of each other")
    for b, t in zip(args.batch, args.seq):
        batch = sft_batch(cfg.vocab_size, b, t)
        with tempfile.TemporaryDirectory(prefix="ab-step-") as d:
            random_hf_model(cfg).save_pretrained(d)
            steps = [qedjax_trainer(d, batch, overrides={args.field: v})[0] for v in values]
        losses = [[step(), step()] for step in steps]  # warm-up (compiled already) and parity
        for v, pair in zip(values[1:], losses[1:]):
            if any(abs(x - y) > 1e-4 * abs(y) for x, y in zip(pair, losses[0])):
                raise SystemExit(f"{b}x{t}: losses disagree: {args.field}={values[0]} {losses[0]}, ={v} {pair}")
        times = [[] for _ in steps]
        for r in range(args.rounds):
            order = range(len(steps)) if r % 2 == 0 else reversed(range(len(steps)))
            for i in order:
                start = time.perf_counter()
                steps[i]()
                times[i].append(time.perf_counter() - start)
        med = [statistics.median(ts) for ts in times]
        cells = " | ".join(f"{m:>{len(args.field) + 14}.3f}" for m in med)
        print(f"{f'{b} x {t}':>10} | {cells} | " + " ".join(f"{med[0] / m:.3f}" for m in med[1:]), flush=True)
        print("#   each step, s: " + "; ".join(f"{v}: {[round(x, 2) for x in ts]}" for v, ts in zip(values, times)),
              flush=True)
    print_footer()


if __name__ == "__main__":
    main()
