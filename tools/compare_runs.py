"""Compares the metrics of two run directories, stage by stage, step by step, key by key.

    python tools/compare_runs.py RUN_A RUN_B [--atol X] [--all]

Rows of metrics.jsonl are matched on (stage, step, event); each metric is `equal`, `differs` (with
the largest absolute difference; lists such as histograms compare element-wise) or `missing` on one
side. Timing keys (qedjax.metrics.is_timing: step_time_s, tokens_per_s, ...) are shown but never
count. The run_info.json of each side (config hash, git commit, devices, mesh, seed) is printed
for context. Exit code 0: identical on every non-timing key (within --atol); 1: they differ;
2: a run directory has no metrics.jsonl.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
from typing import Any

from qedjax.metrics import is_timing

ROW_KEYS = ("stage", "step", "event")  # what identifies a row; every other key is a metric


def load_rows(run_dir: str) -> dict[tuple, dict]:
    """(stage, step, event, n) -> metrics; n counts repeats (a resumed run logs its step again)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl")
    rows, seen = {}, collections.Counter()
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                ident = tuple(row.get(k) for k in ROW_KEYS)
                rows[ident + (seen[ident],)] = {k: v for k, v in row.items() if k not in ROW_KEYS}
                seen[ident] += 1
    return rows


def difference(a: Any, b: Any) -> float | None:
    """0.0 if equal, the largest absolute difference of numbers (element-wise for lists), inf when
    they cannot be compared (types or lengths differ), None for unequal non-numbers."""
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return math.inf
        diffs = [difference(x, y) for x, y in zip(a, b)]
        return None if any(d is None for d in diffs) else max(diffs, default=0.0)
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers):
        if math.isnan(a) and math.isnan(b):
            return 0.0
        return abs(float(a) - float(b))
    if type(a) is not type(b) and (isinstance(a, (list, *numbers)) or isinstance(b, (list, *numbers))):
        return math.inf
    return 0.0 if a == b else None  # strings ("nan", event names)


def compare(rows_a: dict, rows_b: dict, atol: float = 0.0) -> list[dict]:
    """One record per (row, metric): stage, step, event, key, status, diff, a, b, timing."""
    out = []
    for ident in sorted(set(rows_a) | set(rows_b), key=lambda i: (str(i[0]), i[1], str(i[2]), i[3])):
        stage, step, event, _ = ident
        ra, rb = rows_a.get(ident), rows_b.get(ident)
        base = {"stage": stage, "step": step, "event": event}
        if ra is None or rb is None:
            out.append({**base, "key": None, "status": "missing in A" if ra is None else "missing in B",
                        "diff": None, "timing": False})
            continue
        for key in sorted(set(ra) | set(rb)):
            rec = {**base, "key": key, "timing": is_timing(key), "a": ra.get(key), "b": rb.get(key)}
            if key not in ra or key not in rb:
                rec.update(status="missing in A" if key not in ra else "missing in B", diff=None)
            else:
                d = difference(ra[key], rb[key])
                rec.update(status="equal" if d is not None and d <= atol else "differs", diff=d)
            out.append(rec)
    return out


def _fmt(d: float | None) -> str:
    return "not comparable" if d is None or math.isinf(d) else f"{d:.3g}"


def _where(rec: dict) -> str:
    return f"{rec['stage']} step {rec['step']}" + (f" ({rec['event']})" if rec["event"] else "")


def _run_info(run_dir: str) -> dict:
    try:
        with open(os.path.join(run_dir, "run_info.json")) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return {}
    git = info.get("git") or {}
    devices = info.get("devices") or {}
    return {"config hash": info.get("config_hash"), "seed": info.get("seed"),
            "git": f"{git.get('commit')}{' (dirty)' if git.get('dirty') else ''}",
            "devices": f"{devices.get('count')} x {devices.get('kind')} in {devices.get('processes')} process(es)",
            "mesh": info.get("mesh"), "jax": (info.get("packages") or {}).get("jax")}


def report(run_a: str, run_b: str, records: list[dict], *, show_all: bool = False, limit: int = 30) -> bool:
    """Prints the comparison; returns whether the runs are identical on non-timing keys."""
    info_a, info_b = _run_info(run_a), _run_info(run_b)
    print(f"A: {run_a}\nB: {run_b}")
    for key in dict.fromkeys([*info_a, *info_b]):
        va, vb = info_a.get(key), info_b.get(key)
        print(f"  {key:12s} {'same' if va == vb else 'DIFFERENT'}: {va}" + ("" if va == vb else f" | {vb}"))
    by_key: dict[tuple, list[dict]] = collections.defaultdict(list)
    for rec in records:
        by_key[(rec["stage"], rec["key"])].append(rec)
    for (stage, key), recs in sorted(by_key.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        counts = collections.Counter(r["status"] for r in recs)
        if key is None:
            print(f"[{stage}] rows " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
            continue
        worst = max((r for r in recs if r["status"] == "differs"), default=None,
                    key=lambda r: math.inf if r["diff"] is None else r["diff"])
        line = f"[{stage}] {key}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        if worst is not None:
            line += f"; max |A-B| {_fmt(worst['diff'])} at step {worst['step']}"
        print(line + (" (timing: not compared)" if recs[0]["timing"] else ""))
    counted = [r for r in records if not r["timing"]]
    bad = [r for r in counted if r["status"] != "equal"]
    shown = counted if show_all else bad
    if shown:
        print("per step:" if show_all else "differences:")
    for rec in shown[:None if show_all else limit]:
        if rec["key"] is None:
            print(f"  {_where(rec)}: row {rec['status']}")
        elif rec["status"] == "differs":
            print(f"  {_where(rec)} {rec['key']}: differs by {_fmt(rec['diff'])} ({rec['a']!r} vs {rec['b']!r})")
        else:
            print(f"  {_where(rec)} {rec['key']}: {rec['status']}")
    if not show_all and len(bad) > limit:
        print(f"  ... and {len(bad) - limit} more (--all lists every step)")
    same = not bad
    print(f"identical on non-timing keys: {'yes' if same else 'no'} ({len(counted) - len(bad)} of {len(counted)} "
          f"values equal)")
    return same


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--atol", type=float, default=0.0, help="numbers closer than this count as equal")
    p.add_argument("--all", action="store_true", help="list every stage/step/key, equal ones too")
    args = p.parse_args(argv)
    try:
        rows_a, rows_b = load_rows(args.run_a), load_rows(args.run_b)
    except FileNotFoundError as e:
        print(f"compare_runs: {e}", file=sys.stderr)
        return 2
    return 0 if report(args.run_a, args.run_b, compare(rows_a, rows_b, args.atol), show_all=args.all) else 1


if __name__ == "__main__":
    sys.exit(main())
