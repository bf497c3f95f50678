"""What the launcher plugs together: rollout engines, graders, evaluation targets and the summary.

Kept apart from launch.py so that the launcher reads as the sequence of stages and this file holds
the choices behind them (which engine, which grader style, which checkpoint an eval target means).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
from flax import nnx

from qedjax import train
from qedjax.checkpoint import Checkpointer, CheckpointConfig, restore_params
from qedjax.metrics import plot_metrics
from qedjax.rewards import Grader, make_grader
from qedjax.sharding import ROLLOUT_RULES

ENGINES = ("jax", "vllm")
TARGETS = ("base", "sft", "grpo", "final")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    kind: str = "jax"  # "jax": the in-process sampler | "vllm": vLLM on GPUs (weights via the store)
    max_batch: int = 256  # JAX sampler: rows decoded together
    store: str | None = None  # vLLM: the weight store URL (default run_dir/weights)
    vllm_args: dict = dataclasses.field(default_factory=dict)  # vLLM: extra vllm.LLM arguments

    def __post_init__(self):
        if self.kind not in ENGINES:
            raise ValueError(f"engine.kind must be one of {ENGINES}, got {self.kind!r}")


def engine_factory(cfg, tokenizer, mesh, run_dir: str):
    """(model, version) -> RolloutEngine, per the engine section."""
    if cfg.engine.kind == "vllm":
        from qedjax.rollout.vllm import VllmEngine

        store = cfg.engine.store or os.path.join(run_dir, "weights")
        return lambda model, version: VllmEngine.from_model(model, version, store=store, tokenizer=tokenizer,
                                                            **cfg.engine.vllm_args)
    from qedjax.rollout.jax_engine import JaxEngine

    return lambda model, version: JaxEngine(model, tokenizer, max_batch=cfg.engine.max_batch, version=version)


def build_grader(kind: str, cfg, run_dir: str, style: str | None = None) -> Grader:
    """The grader of a stage; a judge takes the `judge` section (with the stage's prompt style) and
    caches its replies under the run directory unless the section names a cache."""
    if kind != "judge":
        return make_grader(kind)
    if cfg.judge is None:
        raise ValueError("a judge grader needs a `judge` section (base_url, model, ...)")
    judge = cfg.judge
    if style is not None:
        judge = dataclasses.replace(judge, style=style)
    if judge.cache_dir is None:
        judge = dataclasses.replace(judge, cache_dir=os.path.join(run_dir, "judge_cache"))
    return make_grader("judge", **dataclasses.asdict(judge))


def stage_checkpoints(run_dir: str, stage: str) -> str | None:
    """The checkpoint directory of a finished (or started) stage, if it has a checkpoint."""
    directory = os.path.join(run_dir, stage, "checkpoints")
    if not os.path.isdir(directory):
        return None
    ckpt = Checkpointer(directory, CheckpointConfig(async_save=False))
    try:
        return directory if ckpt.latest_step() is not None else None
    finally:
        ckpt.close()


def target_params(cfg, target: str, mesh, run_dir: str, vocab_size: int):
    """(graphdef, params) an evaluation target names: the base model, a stage's latest checkpoint, or
    the final model (grpo, else sft, else base)."""
    if target not in TARGETS:
        raise ValueError(f"eval target {target!r} is not one of {TARGETS}")
    rules = ROLLOUT_RULES
    stage = target
    if target == "final":
        stage = next((s for s in ("grpo", "sft") if stage_checkpoints(run_dir, s)), "base")
    if stage == "base":
        _, graphdef, params = train.init_params(cfg.model, mesh, rules, seed=cfg.run.seed, vocab_size=vocab_size)
        return graphdef, params
    directory = stage_checkpoints(run_dir, stage)
    if directory is None:
        raise FileNotFoundError(f"eval target {target!r}: the {stage} stage has no checkpoint in {run_dir}")
    _, graphdef, target_tree = train.abstract_params(cfg.model, mesh, rules)
    return graphdef, restore_params(directory, target_tree)


def run_evals(cfg, mesh, run_dir: str, tokenizer, make_engine) -> dict[str, dict]:
    """Evaluates every target of run.eval_targets with the eval section; returns their summaries."""
    from qedjax.eval.run import run_eval

    ev = cfg.eval
    grader = build_grader(ev.grader, cfg, run_dir, style=ev.judge_style)
    judge = build_grader("judge", cfg, run_dir, style="proofbench") if ev.confirm_with_judge else None
    out = {}
    for target in cfg.run.eval_targets:
        graphdef, params = target_params(cfg, target, mesh, run_dir, len(tokenizer))
        engine = make_engine(nnx.merge(graphdef, params), 0)
        out[target] = run_eval(ev, engine, grader, run_dir, label=target, judge=judge)
        del engine, params
    return out


def write_summary(run_dir: str, evals: dict[str, dict], timings: dict[str, float], extra: dict) -> dict:
    """run_dir/summary.json, a reward-per-step plot, and the table printed at the end of a run."""
    summary = {"stages": {k: {"score": v.get("score"), "stderr": v.get("stderr"),
                              "tokens_per_problem": v.get("tokens_per_problem")} for k, v in evals.items()},
               "timings_s": {k: round(v, 2) for k, v in timings.items()}, **extra}
    if jax.process_index() != 0:
        return summary
    plots = [plot_metrics(run_dir, "grpo", ["reward_mean", "response_len_mean", "clip_fraction"],
                          "grpo_reward.png"),
             plot_metrics(run_dir, "sft", ["loss", "grad_norm", "lr"], "sft_loss.png")]
    summary["plots"] = [p for p in plots if p]
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def summary_table(summary: dict) -> str:
    lines = ["", f"{'model':<8} {'score %':>8} {'stderr':>7} {'tokens/problem':>15}"]
    for name, s in summary["stages"].items():
        score = "-" if s["score"] is None else f"{s['score']:.1f}"
        err = "-" if s["stderr"] is None else f"{s['stderr']:.1f}"
        tok = "-" if s["tokens_per_problem"] is None else f"{s['tokens_per_problem']:.0f}"
        lines.append(f"{name:<8} {score:>8} {err:>7} {tok:>15}")
    return "\n".join(lines)
