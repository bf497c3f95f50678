"""What the launcher plugs together: rollout engines, graders, evaluation targets and the summary.

Kept apart from launch.py so that the launcher reads as the sequence of stages and this file holds
the choices behind them (which engine, which grader style, which checkpoint an eval target means).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
from pathlib import Path

import jax
from flax import nnx

from qedjax import multihost, storage, train
from qedjax.checkpoint import restore_params
from qedjax.metrics import plot_metrics
from qedjax.rewards import Grader, make_grader
from qedjax.sharding import ROLLOUT_RULES, SUMMARIZER_RULES

ENGINES = ("jax", "vllm", "workers")
PROMPT_TOKENS = 4096  # the problem and the chat template around it, in the default engine.max_model_len
TARGETS = ("base", "sft", "grpo", "final")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    # "jax": the in-process sampler | "vllm": vLLM on this host's GPUs (weights via the store) |
    # "workers": rollout workers elsewhere (qedjax.rollout.worker; weights via the store, work via the queue)
    kind: str = "jax"
    max_batch: int = 256  # JAX sampler: rows decoded together
    decode_chunk: int = 64  # JAX sampler: decode steps per program call; a stop request is honoured between calls
    store: str | None = None  # vllm, workers: the weight store path or URL (default run_dir/weights)
    queue: str | None = None  # workers: the work queue directory, shared with them (default run_dir/rollout_queue)
    vllm_args: dict = dataclasses.field(default_factory=dict)  # vLLM: extra vllm.LLM arguments
    # vLLM: arguments of the RC summariser's own engine (over vllm_args), when it is a model of its own;
    # both engines share the GPUs, so give each its gpu_memory_utilization
    summarizer_vllm_args: dict = dataclasses.field(default_factory=dict)
    # vllm, workers: where the RC summariser's weights are published when it is a model of its own or a
    # frozen copy (default run_dir/summarizer_weights); workers read it, so it must be shared with them
    summarizer_store: str | None = None
    # vllm, workers: the dtype versions are published in and the engines run in (default: model.dtype,
    # the compute dtype: a bf16 model trained with fp32 master weights publishes half the bytes)
    dtype: str | None = None
    # workers: problems of a step per work item (each makes its RC states and groups), so that every
    # worker shares every step
    problems_per_item: int = 2
    # workers: the engines' context length (default: grpo.sampling.max_new_tokens, plus the RC
    # summaries, plus PROMPT_TOKENS for the problem and the template; rollout.items.max_model_len)
    max_model_len: int | None = None
    # workers: items a worker holds at once, one running and the next waiting (so it never idles between
    # items); 1 spreads a step's items as widely as possible, which suits steps of few items
    worker_slots: int = 2
    heartbeat_s: float = 10.0  # workers: seconds between a worker's heartbeats
    worker_timeout_s: float = 300.0  # workers: a worker whose heartbeat is still this long is dead

    def __post_init__(self):
        if self.kind not in ENGINES:
            raise ValueError(f"engine.kind must be one of {ENGINES}, got {self.kind!r}")
        if self.dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"engine.dtype must be float32 or bfloat16, got {self.dtype!r}")
        if (self.problems_per_item < 1 or self.worker_slots < 1 or self.heartbeat_s <= 0
                or self.worker_timeout_s <= self.heartbeat_s):
            raise ValueError("engine needs problems_per_item >= 1, worker_slots >= 1, heartbeat_s > 0 and "
                             "worker_timeout_s > heartbeat_s")
        if self.decode_chunk < 1:
            raise ValueError(f"engine.decode_chunk must be >= 1, got {self.decode_chunk}")


class PublishingEngine:
    """A weight-store engine (vLLM) driven by an in-process trainer: `load_weights(version, params)`
    publishes the parameters to the store, then has the engine load that version. `close()` hands
    the engine back to the factory that made it, for its next user (see engine_factory)."""

    def __init__(self, engine, store, config, release=None, dtype: str | None = None):
        self.engine, self.store, self.config, self._release, self.dtype = engine, store, config, release, dtype
        self.generate, self.count_tokens = engine.generate, engine.count_tokens

    @property
    def version(self) -> int:
        return self.engine.version

    def load_weights(self, version: int, weights=None) -> None:
        if weights is not None:
            self.store.publish(weights, version, config=self.config, dtype=self.dtype)
        self.engine.load_weights(version)

    def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release(self.engine)


class WorkerPublisher:
    """The trainer's engine when rollout workers generate (engine.kind=workers). It generates nothing:
    `load_weights(version, params)` publishes the parameters to the store the workers follow, and
    rl.run takes its rollouts from the work queue at `queue_dir` (qedjax.rollout.worker.Dispatcher)."""

    def __init__(self, store, queue_dir: str, config, version: int, dtype: str | None = None,
                 dispatch: dict | None = None):
        self.store, self.queue_dir, self.config, self.dtype = store, queue_dir, config, dtype
        self.dispatch = dispatch or {}  # qedjax.rollout.dispatch.Dispatcher options of the engine section
        self._version = version

    @property
    def version(self) -> int:
        return self._version

    def load_weights(self, version: int, weights=None) -> None:
        if weights is not None:
            self.store.publish(weights, version, config=self.config, dtype=self.dtype)
        self._version = version

    def generate(self, requests, params):
        raise RuntimeError("engine.kind=workers: rollout workers (python -m qedjax.rollout.worker) generate the "
                           "grpo stage's rollouts; nothing generates in the trainer (use engine.kind=jax or vllm "
                           "for other stages)")

    def count_tokens(self, text: str) -> int:
        raise RuntimeError("engine.kind=workers: the trainer holds no generating engine")


def check_summarizer(name: str, key: str, check_paths: bool = True) -> None:
    """A summarizer setting names "policy", "frozen", a local model directory or a preset (without
    `check_paths`, as for a fit check that reads no weights, any name)."""
    from qedjax.models.qwen3 import PRESETS

    if check_paths and name not in ("policy", "frozen") and name not in PRESETS and not os.path.isdir(name):
        raise FileNotFoundError(f"{key}: {name!r} is neither 'policy', 'frozen', a preset ({sorted(PRESETS)}) "
                                f"nor a model directory")


def close_engine(engine) -> None:
    """Done with an engine from engine_factory (in-process JAX engines need no closing)."""
    close = getattr(engine, "close", None)
    if close is not None:
        close()


def check_engine(cfg, check_paths: bool = True) -> None:
    """Checks between the engine and the grpo and eval sections, before anything compiles (and, with
    `check_paths`, that a summariser's model directory exists)."""
    if cfg.eval is not None and cfg.eval.scaffold == "rc":
        check_summarizer(cfg.eval.rc.summarizer, "eval.rc.summarizer", check_paths)
    g = cfg.grpo
    if g is None:
        return
    if g.rc.enabled:
        check_summarizer(g.rc.summarizer, "grpo.rc.summarizer", check_paths)
    if g.mode == "async" and jax.process_count() > 1 and cfg.engine.kind != "workers":
        raise ValueError("grpo.mode=async runs rollouts in a second thread, which a multi-process JAX run cannot "
                         "do (collectives would interleave differently on each host): use mode=sync, or rollout "
                         "workers (engine.kind=workers, qedjax.rollout.worker)")


def preflight(cfg, run_dir: str, stages) -> None:
    """Checks the services a run needs, each failing in seconds with a message naming it, before
    anything compiles: the judge answers a probe (qedjax.judge.probe) and serves its model, and every
    store the run writes (checkpoints, the weight store, the work queue, the summariser's store) takes
    a write. Process 0 alone asks (the others never call the judge or write these first). The workers
    that joined a rollout queue are checked by the trainer before its first step (Dispatcher.start)."""
    if jax.process_index() != 0:
        return
    from qedjax.judge import probe

    needs_judge = ("grpo" in stages and cfg.grpo is not None and cfg.grpo.grader == "judge") or (
        "eval" in stages and cfg.eval is not None and (cfg.eval.grader == "judge" or cfg.eval.confirm_with_judge))
    if needs_judge and cfg.judge is not None:
        probe(cfg.judge)
    stores = {"checkpoint directory (run.checkpoint_dir)": cfg.run.checkpoint_dir}
    if "grpo" in stages and cfg.engine.kind in ("vllm", "workers"):
        stores["weight store (engine.store)"] = store_url(cfg, run_dir)
        if cfg.engine.kind == "workers":
            stores["work queue (engine.queue)"] = queue_url(cfg, run_dir)
        if cfg.grpo.rc.enabled and cfg.grpo.rc.summarizer != "policy":
            stores["summariser store (engine.summarizer_store)"] = (cfg.engine.summarizer_store
                                                                  or storage.join(run_dir, "summarizer_weights"))
    for what, path in stores.items():
        if path is not None:
            storage.check_writable(path, what)


def _uncommit_newer(store, version: int) -> None:
    """Uncommits store versions above `version`. An earlier run of the stage that got past its last
    checkpoint left them; they would shadow the resumed run's versions (workers follow the newest) and
    push them out of the store's `keep`."""
    if jax.process_index() == 0:
        for v in store.versions():
            if v > version:
                store.uncommit(v)


def engine_dtype(cfg) -> str:
    return cfg.engine.dtype or cfg.model.dtype


def store_url(cfg, run_dir: str) -> str:
    return cfg.engine.store or storage.join(run_dir, "weights")


def queue_url(cfg, run_dir: str) -> str:
    """The work queue: engine.queue, else `rollout_queue` beside the weight store."""
    return cfg.engine.queue or storage.join(storage.parent(store_url(cfg, run_dir)), "rollout_queue")


def engine_factory(cfg, tokenizer, mesh, run_dir: str):
    """(model, version) -> RolloutEngine, per the engine section."""
    check_engine(cfg)
    dtype = engine_dtype(cfg)
    if cfg.engine.kind == "workers":
        from qedjax.rollout import items
        from qedjax.rollout.weights import WeightStore

        store = WeightStore(store_url(cfg, run_dir))
        queue = queue_url(cfg, run_dir)
        e = cfg.engine
        dispatch = {"problems_per_item": e.problems_per_item, "slots": e.worker_slots, "dead_after_s": e.worker_timeout_s}

        def publisher(model, version):
            if jax.process_index() == 0:  # what the workers need beyond the store's URL (rollout.items)
                items.publish_tokenizer(tokenizer, store.path)
                g = cfg.grpo
                items.publish_run(store.path, queue=queue, heartbeat_s=e.heartbeat_s,
                                  max_model_len=e.max_model_len or (items.max_model_len(g, PROMPT_TOKENS) if g else None))
            _uncommit_newer(store, version)
            store.publish(model, version, dtype=dtype)
            return WorkerPublisher(store, queue, model.config, version, dtype, dispatch)

        return publisher
    if cfg.engine.kind == "vllm":
        from qedjax.rollout.vllm import VllmEngine
        from qedjax.rollout.weights import WeightStore

        store = WeightStore(store_url(cfg, run_dir))
        idle: list = []  # vLLM engines their users closed: the next make() loads its model into one

        def make(model, version):
            _uncommit_newer(store, version)  # the store keeps the newest versions: a lower one would go at once
            store.publish(model, version, dtype=dtype)
            while idle:  # starting vLLM takes long (20 s to minutes): reuse a running engine
                engine = idle.pop()
                try:
                    engine.load_weights(version)
                    return PublishingEngine(engine, store, model.config, release=idle.append, dtype=dtype)
                except ValueError:  # another architecture or dtype
                    engine.close()
            engine = VllmEngine(store, tokenizer, version=version, **cfg.engine.vllm_args)
            return PublishingEngine(engine, store, model.config, release=idle.append, dtype=dtype)

        atexit.register(lambda: [engine.close() for engine in idle])
        return make
    from qedjax.rollout.jax_engine import JaxEngine

    return lambda model, version: JaxEngine(model, tokenizer, mesh=mesh, max_batch=cfg.engine.max_batch,
                                            version=version, decode_chunk=cfg.engine.decode_chunk)


def summarizer_factory(name: str, cfg, tokenizer, mesh, run_dir: str):
    """(starting policy, version) -> the engine that writes RC summaries, for a summarizer setting:
    "frozen" (a frozen copy of the stage's starting policy) or the name of a model of its own (a local
    Hugging Face directory, or a qedjax preset with random weights seeded from run.seed), loaded once
    and never updated. It gets its own engine: in-process with its own tokenizer and chat template (the
    directory's, else the policy's) and its weights sharded as in training (SUMMARIZER_RULES); with
    vLLM a second engine over its own weight store (engine.summarizer_store, default
    run_dir/summarizer_weights); with rollout workers the weights are published to that store and the
    workers build the engine (a qedjax.rollout.worker.StoreSummarizer names it). "policy" needs no
    factory."""
    kind = cfg.engine.kind

    def own_model():
        from qedjax.rollout.rc import derive_seed

        local = os.path.isdir(name)
        model_cfg = dataclasses.replace(cfg.model, hf_path=name if local else None, preset=None if local else name,
                                        remat=False)
        has_tokenizer = local and os.path.exists(os.path.join(name, "tokenizer_config.json"))
        tok = tokenizer
        if has_tokenizer:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(name)
        _, graphdef, params = train.init_params(model_cfg, mesh, SUMMARIZER_RULES,
                                                seed=derive_seed(cfg.run.seed, "summarizer"), vocab_size=len(tok))
        return nnx.merge(graphdef, params), tok, name if has_tokenizer else None

    def make(policy_model=None, version: int = 0):
        model, tok, tok_dir = (policy_model, tokenizer, None) if name == "frozen" else own_model()
        if kind == "jax":  # weights sharded as in training (sharding.SUMMARIZER_RULES)
            from qedjax.rollout.jax_engine import JaxEngine

            return JaxEngine(model, tok, mesh=mesh, rules=SUMMARIZER_RULES, max_batch=cfg.engine.max_batch, version=0,
                             decode_chunk=cfg.engine.decode_chunk)
        from qedjax.rollout.weights import WeightStore

        store = WeightStore(cfg.engine.summarizer_store or storage.join(run_dir, "summarizer_weights"))
        # Again on every start: the store then always holds this run's summariser.
        store.publish(model, 0, dtype=engine_dtype(cfg))
        if kind == "workers":
            from qedjax.rollout.items import StoreSummarizer, publish_tokenizer

            if tok_dir is not None and jax.process_index() == 0:
                publish_tokenizer(tok, store.path)
            return StoreSummarizer(str(store.path), 0, tok_dir is not None)
        from qedjax.rollout.vllm import VllmEngine

        return VllmEngine(store, tok, version=0, **{**cfg.engine.vllm_args, **cfg.engine.summarizer_vllm_args})

    return make


def build_grader(kind: str, cfg, run_dir: str, style: str | None = None,
                 answer_timeout_s: float | None = None) -> Grader:
    """The grader of a stage; a judge takes the `judge` section (with the stage's prompt style) and
    caches its replies under the run directory unless the section names a cache; an answer grader
    takes the stage's comparison timeout (None: the grader's default)."""
    if kind == "answer" and answer_timeout_s is not None:
        return make_grader(kind, timeout_s=answer_timeout_s)
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


def target_params(cfg, target: str, mesh, run_dir: str, vocab_size: int):
    """(graphdef, params) an evaluation target names: the base model, a stage's latest checkpoint, or
    the final model (grpo, else sft, else base)."""
    from qedjax.export import find_checkpoint

    if target not in TARGETS:
        raise ValueError(f"eval target {target!r} is not one of {TARGETS}")
    rules = ROLLOUT_RULES
    root = cfg.run.checkpoint_dir or run_dir
    directory = None
    if target in ("sft", "grpo"):
        directory, _ = find_checkpoint(root, os.path.join(root, target, "checkpoints"))
    elif target == "final":
        try:
            directory, _ = find_checkpoint(root)
        except FileNotFoundError:  # nothing trained yet: the final model is the base model
            directory = None
    if directory is None:
        _, graphdef, params = train.init_params(cfg.model, mesh, rules, seed=cfg.run.seed, vocab_size=vocab_size)
        return graphdef, params
    _, graphdef, target_tree = train.abstract_params(cfg.model, mesh, rules)
    return graphdef, restore_params(directory, target_tree)


def run_evals(cfg, mesh, run_dir: str, tokenizer, make_engine) -> dict[str, dict]:
    """Evaluates every target of run.eval_targets with the eval section; returns their summaries.

    On several processes, every process generates every response (each generation is one SPMD
    program over the whole mesh: the processes' devices decode their shares of the rows together),
    and process 0 alone grades, writes the records and the report; the others wait for it at the end.
    Grading in one place costs little beside generating (a judge is a remote service with its own
    concurrency, answer checks are cheap) and keeps one writer per file, so a resumed evaluation reads
    one set of records; process 0 tells the others what is left to generate (qedjax.eval.run).
    """
    from qedjax.eval.run import run_eval

    if cfg.engine.kind == "workers":
        raise ValueError("the eval stage generates in this process: run it with engine.kind=jax or vllm "
                         "(rollout workers serve the grpo stage only)")
    ev = cfg.eval
    lead = jax.process_index() == 0
    grader = build_grader(ev.grader, cfg, run_dir, style=ev.judge_style) if lead else None
    judge = build_grader("judge", cfg, run_dir, style="proofbench") if ev.confirm_with_judge and lead else None
    out = {}
    summarizer = None  # RC with a summariser of its own: one engine for every target
    if ev.scaffold == "rc" and ev.rc.summarizer not in ("policy", "frozen"):
        summarizer = summarizer_factory(ev.rc.summarizer, cfg, tokenizer, mesh, run_dir)()
    for target in cfg.run.eval_targets:
        graphdef, params = target_params(cfg, target, mesh, run_dir, len(tokenizer))
        engine = make_engine(nnx.merge(graphdef, params), 0)
        out[target] = run_eval(ev, engine, grader, run_dir, label=target, judge=judge, summarizer=summarizer,
                               progress=lead)
        close_engine(engine)
        del engine, params
    if summarizer is not None:
        close_engine(summarizer)
    multihost.sync("qedjax eval written")
    return out


def compare_targets(run_dir: str, labels) -> dict[str, dict]:
    """Each evaluated model against the one before it (`"sft-base"`, `"grpo-sft"`): the paired
    difference in score over the problems both answered, with its standard error."""
    from qedjax.eval.report import paired_difference
    from qedjax.eval.run import read_jsonl

    records = {k: read_jsonl(Path(run_dir, "eval", k, "samples.jsonl")) for k in labels}
    labels = list(labels)
    return {f"{b}-{a}": paired_difference(records[a], records[b]) for a, b in zip(labels, labels[1:])}


def write_summary(run_dir: str, evals: dict[str, dict], timings: dict[str, float], extra: dict) -> dict:
    """run_dir/summary.json, a reward-per-step plot, and the table printed at the end of a run."""
    summary = {"stages": {k: {"score": v.get("score"), "stderr": v.get("stderr"),
                              "tokens_per_problem": v.get("tokens_per_problem")} for k, v in evals.items()},
               "timings_s": {k: round(v, 2) for k, v in timings.items()}, **extra}
    if jax.process_index() != 0:
        return summary
    if len(evals) > 1:
        summary["differences"] = compare_targets(run_dir, evals)
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
    for name, d in summary.get("differences", {}).items():
        lines.append(f"{name}: {d['diff']:+.1f} points, paired standard error {d['stderr']:.1f} "
                     f"over {d['problems']} problems")
    return "\n".join(lines)
