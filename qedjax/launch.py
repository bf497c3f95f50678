"""`python -m qedjax.launch --config FILE [--mesh SPEC] [--stage NAME ...] [key=value ...]`

Reads top to bottom: parse the config (every mistake fails here, before anything compiles), join
the other processes, build the mesh, prepare the run directory, then run the stages in order:
sft -> grpo -> eval -> export. Each stage resumes from its own checkpoints and skips itself when
it has finished, so re-running a killed pipeline continues where it stopped.

`--compile-only TPU` stops after the config checks: it compiles the selected stages' programs for a
TPU topology on this machine and reports whether they fit (qedjax/fit.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
import time

import jax

from qedjax import export, fit, pipeline, rl, sft, sharding
from qedjax.config import load_config
from qedjax.config_io import config_hash
from qedjax.metrics import MetricsWriter
from qedjax.provenance import write_run_info


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m qedjax.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML run config")
    p.add_argument("--mesh", help="data=D,fsdp=F,tensor=T (overrides run.mesh)")
    p.add_argument("--stage", action="append", help="run only this stage (repeatable)")
    p.add_argument("--checkpoint", help="export: the Orbax checkpoint directory to export")
    p.add_argument("--out", help="export: the Hugging Face directory to write")
    p.add_argument("--coordinator", help="HOST:PORT of process 0 (multi-process runs)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--compile-only", metavar="TPU", help="proof of fit: compile the stages' programs for a TPU "
                   "topology (v5p:2x2x2, v6e:2x4, v5e:2x2, ...) on this machine, print peak memory per chip "
                   "against HBM, exit 1 if one does not fit; runs nothing (qedjax/fit.py)")
    p.add_argument("--prompt-tokens", type=int, help="--compile-only: the longest prompt (default 1024, "
                   "plus grpo.rc.summary_max_new_tokens with RC)")
    p.add_argument("--fit-layers", help="--compile-only: A,B compiles the model cut to A and B blocks and "
                   "extrapolates to its depth: a faster triage, not a verdict (docs/FIT.md)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="qedjax's log level on process 0 (the other processes log warnings and errors only)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. sft.steps=4 run.dir=/tmp/x")
    return p.parse_args(argv)


def init_distributed(args) -> None:
    """jax.distributed: explicit flags, or the platform's auto-detection (TPU pods, SLURM)."""
    if args.coordinator:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif os.environ.get("QEDJAX_DISTRIBUTED") == "auto":
        jax.distributed.initialize()


def setup_logging(level: str) -> None:
    """One handler for the whole process, each line naming its process: qedjax's loggers at `level`
    on process 0 and at WARNING on the others (a pod's hosts would repeat every line); other
    libraries' loggers (Orbax, absl, httpx) at WARNING."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s [qedjax p{jax.process_index()}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    ours = logging.getLevelName(level)
    logging.getLogger("qedjax").setLevel(ours if jax.process_index() == 0 else max(ours, logging.WARNING))


@contextlib.contextmanager
def input_checks():
    """Marks the errors raised inside as mistakes in the config or its files: the command line
    (`cli`) reports them by their message alone, not with a traceback; callers of `main` get them
    as they are."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        e.bad_input = True
        raise


def validate(cfg, mesh, stages, check_paths: bool = True) -> None:
    """Cross-section checks that need the mesh; all before anything compiles."""
    for stage in stages:
        if getattr(cfg, stage) is None:
            raise ValueError(f"stage {stage!r} is selected but the config has no {stage!r} section")
    divisor = sharding.batch_divisor(mesh, sharding.TRAIN_RULES)
    if cfg.sft is not None and "sft" in stages:
        per_micro = cfg.sft.global_batch // cfg.sft.micro_batches
        if per_micro % divisor:
            raise ValueError(f"sft: {cfg.sft.global_batch} rows / {cfg.sft.micro_batches} micro-batches = "
                             f"{per_micro} rows per micro-batch, not divisible by the {divisor} batch shards "
                             f"of mesh {sharding.format_mesh(mesh)}")
    pipeline.check_engine(cfg, check_paths)
    if not check_paths:  # a fit check reads no weights, tokenizer or data
        return
    if cfg.model.hf_path is None and cfg.model.tokenizer is None and cfg.toy is None:
        raise ValueError("model.tokenizer is not set (and there is no model.hf_path or toy section)")
    for key in ("hf_path", "tokenizer"):
        path = getattr(cfg.model, key)
        if path and "://" not in path and not os.path.isdir(path):
            raise FileNotFoundError(f"model.{key}: {path!r} is not a directory")


def check_problem_files(cfg, stages) -> None:
    """Reads the grpo problems and the eval benchmark up front: a malformed row fails here, naming its
    file and line, before anything compiles (the SFT data is read before SFT compiles anything)."""
    from qedjax.benchmarks import load_benchmark

    for stage, key, section in (("grpo", "grpo.problems", cfg.grpo), ("eval", "eval.benchmark", cfg.eval)):
        if stage in stages:
            bench = section.problems if stage == "grpo" else section.benchmark
            try:
                load_benchmark(bench)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"{key}.path: {e}") from None


def with_toy_data(cfg, run_dir: str):
    """Generates the demo's tokenizer and data into run_dir/toy and points the config at them."""
    from qedjax import toy

    toy_dir = os.path.join(run_dir, "toy")
    tok_dir = os.path.join(toy_dir, "tokenizer")
    if jax.process_index() == 0 and not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        toy.build_tokenizer(tok_dir, vocab_size=cfg.toy.vocab_size, seed=cfg.toy.seed,
                            **toy.tokenizer_extras(cfg.toy))
    paths = toy.write_data(cfg.toy, toy_dir) if jax.process_index() == 0 else toy.data_paths(toy_dir)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("qedjax toy data written")
    rep = dataclasses.replace
    cfg = rep(cfg, model=rep(cfg.model, tokenizer=tok_dir))
    if cfg.sft is not None:
        cfg = rep(cfg, sft=rep(cfg.sft, data=rep(cfg.sft.data, path=paths["sft"])))
    if cfg.grpo is not None:
        cfg = rep(cfg, grpo=rep(cfg.grpo, problems=rep(cfg.grpo.problems, path=paths["rl"], format="rules")))
    if cfg.eval is not None:
        cfg = rep(cfg, eval=rep(cfg.eval, benchmark=rep(cfg.eval.benchmark, path=paths["eval"], format="rules")))
    return cfg


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    overrides = list(args.overrides) + ([f"run.mesh={args.mesh}"] if args.mesh else [])
    with input_checks():
        cfg = load_config(args.config, overrides)
    stages = tuple(args.stage or cfg.run.stages)
    if args.compile_only:  # proof of fit before renting the hardware: compile, run nothing
        with input_checks():
            mesh = fit.target_mesh(args.compile_only, cfg.run.mesh)
            validate(cfg, mesh, stages, check_paths=False)
        layers = tuple(int(x) for x in args.fit_layers.split(",")) if args.fit_layers else None
        return fit.report(cfg, mesh, stages, args.compile_only, prompt_tokens=args.prompt_tokens, layers=layers)
    init_distributed(args)
    setup_logging(args.log_level)
    with input_checks():
        mesh = sharding.make_mesh(cfg.run.mesh)
        validate(cfg, mesh, stages)
    run_dir = cfg.run.dir
    os.makedirs(run_dir, exist_ok=True)
    if cfg.toy is not None:
        cfg = with_toy_data(cfg, run_dir)
    with input_checks():
        check_problem_files(cfg, stages)
    write_run_info(run_dir, cfg, mesh, argv=sys.argv[1:] if argv is None else argv)
    writer = MetricsWriter(run_dir, deterministic=cfg.run.deterministic)
    tokenizer_path = cfg.model.tokenizer or cfg.model.hf_path
    tokenizer = sft.load_tokenizer(tokenizer_path)
    make_engine = pipeline.engine_factory(cfg, tokenizer, mesh, run_dir)
    if jax.process_index() == 0:
        print(f"[qedjax] run dir {run_dir} | mesh {sharding.format_mesh(mesh)} on {jax.device_count()} "
              f"{jax.devices()[0].platform} device(s) | stages {', '.join(stages)}")
    timings, evals = {}, {}
    for stage in stages:
        t0 = time.perf_counter()
        if stage == "sft":
            sft.run(cfg, mesh, run_dir, writer, tokenizer_path=tokenizer_path)
        elif stage == "grpo":
            grader = pipeline.build_grader(cfg.grpo.grader, cfg, run_dir, style="rubric",
                                           answer_timeout_s=cfg.grpo.answer_timeout_s)
            make_summarizer = pipeline.summarizer_factory(cfg.grpo.rc.summarizer, cfg, tokenizer, mesh, run_dir)
            rl.run(cfg, mesh, run_dir, writer, tokenizer=tokenizer, grader=grader, make_engine=make_engine,
                   make_summarizer=make_summarizer)
        elif stage == "eval":
            evals = pipeline.run_evals(cfg, mesh, run_dir, tokenizer, make_engine)
        elif stage == "export":
            export.run(cfg, mesh, run_dir, checkpoint=args.checkpoint, out=args.out, tokenizer_path=tokenizer_path)
        timings[stage] = time.perf_counter() - t0
    writer.close()
    summary = pipeline.write_summary(run_dir, evals, timings, {"config_hash": config_hash(cfg)})
    if jax.process_index() == 0:
        if evals:
            print(pipeline.summary_table(summary))
        print("[qedjax] done: " + ", ".join(f"{s} {t:.1f}s" for s, t in timings.items()))
    return 0


def cli() -> int:
    try:
        return main()
    except (ValueError, FileNotFoundError) as e:
        if getattr(e, "bad_input", False):
            raise SystemExit(f"qedjax.launch: {e}") from None
        raise


if __name__ == "__main__":
    sys.exit(cli())
