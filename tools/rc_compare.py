"""Does reasoning-cache RL do what it is for? The comparison, in one command.

    python tools/rc_compare.py [--config configs/tiny-rc.yaml] [--seeds 0,1] [key=value ...]

Per seed (run.seed; the toy data stay those of toy.seed), under RUN_DIR/seed<N> (RUN_DIR = run.dir):
  1. SFT (the config's sft section), once;
  2. GRPO without RC and GRPO over RC states, both from that SFT checkpoint (grpo.init names it),
     the same steps and the same rollouts per step: the plain run takes problems_per_step x
     states_per_problem problems per step, one group each, where the RC run takes problems_per_step
     problems and states_per_problem states of each (RC additionally spends tokens making the states:
     reported, not matched);
  3. evaluation of base / sft / grpo / grpo_rc under the single-pass and the RC scaffold at the same
     per-call budget (eval.sampling.max_new_tokens; RC summaries take eval.rc.summary_max_new_tokens),
     labels `<model>-<scaffold>` under RUN_DIR/seed<N>/eval/ (with the run's score-vs-tokens plot,
     eval/cost_vs_score.png);
  4. the report: per model and scaffold the score, its standard error over problems and tokens per
     problem; for RC the score of every turn's response and the share of every turn cut off by the
     budget, the share of non-empty summaries, the share of later turns that restate their summary
     (long task: their `Known:` list equals the summary's results) or at least continue from its
     progress (as many results as the summary), and, of those whose summary is not complete, the
     share that restate it and then work the next digit right; paired differences with standard
     errors over problems (qedjax.eval.report): RC minus single pass per model, GRPO-RC minus GRPO
     under RC. Written to RUN_DIR/seed<N>/comparison.{md,json} and, for all seeds,
     RUN_DIR/comparison.md.

Every stage resumes or skips itself, so re-running a killed command continues it.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

MODELS = ("base", "sft", "grpo", "grpo_rc")
SCAFFOLDS = ("single", "rc")


def _launch(config: str, stage: str, overrides: list[str]) -> None:
    from qedjax import launch

    launch.main(["--config", config, "--stage", stage, *overrides])


def train(config: str, run_dir: str, overrides: list[str]) -> dict:
    """Steps 1-2. Returns the GRPO runs' token counts from their metrics."""
    from qedjax.config import load_config
    from qedjax.metrics import read_metrics

    _launch(config, "sft", [*overrides, f"run.dir={run_dir}"])
    cfg = load_config(config, overrides)
    g = cfg.grpo
    sft_ckpt = os.path.join(run_dir, "sft", "checkpoints")
    plain = [f"grpo.rc.enabled=false", f"grpo.problems_per_step={g.problems_per_step * g.rc.states_per_problem}"]
    out = {}
    for name, extra in (("grpo", plain), ("grpo_rc", ["grpo.rc.enabled=true"])):
        sub = os.path.join(run_dir, name)
        _launch(config, "grpo", [*overrides, f"run.dir={sub}", f"grpo.init={sft_ckpt}", *extra])
        rows = [r for r in read_metrics(sub, "grpo") if "reward_mean" in r]
        out[name] = {"steps": len(rows), "rollout_tokens": sum(r["rollout_tokens"] for r in rows),
                     "sequences": sum(r.get("sequences_trained", 0) for r in rows),
                     "reward_first": rows[0]["reward_mean"] if rows else None,
                     "reward_last": rows[-1]["reward_mean"] if rows else None,
                     "states_with_summary": statistics.fmean(r["states_with_summary"] for r in rows)
                     if rows and "states_with_summary" in rows[0] else None}
        # making RC states costs turns reasoning calls and turns summaries per problem, not logged by
        # the RL loop: their upper bound, beside the groups' measured tokens
        out[name]["state_tokens_at_most"] = (len(rows) * g.problems_per_step * g.rc.turns * (
            g.sampling.max_new_tokens + g.rc.summary_max_new_tokens)) if name == "grpo_rc" else 0
    return out


def evaluate(config: str, run_dir: str, overrides: list[str]) -> None:
    """Step 3: every model under both scaffolds."""
    import jax
    from flax import nnx

    from qedjax import launch, pipeline, sft, sharding
    from qedjax.config import load_config
    from qedjax.eval.run import run_eval
    from qedjax.rewards import make_grader

    cfg = load_config(config, [*overrides, f"run.dir={run_dir}"])
    mesh = sharding.make_mesh(cfg.run.mesh)
    cfg = launch.with_toy_data(cfg, run_dir)
    tokenizer = sft.load_tokenizer(cfg.model.tokenizer or cfg.model.hf_path)
    make_engine = pipeline.engine_factory(cfg, tokenizer, mesh, run_dir)
    grader = make_grader(cfg.eval.grader)
    where = {"base": ("base", run_dir), "sft": ("sft", run_dir), "grpo": ("grpo", os.path.join(run_dir, "grpo")),
             "grpo_rc": ("grpo", os.path.join(run_dir, "grpo_rc"))}
    for model in MODELS:
        target, root = where[model]
        graphdef, params = pipeline.target_params(dataclasses.replace(cfg, run=dataclasses.replace(
            cfg.run, checkpoint_dir=root)), target, mesh, root, len(tokenizer))
        engine = make_engine(nnx.merge(graphdef, params), 0)
        for scaffold in SCAFFOLDS:
            run_eval(dataclasses.replace(cfg.eval, scaffold=scaffold), engine, grader, run_dir,
                     label=f"{model}-{scaffold}")
        del engine, params


_SO_FAR = re.compile(r"So far:([^.]*)")
_KNOWN = re.compile(r"Known:([^.]*)\.")


def _digits(pattern: re.Pattern, text: str) -> list[int] | None:
    """The labelled results (toy.parse_labelled) after pattern's marker, None without the marker."""
    from qedjax import toy

    m = pattern.search(text)
    return toy.parse_labelled(m.group(1)) if m else None


def _next_item_right(problem: str, said: list[int], response: str) -> bool:
    """Whether the response's first work item is the one after the summary's results, worked right."""
    from qedjax import toy
    from qedjax.text import split_thinking

    digits = toy.parse_problem(problem)
    k = len(said)
    item = toy.work_item(k, digits[k], toy.target(digits)[k])
    thinking = split_thinking(response).thinking or response
    after = thinking.split(".", 1)[1] if "Known:" in thinking else ""
    return after.split(",", 1)[0].strip() + "," == item


def mechanism(records: list[dict], problems: dict) -> dict:
    """Per-turn scores, non-empty summaries and turns that restate their summary, of RC records."""
    from qedjax import toy
    from qedjax.rewards import GradeItem, RuleGrader
    from qedjax.text import split_thinking

    per_turn: dict[int, list[float]] = collections.defaultdict(list)
    cut: dict[int, list[bool]] = collections.defaultdict(list)  # the turn ran out of its budget
    nonempty: dict[int, list[bool]] = collections.defaultdict(list)
    restated: list[bool] = []  # the next turn's `Known:` list equals the summary's results
    counted: list[bool] = []  # ... has as many results as the summary (it continues from its progress)
    stepped: list[bool] = []  # ... and, where the summary is not complete, works the next digit right
    items, turns = [], []
    for r in records:
        responses = list(r["trace"].get("turn_responses", [])) + [r["response"]]
        summaries = r["trace"].get("summaries", [])
        for k, text in enumerate(responses):
            items.append(GradeItem(problems[r["id"]].problem, text, problems[r["id"]].references))
            turns.append(k)
            cut[k + 1].append(k in r["trace"].get("truncated_turns", []))
        for k, summary in enumerate(summaries):
            nonempty[k + 1].append(bool(summary.strip()))
            said = _digits(_SO_FAR, summary)
            if said:  # the next turn's thinking should start from exactly these results
                known = _digits(_KNOWN, split_thinking(responses[k + 1]).thinking or responses[k + 1])
                restated.append(known == said)
                counted.append(known is not None and len(known) == len(said))
                if len(said) < len(toy.RESULT_LABELS):
                    stepped.append(known == said and _next_item_right(problems[r["id"]].problem, said,
                                                                      responses[k + 1]))
    for k, grade in zip(turns, RuleGrader().grade(items) if items else []):
        per_turn[k + 1].append(100.0 * grade.reward)
    return {"turn_scores": {k: statistics.fmean(v) for k, v in sorted(per_turn.items())},
            "turn_truncated": {k: statistics.fmean(v) for k, v in sorted(cut.items())},
            "summary_nonempty": {k: statistics.fmean(v) for k, v in sorted(nonempty.items())},
            "restated_summary": statistics.fmean(restated) if restated else None,
            "continued_from_count": statistics.fmean(counted) if counted else None,
            "next_item_right": statistics.fmean(stepped) if stepped else None,
            "summaries_with_results": len(restated)}


def report(config: str, run_dir: str, overrides: list[str], training: dict) -> dict:
    """Step 4 for one seed: comparison.json and comparison.md in run_dir."""
    from qedjax.benchmarks import load_benchmark
    from qedjax.config import load_config
    from qedjax.eval.report import paired_difference
    from qedjax.eval.run import read_jsonl

    cfg = load_config(config, [*overrides, f"run.dir={run_dir}"])
    bench = dataclasses.replace(cfg.eval.benchmark, path=os.path.join(run_dir, "toy", "eval.jsonl"), format="rules")
    problems = {p.id: p for p in load_benchmark(bench)}
    records, rows = {}, {}
    for model in MODELS:
        for scaffold in SCAFFOLDS:
            label = f"{model}-{scaffold}"
            records[label] = read_jsonl(Path(run_dir, "eval", label, "samples.jsonl"))
            s = json.loads(Path(run_dir, "eval", label, "summary.json").read_text())
            rows[label] = {k: s[k] for k in ("score", "stderr", "tokens_per_problem", "calls_per_problem")}
            rows[label]["truncated_share"] = s["length"]["truncated_share"]
            if scaffold == "rc":
                rows[label].update(mechanism(records[label], problems))
    diffs = {f"{m}: rc - single": paired_difference(records[f"{m}-single"], records[f"{m}-rc"]) for m in MODELS}
    diffs["rc: grpo_rc - grpo"] = paired_difference(records["grpo-rc"], records["grpo_rc-rc"])
    diffs["single: grpo_rc - grpo"] = paired_difference(records["grpo-single"], records["grpo_rc-single"])
    out = {"run_dir": run_dir, "per_call_budget": cfg.eval.sampling.max_new_tokens,
           "rc_turns": cfg.eval.rc.turns, "summary_budget": cfg.eval.rc.summary_max_new_tokens,
           "samples": cfg.eval.samples, "problems": len(problems), "training": training, "rows": rows,
           "differences": diffs}
    Path(run_dir, "comparison.json").write_text(json.dumps(out, indent=2) + "\n")
    Path(run_dir, "comparison.md").write_text(markdown(out))
    return out


def markdown(out: dict) -> str:
    lines = [f"## {out['run_dir']}", "",
             f"{out['problems']} problems x {out['samples']} samples; per-call budget {out['per_call_budget']} "
             f"tokens; RC: {out['rc_turns']} turns, summaries up to {out['summary_budget']} tokens.", "",
             "| model | scaffold | score % | stderr | tokens/problem | calls | truncated | per-turn score % "
             "| per-turn truncated "
             "| summaries non-empty | turn restates summary | ... as many results | ... then works the next "
             "digit right |", "|---" * 13 + "|"]
    for label, r in out["rows"].items():
        model, scaffold = label.rsplit("-", 1)
        turns = " / ".join(f"{v:.1f}" for v in r.get("turn_scores", {}).values()) or "-"
        turn_cut = " / ".join(f"{100 * v:.0f}%" for v in r.get("turn_truncated", {}).values()) or "-"
        nonempty = " / ".join(f"{100 * v:.0f}%" for v in r.get("summary_nonempty", {}).values()) or "-"
        restated = "-" if r.get("restated_summary") is None else f"{100 * r['restated_summary']:.0f}%"
        counted = "-" if r.get("continued_from_count") is None else f"{100 * r['continued_from_count']:.0f}%"
        stepped = "-" if r.get("next_item_right") is None else f"{100 * r['next_item_right']:.0f}%"
        lines.append(f"| {model} | {scaffold} | {r['score']:.1f} | {r['stderr']:.1f} | {r['tokens_per_problem']:.0f} "
                     f"| {r['calls_per_problem']:.1f} | {100 * r['truncated_share']:.0f}% | {turns} "
                     f"| {turn_cut} | {nonempty} "
                     f"| {restated} | {counted} | {stepped} |")
    lines += ["", "| paired difference | points | stderr | problems |", "|---|---|---|---|"]
    for name, d in out["differences"].items():
        lines.append(f"| {name} | {d['diff']:+.1f} | {d['stderr']:.1f} | {d['problems']} |")
    lines += ["", "| GRPO run | steps | sequences trained | rollout tokens (groups) | state tokens (at most) "
              "| reward first -> last | states with a summary |", "|---|---|---|---|---|---|---|"]
    for name, t in out["training"].items():
        first = "-" if t["reward_first"] is None else f"{t['reward_first']:.3f}"
        last = "-" if t["reward_last"] is None else f"{t['reward_last']:.3f}"
        with_summary = "-" if t["states_with_summary"] is None else f"{100 * t['states_with_summary']:.0f}%"
        lines.append(f"| {name} | {t['steps']} | {t['sequences']} | {t['rollout_tokens']} | "
                     f"{t['state_tokens_at_most']} | {first} -> {last} "
                     f"| {with_summary} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny-rc.yaml")
    p.add_argument("--seeds", default="0,1", help="comma-separated run seeds")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. sft.steps=100")
    args = p.parse_args(argv)
    from qedjax.config import load_config

    root = load_config(args.config, args.overrides).run.dir
    parts, timings = [], {}
    for seed in [int(x) for x in args.seeds.split(",")]:
        run_dir = os.path.join(root, f"seed{seed}")
        overrides = [o for o in args.overrides if not o.startswith("run.dir=")] + [f"run.seed={seed}"]
        t0 = time.perf_counter()
        training = train(args.config, run_dir, overrides)
        evaluate(args.config, run_dir, overrides)
        out = report(args.config, run_dir, overrides, training)
        timings[seed] = time.perf_counter() - t0
        parts.append(markdown(out) + f"\nWall time: {timings[seed]:.0f} s.\n")
        print(parts[-1], flush=True)
    Path(root, "comparison.md").write_text("# RC comparison (tools/rc_compare.py)\n\n" + "\n".join(parts))
    print(f"[rc_compare] wrote {os.path.join(root, 'comparison.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
