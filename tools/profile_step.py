"""Per-op profile of the compiled SFT (or GRPO) train step on XLA:CPU: where a step's time goes.

The step is bench_sft.py's (bench-100m from a random Hugging Face checkpoint, `train.make_train_step`
with `sft.sft_loss`, or `grpo.make_loss` with `--grpo`, on a one-device mesh). After two warm-up
steps, each of `--steps` steps runs under its own `jax.profiler` trace. XLA:CPU records one event per
thunk (a fusion, a matmul, a copy, a loop) on the thread that ran it; the events are matched by name
to the instructions of the compiled HLO, which say what each one is:

- matmul: a dot, a fusion holding one (YNNPACK's `ynn_fusion`s) or an MKL product (the `qedjax_gemm`
  custom call of qedjax/models/cpu_gemm.py); its FLOPs are counted from the shapes, so the table gives each matmul's rate against the step's own 3072^3 matmul rate;
- attention: the C++ flash attention kernel's forward and backward calls (qedjax/models/cpu_attention.py;
  their products are MKL's, not counted as matmul FLOPs);
- copy/transpose: copies, transposes and fusions whose root is one (data moved, nothing computed);
- scatter/gather, reduction (input fusions and reduces), elementwise (loop fusions), other.

Thunks with no data between them run at once on the two threads (the two products of the logits'
backward pass, for one): each one's time is then its share of a busy machine, a matmul's rate is a
lower bound, and the summed time exceeds the step's wall time. Loops (`while`) and conditionals are
containers: their bodies' thunks have events of their own (one per run, so a matmul in a loop counts
its FLOPs once per run), and the containers are left out of the sums. Every figure is the median
over the traced steps.

    python tools/profile_step.py --batch 4 --seq 256
    python tools/profile_step.py --batch 8 --seq 320 --grpo --top 30
"""

from __future__ import annotations

import argparse
import collections
import glob
import math
import os
import re
import statistics
import sys
import tempfile
import time

# tools/, the script's own folder
from benchlib import ROOT, add_host_flags, print_footer, setup_host

CONTAINERS = {"while", "conditional", "call"}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = (.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+) .*\{\s*$")  # unindented: a computation's header
_SHAPE = re.compile(r"[a-z]\w*\[([\d,]*)\]")


def _split_shape(rest: str) -> tuple[str, str, str]:
    """'f32[2,3]{1,0} dot(...), attrs' -> (shape, opcode, the rest after the opcode's '(')."""
    if rest.startswith("("):  # a tuple shape: skip to its closing parenthesis
        depth = 0
        for i, ch in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                shape, rest = rest[: i + 1], rest[i + 2:]
                break
    else:
        shape, rest = rest.split(" ", 1)
    opcode, _, tail = rest.partition("(")
    return shape, opcode, tail


def _dims(shape: str) -> list[int]:
    m = _SHAPE.search(shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def parse_hlo(text: str) -> dict[str, dict]:
    """Instruction name -> {comp, shape, opcode, line}, over every computation of an HLO module."""
    instrs, comp = {}, None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m:
            comp = m.group(1)
            continue
        m = _INSTR.match(line)
        if m and comp is not None:
            shape, opcode, tail = _split_shape(m.group(2))
            instrs[m.group(1)] = dict(comp=comp, shape=shape, opcode=opcode, line=tail)
    return instrs


def by_computation(instrs: dict[str, dict]) -> dict[str, list[dict]]:
    """Computation name -> its instructions in order (a fusion's body, for `classify`)."""
    comps = collections.defaultdict(list)
    for ins in instrs.values():
        comps[ins["comp"]].append(ins)
    return comps


def dot_flops(ins: dict, instrs: dict[str, dict]) -> float:
    """2 x output elements x contracted size of a dot instruction (its left operand's shape is looked
    up by name: the optimized HLO prints operands without shapes)."""
    lhs = re.match(r"\s*(?:[a-z]\w*\[[\d,]*\]\S*\s+)?%([\w.\-]+)", ins["line"])
    contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins["line"])
    if not lhs or not contract or lhs.group(1) not in instrs:
        return 0.0
    dims = _dims(instrs[lhs.group(1)]["shape"])
    k = math.prod(dims[int(i)] for i in contract.group(1).split(",") if i)
    return 2.0 * math.prod(_dims(ins["shape"])) * k


def gemm_flops(ins: dict, instrs: dict[str, dict]) -> float:
    """2 m n k of a qedjax_gemm custom call (qedjax.models.cpu_gemm): out [m, n]; its first operand
    holds m k elements, transposed or not."""
    lhs = re.match(r"\s*(?:[a-z]\w*\[[\d,]*\]\S*\s+)?%([\w.\-]+)", ins["line"])
    out = _dims(ins["shape"])
    if not lhs or lhs.group(1) not in instrs or len(out) != 2 or not out[0]:
        return 0.0
    return 2.0 * out[1] * math.prod(_dims(instrs[lhs.group(1)]["shape"]))


def classify(name: str, instrs: dict[str, dict], by_comp: dict[str, list[dict]]) -> tuple[str, float]:
    """(category, matmul FLOPs) of a thunk."""
    ins = instrs.get(name)
    if ins is None:
        return "other", 0.0
    op, line = ins["opcode"], ins["line"]
    if op in CONTAINERS:
        return "container", 0.0
    if op == "dot":
        return "matmul", dot_flops(ins, instrs)
    if op == "custom-call" and 'custom_call_target="qedjax_gemm"' in line:
        return "matmul", gemm_flops(ins, instrs)
    if op == "custom-call" and 'custom_call_target="qedjax_attention_' in line:
        return "attention", 0.0  # the C++ flash attention kernel (qedjax.models.cpu_attention)
    called = re.search(r"calls=%([\w.\-]+)", line)
    body = by_comp.get(called.group(1), []) if called else []
    flops = sum(dot_flops(b, instrs) for b in body if b["opcode"] == "dot")
    if flops or "__ynn_fusion" in line:
        return "matmul", flops
    root = body[-1]["opcode"] if body else op
    if op in ("copy", "transpose") or root in ("copy", "transpose") or name.startswith(("copy", "transpose")):
        return "copy/transpose", 0.0
    if op in ("scatter", "gather") or "scatter" in name or "gather" in name:
        return "scatter/gather", 0.0
    if op == "reduce" or "kind=kInput" in line:
        return "reduction", 0.0
    if op == "fusion":
        return "elementwise", 0.0
    return "other", 0.0


def thunk_times(trace_dir: str, asynchronous=frozenset()) -> tuple[dict[str, float], dict[str, int]]:
    """Thunk name -> summed seconds, and how many times it ran, over one trace (every XLA:CPU thread).

    The thunks named in `asynchronous` (plain dots, outside YNNPACK) return from their event at once
    and finish later: their time runs to their "end: NAME" marker, on whichever thread finished them.
    Other thunks' end markers can come long after the work (when the executor gets to them): their
    time is their event's.
    """
    import jax

    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    starts, ends = collections.defaultdict(list), collections.defaultdict(list)
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for e in line.events:
                if e.name.startswith("end: "):
                    ends[e.name[5:]].append(e.start_ns)
                elif not e.name.startswith(("ThreadpoolListener", "ThunkExecutor", "SlinkyThreadPool")):
                    starts[e.name].append((e.start_ns, e.start_ns + e.duration_ns))
    times, calls = collections.Counter(), collections.Counter()
    for name, runs in starts.items():
        marks = sorted(ends.get(name, ())) if name in asynchronous else []
        i = 0
        for start, stop in sorted(runs):
            while i < len(marks) and marks[i] < start:
                i += 1
            if i < len(marks):  # this run's end marker: the first one at or after its start
                stop = max(stop, marks[i])
                i += 1
            times[name] += (stop - start) / 1e9
            calls[name] += 1
    return times, calls


def label(ins: dict | None) -> str:
    m = re.search(r'op_name="([^"]*)"', ins["line"]) if ins else None
    return m.group(1).removeprefix("jit(step)/")[:70] if m else ""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench-100m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="traced steps (figures are medians over them)")
    p.add_argument("--grpo", action="store_true", help="profile the GRPO loss step instead of the SFT one")
    p.add_argument("--top", type=int, default=20, help="the most expensive thunks to list")
    add_host_flags(p)
    args = p.parse_args(argv)
    setup_host(args)

    import jax

    from bench_sft import grpo_batch, measure_peak, qedjax_trainer, sft_batch
    from qedjax.models.qwen3 import Qwen3Config

    sys.path.insert(0, ROOT)
    from tests.hf_utils import random_hf_model

    cfg = Qwen3Config.preset(args.preset)
    batch = sft_batch(cfg.vocab_size, args.batch, args.seq)
    if args.grpo:
        batch = grpo_batch(batch)
    with tempfile.TemporaryDirectory(prefix="profile-step-") as d:
        random_hf_model(cfg).save_pretrained(d)
        step, hlo_flops, _ = qedjax_trainer(d, batch, grpo=args.grpo)
    instrs = parse_hlo(step.compiled.as_text())
    by_comp = by_computation(instrs)
    asynchronous = frozenset(n for n, ins in instrs.items() if ins["opcode"] == "dot")
    peak = measure_peak()["jax"]
    step(), step()

    walls, per_step, runs = [], [], []
    for _ in range(args.steps):
        with tempfile.TemporaryDirectory(prefix="profile-trace-") as d:
            jax.profiler.start_trace(d)
            start = time.perf_counter()
            step()
            walls.append(time.perf_counter() - start)
            jax.profiler.stop_trace()
            times, calls = thunk_times(d, asynchronous)
            per_step.append(times)
            runs.append(calls)

    names = set().union(*per_step)
    op_s = {n: statistics.median(s.get(n, 0.0) for s in per_step) for n in names}
    kind = {n: classify(n, instrs, by_comp) for n in names}
    wall = statistics.median(walls)
    cats = collections.defaultdict(list)
    for s in per_step:
        sums = collections.Counter()
        for n, sec in s.items():
            sums[kind[n][0]] += sec
        for c in ("matmul", "attention", "copy/transpose", "scatter/gather", "reduction", "elementwise", "other"):
            cats[c].append(sums[c])
    total = sum(statistics.median(v) for v in cats.values())
    calls = {n: statistics.median(r.get(n, 0) for r in runs) for n in names}  # a loop body's thunks run many times
    mm_flops = sum(f * calls[n] for n, (_, f) in kind.items())

    what = "GRPO" if args.grpo else "SFT"
    print(f"# {args.preset} {what} step at {args.batch} x {args.seq}: wall {wall * 1e3:.0f} ms (median of "
          f"{args.steps} traced steps; untraced figures: tools/bench_sft.py), HLO {hlo_flops / 1e9:.0f} GFLOP, "
          f"jax 3072^3 matmul {peak:.0f} GFLOP/s", flush=True)
    print(f"{'category':>15} | {'ms/step':>8} | {'share':>6} | notes")
    for c, v in cats.items():
        sec = statistics.median(v)
        note = ""
        if c == "matmul" and sec:
            note = f"{mm_flops / 1e9:.0f} GFLOP at {mm_flops / 1e9 / sec:.0f} GFLOP/s"
        print(f"{c:>15} | {sec * 1e3:8.1f} | {100 * sec / total:5.1f}% | {note}")
    print(f"{'summed thunks':>15} | {total * 1e3:8.1f} | {100 * total / wall:5.0f}% of the wall time")
    print(f"# the {args.top} most expensive thunks (ms per step, runs per step, matmuls with their rate):")
    for n in sorted(names, key=op_s.get, reverse=True)[: args.top]:
        c, f = kind[n]
        if c == "container":
            continue
        rate = f" {f * calls[n] / op_s[n] / 1e9:5.0f} GFLOP/s" if f and op_s[n] else ""
        shape = instrs.get(n, {}).get("shape", "")[:28]
        print(f"{op_s[n] * 1e3:8.1f} {calls[n]:5.0f}x {c:>14}{rate:>14}  {n:<34} {shape:<28} {label(instrs.get(n))}")
    print_footer()


if __name__ == "__main__":
    main()
