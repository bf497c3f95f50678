"""The evaluation report: summary numbers, a markdown table and the cost/score plot.

Scores are rewards (score / 7) as percentages. The standard error is that of the mean over all
graded samples (sample standard deviation / sqrt(n)); with several samples per problem,
`stderr_runs` is also given: the spread of the per-pass means (one pass = every problem once).
Tokens are generated tokens per (problem, sample), summed over every request the scaffold made.

Length statistics cover every completion the scaffold requested and the final responses, with
the share that hit the token limit or never closed their thinking: SFT on long teacher traces makes
outputs run to the limit (ALGORITHMS.md), and this is where that shows.

`cost_vs_score.png` places every evaluation of the run (all labels under `run_dir/eval/`) at its
mean tokens per problem (log scale) and score, one colour per benchmark: the paper's
cost-performance view of the scaffolds.
"""

from __future__ import annotations

import collections
import json
import math
import statistics
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


def stderr(values: Sequence[float]) -> float:
    """Standard error of the mean (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    return statistics.stdev(values) / math.sqrt(len(values))


def paired_difference(a: Sequence[Mapping], b: Sequence[Mapping]) -> dict:
    """Score of `b` minus score of `a` (percentage points) on the problems both graded, with the
    standard error of that difference over problems.

    Both models answered the same problems, so the difference is taken problem by problem (each
    problem's mean reward over its samples) and its spread gives the standard error: samples of one
    problem are not independent, and a problem that is easy for one model is easy for the other,
    so this is both honest about clustering and tighter than combining the two scores' errors.
    """
    def per_problem(records):
        by_id = collections.defaultdict(list)
        for r in records:
            by_id[r["id"]].append(100.0 * r["reward"])
        return {k: statistics.fmean(v) for k, v in by_id.items()}

    pa, pb = per_problem(a), per_problem(b)
    common = sorted(pa.keys() & pb.keys())
    diffs = [pb[k] - pa[k] for k in common]
    return {"diff": statistics.fmean(diffs) if diffs else 0.0, "stderr": stderr(diffs), "problems": len(common)}


def length_stats(values: Sequence[int], limit: int | None = None) -> dict:
    """mean / p50 / p90 / max of token counts, and the share at `limit` or above."""
    if not values:
        return {"n": 0}
    array = np.asarray(values, dtype=np.float64)
    stats = {
        "n": len(values),
        "mean": float(array.mean()),
        "p50": float(np.percentile(array, 50)),
        "p90": float(np.percentile(array, 90)),
        "max": int(array.max()),
    }
    if limit:
        stats["at_limit"] = float((array >= limit).mean())
    return stats


def group_stats(records: Sequence[Mapping]) -> dict:
    """score %, stderr, n and mean tokens/calls of a group of graded records."""
    scores = [100.0 * r["reward"] for r in records]
    return {
        "n": len(records),
        "score": statistics.fmean(scores) if scores else 0.0,
        "stderr": stderr(scores),
        "tokens_per_problem": statistics.fmean(r["tokens"] for r in records) if records else 0.0,
        "calls_per_problem": statistics.fmean(r["calls"] for r in records) if records else 0.0,
    }


def summarize(
    records: Sequence[Mapping],
    *,
    label: str,
    benchmark: str,
    scaffold: str,
    samples: int,
    max_new_tokens: int | None = None,
) -> dict:
    """The summary of one evaluation.

    Args:
        records: graded records (samples.jsonl lines), one per (problem, sample).
        label: the evaluation's label.
        benchmark: benchmark name.
        scaffold: scaffold name.
        samples: samples per problem.
        max_new_tokens: the per-request token limit (for the at-limit share).

    Returns:
        {label, benchmark, scaffold, n, samples, score, stderr, stderr_runs, tokens_per_problem,
        calls_per_problem, reasons, by_group, length}.
    """
    summary = {"label": label, "benchmark": benchmark, "scaffold": scaffold, "samples": samples}
    summary.update(group_stats(records))
    passes = collections.defaultdict(list)
    for r in records:
        passes[r["sample"]].append(100.0 * r["reward"])
    pass_means = [statistics.fmean(v) for v in passes.values()]
    summary["stderr_runs"] = stderr(pass_means) if len(pass_means) > 1 else None
    summary["reasons"] = dict(collections.Counter(r["reason"] for r in records))
    groups = collections.defaultdict(list)
    for r in records:
        for field in ("category", "level"):
            if r.get(field):
                groups[f"{field}={r[field]}"].append(r)
    summary["by_group"] = {name: group_stats(groups[name]) for name in sorted(groups)}
    completions = [n for r in records for n in r["lengths"]]
    summary["length"] = {
        "response": length_stats([r["response_tokens"] for r in records], max_new_tokens),
        "completion": length_stats(completions, max_new_tokens),
        "truncated_share": sum(r["truncated"] for r in records) / len(completions) if completions else 0.0,
    }
    rc_stats = [r["trace"]["summary_stats"] for r in records if "summary_stats" in r.get("trace", {})]
    if rc_stats:  # RC: the summary calls, as the RL metrics count them
        calls = sum(s["summaries_attempted"] for s in rc_stats)
        totals = {k: sum(s.get(k, 0) for s in rc_stats) for k in rc_stats[0] if k != "summary_tokens_mean"}
        tokens = sum(s.get("summary_tokens_mean", 0.0) * s["summaries_attempted"] for s in rc_stats)
        summary["summaries"] = {**totals, "summary_tokens_mean": tokens / calls if calls else 0.0}
    return summary


def markdown(summary: Mapping) -> str:
    """The summary as a markdown table (overall row, then one row per category and level)."""
    lines = [
        f"# {summary['label']}: {summary['scaffold']} on {summary['benchmark']}",
        "",
        "| group | n | score % | stderr | tokens/problem | calls/problem |",
        "|---|---|---|---|---|---|",
    ]
    rows = [("all", summary)] + list(summary["by_group"].items())
    for name, s in rows:
        lines.append(
            f"| {name} | {s['n']} | {s['score']:.1f} | {s['stderr']:.1f} | "
            f"{s['tokens_per_problem']:.0f} | {s['calls_per_problem']:.1f} |"
        )
    length = summary["length"]
    lines += ["", "| lengths (tokens) | n | mean | p50 | p90 | max | at limit |", "|---" * 7 + "|"]
    for name in ("response", "completion"):
        s = length[name]
        if s["n"]:
            lines.append(
                f"| {name} | {s['n']} | {s['mean']:.0f} | {s['p50']:.0f} | {s['p90']:.0f} | {s['max']} | "
                f"{100 * s.get('at_limit', 0):.1f}% |"
            )
    truncated = 100 * length["truncated_share"]
    lines += ["", f"Truncated completions: {truncated:.1f}%. Grade reasons: {summary['reasons']}."]
    if "summaries" in summary:
        s = summary["summaries"]
        failed = {k[len("summaries_failed_"):]: v for k, v in s.items() if k.startswith("summaries_failed_")}
        lines += ["", f"RC summaries: {s['summaries_attempted']} attempted, {s['summaries_empty']} empty, "
                      f"failed {failed}, mean length {s['summary_tokens_mean']:.0f} tokens."]
    return "\n".join(lines) + "\n"


def plot_cost_score(summaries: Sequence[Mapping], path: str | Path) -> None:
    """Score against tokens per problem, one point per evaluation, one colour per benchmark."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training hosts
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    by_benchmark = collections.defaultdict(list)
    for s in summaries:
        by_benchmark[s["benchmark"]].append(s)
    for benchmark, points in sorted(by_benchmark.items()):
        x = [max(p["tokens_per_problem"], 1.0) for p in points]
        y = [p["score"] for p in points]
        ax.errorbar(x, y, yerr=[p["stderr"] for p in points], fmt="o", capsize=3, label=benchmark)
        for p, xi, yi in zip(points, x, y):
            ax.annotate(p["label"], (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.1)
    ax.set_xlabel("generated tokens per problem")
    ax.set_ylabel("score (%)")
    ax.set_title("score against cost")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def collect_summaries(eval_dir: str | Path) -> list[dict]:
    """The summary.json of every evaluation under `run_dir/eval/`."""
    return [json.loads(p.read_text()) for p in sorted(Path(eval_dir).glob("*/summary.json"))]


def write_report(records: Sequence[Mapping], out_dir: str | Path, **summary_args) -> dict:
    """Writes summary.json and summary.md to `out_dir` and the run's cost/score plot to `out_dir`
    and its parent (the run's eval directory, where all labels meet).

    Args:
        records: graded records.
        out_dir: `run_dir/eval/<label>`.
        **summary_args: label, benchmark, scaffold, samples, max_new_tokens (see `summarize`).

    Returns:
        The summary.
    """
    out_dir = Path(out_dir)
    summary = summarize(records, **summary_args)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "summary.md").write_text(markdown(summary))
    everything = collect_summaries(out_dir.parent)
    for path in (out_dir / "cost_vs_score.png", out_dir.parent / "cost_vs_score.png"):
        plot_cost_score(everything, path)
    return summary
