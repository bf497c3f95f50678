"""Per-step metrics: `metrics.jsonl` and TensorBoard events in the run directory, and plots.

Only process 0 writes. Every line of metrics.jsonl is one JSON object with `stage` and `step` and
the metrics of that step; values are plain floats/ints (lists for histograms). Timings are kept
out of the JSONL when `deterministic` is set, so two runs with the same seed write identical files.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax
import numpy as np



def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    arr = np.asarray(value)
    if arr.ndim:
        return [_plain(v) for v in arr.tolist()]
    item = arr.item()
    if isinstance(item, float):
        if math.isnan(item) or math.isinf(item):
            return str(item)
        return round(item, 6)
    return item


def is_timing(key: str) -> bool:
    """Wall-clock metrics (seconds, rates, timestamps): the part of a run a seed cannot fix."""
    if key.startswith("grader_"):  # counts of grader outcomes by reason (grader_timeout is a count)
        return False
    return key.endswith("_s") or "per_s" in key or "time" in key


class MetricsWriter:
    """Appends metrics to run_dir/metrics.jsonl (and TensorBoard under run_dir/tb)."""

    def __init__(self, run_dir: str, *, deterministic: bool = False, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.deterministic = deterministic
        self._tb = None
        if self.enabled:
            os.makedirs(run_dir, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tb"), flush_secs=10)

    def write(self, stage: str, step: int, metrics: Mapping[str, Any]) -> dict:
        row = {"stage": stage, "step": int(step)}
        row.update({k: _plain(v) for k, v in metrics.items()})
        if not self.enabled:
            return row
        logged = {k: v for k, v in row.items() if not (self.deterministic and is_timing(k))}
        with open(self.path, "a") as f:
            f.write(json.dumps(logged, sort_keys=True) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self._tb.add_scalar(f"{stage}/{k}", v, int(step))
                elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
                    self._tb.add_histogram(f"{stage}/{k}", np.asarray(v, np.float64), int(step))
        return row

    def rewind(self, stage: str, step: int) -> int:
        """Drops the rows of `stage` logged after `step` (all of them at step 0), and a torn last line.

        A run killed after its last checkpoint logged steps it takes again when resumed from that
        checkpoint; rewinding to the restored step first makes the resumed metrics.jsonl read as if the
        run had never stopped. Returns how many rows were dropped.
        """
        if not self.enabled or not os.path.exists(self.path):
            return 0
        with open(self.path) as f:
            lines = f.read().splitlines()
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if row.get("stage") != stage or (step and row.get("step", 0) <= step):
                kept.append(line)
        dropped = len(lines) - len(kept)
        if dropped:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.write("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        return dropped

    def close(self):
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str, stage: str | None = None) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if stage is None or r.get("stage") == stage]


def plot_metrics(run_dir: str, stage: str, keys: list[str], out_name: str | None = None) -> str | None:
    """A PNG with one panel per metric key against step; returns its path (None if no data)."""
    rows = read_metrics(run_dir, stage)
    keys = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if not rows or not keys or jax.process_index() != 0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
        ax.set_title(f"{stage}: {key}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(run_dir, out_name or f"{stage}_metrics.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
