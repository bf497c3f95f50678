"""Rollout workers: RL rollouts generated away from the trainer (vLLM on GPU nodes), sent back as objects.

    python -m qedjax.rollout.worker --store gs://BUCKET/run/weights --gpu-memory-utilization 0.9

A worker is given the weight store's URL and its own machine's settings (GPU memory share, tensor
parallelism), nothing else: the trainer (`engine.kind: workers`) describes the run at the store's
root (qedjax.rollout.items: the queue's URL, the context length, the heartbeat period, the tokenizer;
the dtype is the store's, since versions are published in the engines' dtype). The trainer and its
workers then meet in two places:
  - the weight store (qedjax.rollout.weights): the trainer publishes each new policy version, the
    workers load it;
  - the work queue (qedjax.rollout.queue): the trainer cuts each RL step into items of a few problems
    and assigns them to the live workers; a worker makes the RC states and the groups of rollouts of
    its items with `groups.sample_groups` and hands back the ungraded Rollouts (completions with their
    tokens, behaviour logprobs and policy version). The trainer (qedjax.rollout.dispatch) puts a
    step's items back together, grades them and trains.

Lag. Before making an item a worker loads the store's newest version, and waits until it has at
least the version the item names, so an item is never generated with weights older than those the
trainer had when it asked for it.

Summariser. With `grpo.rc.summarizer: policy` RC states are summarised by the worker's own engine. With
a summariser of its own the trainer publishes its weights (and its tokenizer, if it has one) once, as
version 0 of a second store, and names that store in every item (`items.StoreSummarizer`); a worker
builds a second engine on it the first time an item asks (vLLM: `--vllm-arg` options overlaid with
`--summarizer-vllm-arg`, e.g. each engine's gpu_memory_utilization) and keeps it while the items name
the same publication.

Worker ids name assignments and heartbeats (default: host-pid); a worker restarted under the same id
picks up the items still assigned to it. A worker stops when the trainer closes the queue at the end
of the stage, on SIGTERM (its heartbeat goes, and the trainer gives its items to the others at once),
or after `--max-items`. A failure while making rollouts is reported to the trainer, which stops with it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from typing import Callable

import jax.numpy as jnp
from flax import nnx

import qedjax
from qedjax.checkpoint import fault_point
from qedjax.convert import _get, _set, abstract_model, key_table, to_ours
from qedjax.rollout import groups, items
from qedjax.rollout.engine import RolloutEngine
from qedjax.rollout.jax_engine import JaxEngine
from qedjax.rollout.queue import HEARTBEAT_S, WorkQueue, check_id
from qedjax.rollout.weights import WeightStore, WeightStoreError


# --- engines that follow the store ----------------------------------------------------------------------

def load_params(store: WeightStore, version: int):
    """A committed store version as qedjax parameters: (config, graphdef, params pure dict)."""
    config = store.config(version)
    graphdef, abstract = abstract_model(config)
    shapes = nnx.to_pure_dict(abstract)
    keys = {k.hf: k for k in key_table(config)}
    params: dict = {}
    for name, array in store.read(version):
        key = keys[name]
        _set(params, key.path, jnp.asarray(to_ours(array, key.layout, tuple(_get(shapes, key.path).shape))))
    return config, graphdef, params


class StoreJaxEngine(JaxEngine):
    """The JAX sampler fed from a weight store (`--engine jax`: CPU or TPU workers, and tests)."""

    def __init__(self, store: WeightStore, tokenizer, *, version: int, max_batch: int = 256):
        _, graphdef, params = load_params(store, version)
        super().__init__(nnx.merge(graphdef, params), tokenizer, max_batch=max_batch, version=version)
        self.store = store

    def load_weights(self, version: int, weights=None) -> None:
        if weights is None:
            weights = load_params(self.store, version)[2]
        super().load_weights(version, weights)


# --- the worker -----------------------------------------------------------------------------------------

def _log(worker_id: str, message: str) -> None:
    print(f"[qedjax worker {worker_id}] {message}", file=sys.stderr, flush=True)


def _follow(store: WeightStore, engine, make_engine, worker_id: str):
    """The engine on the store's newest version (built on the first one; None while the store is empty).
    A different newest version is loaded even if lower: the trainer rewound (resumed from a checkpoint)."""
    latest = store.latest()
    if latest is None or (engine is not None and latest == engine.version):
        return engine
    t0 = time.perf_counter()
    try:
        if engine is None:
            engine = make_engine(latest)
        else:
            engine.load_weights(latest)
    except WeightStoreError as e:  # collected or re-published while loading: the engine kept its weights
        _log(worker_id, f"could not load version {latest}, retrying later: {e}")
        return engine
    _log(worker_id, f"loaded version {latest} in {time.perf_counter() - t0:.1f}s")
    return engine


class _Heartbeat(threading.Thread):
    def __init__(self, queue: WorkQueue, worker_id: str, every_s: float, status: dict):
        super().__init__(daemon=True)
        self.queue, self.worker_id, self.every_s, self.status = queue, worker_id, every_s, status
        self.stopped = threading.Event()

    def run(self):
        while True:
            try:
                self.queue.heartbeat(self.worker_id, host=socket.gethostname(), **self.status)
            except OSError as e:  # a shared filesystem hiccup: the next beat may get through
                _log(self.worker_id, f"heartbeat failed: {e}")
            if self.stopped.wait(self.every_s):
                return


class _Summarizers:
    """The summariser engine an item names, built on first use and kept while items name the same
    publication (store, version and its manifest: a trainer restarted with another summariser
    republishes version 0, and the worker builds anew)."""

    def __init__(self, make: Callable[[dict], RolloutEngine] | None, worker_id: str):
        self.make, self.worker_id = make, worker_id
        self.key, self.engine = None, None

    def get(self, spec: dict | None, policy: RolloutEngine) -> RolloutEngine:
        if spec is None:
            return policy
        if self.make is None:
            raise RuntimeError("the work item names an RC summariser of its own, and this worker was given no "
                               "way to build one (serve(..., make_summarizer=...))")
        key = (spec["store"], spec["version"], json.dumps(WeightStore(spec["store"]).manifest(spec["version"]),
                                                            sort_keys=True))
        if key != self.key:
            self.close()
            t0 = time.perf_counter()
            self.engine, self.key = self.make(spec), key
            _log(self.worker_id, f"built the RC summariser from {spec['store']} (version {spec['version']}) in "
                                 f"{time.perf_counter() - t0:.1f}s")
        return self.engine

    def close(self) -> None:
        engine, self.engine, self.key = self.engine, None, None
        if engine is not None and hasattr(engine, "close"):
            engine.close()


def serve(queue_root: str | os.PathLike, store: WeightStore | str, make_engine: Callable[[int], RolloutEngine], *,
          worker_id: str, poll_s: float = 2.0, max_items: int | None = None,
          stop: threading.Event | None = None, heartbeat_s: float = HEARTBEAT_S,
          make_summarizer: Callable[[dict], RolloutEngine] | None = None) -> int:
    """Makes the RL rollout items the trainer assigns to this worker until told to stop; returns the
    number of items done.

    Args:
      queue_root: the work queue's path or URL.
      store: the weight store (or its path / URL) the trainer publishes to.
      make_engine: version -> RolloutEngine loaded with that store version; its `load_weights(v)`
        must read version v from the store (VllmEngine, StoreJaxEngine).
      worker_id: this worker's name in assignments and heartbeats.
      poll_s: wait between looks at the queue while idle.
      max_items: stop after this many items.
      stop: stop once idle when set.
      heartbeat_s: seconds between heartbeats (the trainer's run description sets it).
      make_summarizer: a summariser spec (items.StoreSummarizer.spec) -> an engine loaded with it, for
        items whose RC summariser is a model of its own.
    Stops (once idle) when the trainer closes the queue, if this worker saw it open.
    """
    check_id(worker_id, "worker id")
    queue = WorkQueue(queue_root)
    store = WeightStore(store) if isinstance(store, (str, os.PathLike)) else store
    status = {"item": None, "version": None, "done": 0, "format": items.FORMAT, "qedjax": qedjax.__version__}
    beat = _Heartbeat(queue, worker_id, heartbeat_s, status)
    beat.start()
    engine, done, seen_open = None, 0, False
    finished: set[str] = set()  # items handed back whose assignment the trainer has not yet removed
    summarizers = _Summarizers(make_summarizer, worker_id)
    try:
        while (max_items is None or done < max_items) and not (stop is not None and stop.is_set()):
            closed = queue.closed
            seen_open = seen_open or not closed
            engine = _follow(store, engine, make_engine, worker_id)
            got = queue.next_item(worker_id, skip=finished) if engine is not None else None
            if got is None:
                if closed and seen_open:
                    break
                time.sleep(poll_s)
                continue
            item, payload = got
            status["item"] = item
            fault_point(f"worker:item:{done + 1}")  # a crash drill: killed holding an item
            try:
                # The newest version, and never one older than the trainer had when it asked.
                engine = _follow(store, engine, make_engine, worker_id)
                while engine.version < payload["version"]:
                    time.sleep(poll_s)
                    engine = _follow(store, engine, make_engine, worker_id)
                status["version"] = engine.version
                summarizer = summarizers.get(payload.get("summarizer"), engine)
                ro = groups.sample_groups(items.grpo_config(payload), engine, summarizer,
                                          [items.problem_from_json(p) for p in payload["problems"]],
                                          payload["step"], payload["seed"], first=payload["first"])
                result = {"rollouts": items.rollouts_to_json(ro)}
            except Exception:
                queue.complete(item, {"error": traceback.format_exc()}, worker_id)
                raise
            queue.complete(item, result, worker_id)
            finished.add(item)
            done += 1
            status.update(item=None, done=done)
            _log(worker_id, f"{item}: {sum(map(len, ro.completions))} rollouts at version {ro.version} in "
                            f"{ro.times['states_s'] + ro.times['generate_s']:.1f}s")
    finally:  # the heartbeat goes last: the trainer then gives this worker's unfinished items to others
        summarizers.close()
        beat.stopped.set()
        beat.join()
        queue.leave(worker_id)
    return done


# --- command line ---------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m qedjax.rollout.worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="the trainer's weight store, a path or URL (its engine.store)")
    p.add_argument("--queue", help="the work queue's path or URL (default: the one the trainer names in the store)")
    p.add_argument("--tokenizer", help="a Hugging Face tokenizer directory (default: the one the trainer put in the store)")
    p.add_argument("--worker-id", default=re.sub(r"[^A-Za-z0-9_.-]", "_", f"{socket.gethostname()}-{os.getpid()}"))
    p.add_argument("--poll-s", type=float, default=0.25, help="seconds between looks at the queue while idle")
    p.add_argument("--wait-s", type=float, default=3600.0, help="how long to wait for a trainer to describe the run")
    p.add_argument("--max-items", type=int, help="exit after this many items")
    p.add_argument("--engine", choices=("vllm", "jax"), default="vllm",
                   help="vllm (GPUs), or the JAX sampler (CPU/TPU; for trying the setup without GPUs)")
    p.add_argument("--max-batch", type=int, default=256, help="jax engine: rows decoded together")
    p.add_argument("--tensor-parallel-size", type=int, help="vLLM: GPUs per engine")
    p.add_argument("--gpu-memory-utilization", type=float,
                   help="vLLM: the share of GPU memory the policy's engine may use (with an RC summariser of its "
                        "own, give that engine its share with --summarizer-vllm-arg gpu_memory_utilization=...)")
    p.add_argument("--max-model-len", type=int, help="vLLM: longest prompt + completion (default: the trainer's)")
    p.add_argument("--max-num-seqs", type=int, help="vLLM: sequences decoded together")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM: no CUDA graphs")
    p.add_argument("--vllm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other vllm.LLM argument (value read as JSON if it parses, else a string)")
    p.add_argument("--summarizer-tokenizer",
                   help="the RC summariser's tokenizer directory (default: the one the trainer put in its store, "
                        "else the policy's)")
    p.add_argument("--summarizer-vllm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="vLLM: an argument of the summariser's engine, over the policy engine's (e.g. "
                        "gpu_memory_utilization=0.25: both engines share the GPUs)")
    return p.parse_args(argv)


def _key_values(pairs: list[str], flag: str) -> dict:
    options = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise ValueError(f"{flag} {pair!r} is not KEY=VALUE")
        try:
            options[key] = json.loads(text)
        except ValueError:
            options[key] = text
    return options


def vllm_options(args, summarizer: bool = False, run: dict | None = None) -> dict:
    """vllm.LLM keyword arguments: the run's context length, then this machine's command line (the
    policy engine's, or the summariser's: the policy's overlaid with --summarizer-vllm-arg)."""
    options = {"max_model_len": run["max_model_len"]} if run and run.get("max_model_len") else {}
    options.update({k: getattr(args, k) for k in ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len",
                                                  "max_num_seqs") if getattr(args, k) is not None})
    if args.enforce_eager:
        options["enforce_eager"] = True
    options.update(_key_values(args.vllm_arg, "--vllm-arg"))
    if summarizer:
        options.update(_key_values(args.summarizer_vllm_arg, "--summarizer-vllm-arg"))
    return options


def summarizer_tokenizer(args, spec: dict, policy_tokenizer: str) -> str:
    """The summariser's tokenizer directory on this worker: --summarizer-tokenizer, else the one
    published with its weights, else the policy's."""
    if args.summarizer_tokenizer:
        return args.summarizer_tokenizer
    if spec.get("tokenizer"):
        got = items.fetch_tokenizer(spec["store"], tempfile.mkdtemp(prefix="qedjax_summarizer_tokenizer_"))
        if got is None:
            raise FileNotFoundError(f"{spec['store']}: the trainer named a tokenizer of the RC summariser there, "
                                    f"and there is none; pass --summarizer-tokenizer DIR")
        return got
    return policy_tokenizer


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def interrupted(signum, frame):  # SIGTERM (scancel, preemption): the trainer gives the item to others
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, interrupted)
    store = WeightStore(args.store)
    run = items.read_run(args.store, wait_s=args.wait_s)
    if run is None:
        raise SystemExit(f"no trainer described a run in {store.path} within {args.wait_s:.0f}s "
                         f"(is --store the trainer's engine.store?)")
    queue = args.queue or run["queue"]
    tokenizer_dir = args.tokenizer or items.fetch_tokenizer(args.store, tempfile.mkdtemp(prefix="qedjax_tokenizer_"))
    if tokenizer_dir is None:
        raise SystemExit(f"{store.path} holds no tokenizer: pass --tokenizer DIR")
    if args.engine == "vllm":
        from qedjax.rollout.vllm import VllmEngine  # vLLM is imported only here

        def make_engine(version):
            return VllmEngine(store, tokenizer_dir, version=version, **vllm_options(args, run=run))

        def make_summarizer(spec):
            return VllmEngine(WeightStore(spec["store"]), summarizer_tokenizer(args, spec, tokenizer_dir),
                              version=spec["version"], **vllm_options(args, summarizer=True, run=run))
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

        def make_engine(version):
            return StoreJaxEngine(store, tokenizer, version=version, max_batch=args.max_batch)

        def make_summarizer(spec):
            return StoreJaxEngine(WeightStore(spec["store"]), AutoTokenizer.from_pretrained(
                summarizer_tokenizer(args, spec, tokenizer_dir)), version=spec["version"], max_batch=args.max_batch)

    _log(args.worker_id, f"store {store.path} | queue {queue} | engine {args.engine}")
    done = serve(queue, store, make_engine, worker_id=args.worker_id, poll_s=args.poll_s, max_items=args.max_items,
                 heartbeat_s=run.get("heartbeat_s", HEARTBEAT_S), make_summarizer=make_summarizer)
    _log(args.worker_id, f"done: {done} item(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
