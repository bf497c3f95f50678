"""Rollout workers: RL rollouts generated away from the trainer (vLLM on GPU nodes), sent back as files.

    python -m qedjax.rollout.worker --store gs://BUCKET/weights --queue /shared/rollout_queue \\
        --tokenizer checkpoints/Qwen3-4B-Thinking-2507 --tensor-parallel-size 1

The trainer (`engine.kind: workers`) and its workers meet in two places:
  - the weight store (qedjax.rollout.weights; gs:// or a shared path): the trainer publishes each new
    policy version there, the workers load it;
  - a work queue (qedjax.rollout.queue; a directory on a shared filesystem): the trainer submits one
    item per RL step (that step's problems, seed and step index, its GRPO settings, and the policy
    version it had when it submitted), a worker claims the item, makes the RC states and the groups of
    rollouts with `groups.sample_groups`, and completes it with the ungraded Rollouts (completions with
    their tokens, behaviour logprobs and policy version). The trainer grades them (`groups.grade_rollouts`)
    and trains on them; groups sampled more than `max_lag` versions back are dropped (`rl.drop_stale`).

Lag. The trainer keeps `max_lag + 1` items queued (one in sync mode). After claiming an item a worker
loads the store's newest version, and waits until it has at least the version the item names, so an
item is never generated with weights older than those the trainer had when it asked for it: the lag
is at most `max_lag` as long as every step trains.

Summariser. With `grpo.rc.summarizer: policy` RC states are summarised by the worker's own engine, the
current policy. With a summariser of its own (a model directory or preset, e.g. the release's frozen
Qwen3-4B-Instruct-2507, or `frozen`: a copy of the stage's starting policy) the trainer publishes its
weights once, as version 0 of a second store (`engine.summarizer_store`, default
run_dir/summarizer_weights), and names that store in every work item (`StoreSummarizer.spec`). A
worker builds a second engine on it the first time an item asks (vLLM: `--vllm-arg` options overlaid
with `--summarizer-vllm-arg`, e.g. both engines' gpu_memory_utilization; its tokenizer and chat
template: `--summarizer-tokenizer`, else the directory the trainer named, else the policy's) and keeps
it for as long as the items name the same publication. It never follows the policy's versions.

Worker ids name claims and heartbeats (default: host-pid). A worker stops when the trainer closes
the queue at the end of the stage, on SIGTERM (its unfinished item goes back to the queue), or after
`--max-items`. A failure while making rollouts is reported to the trainer, which stops with it.

The trainer's side is `Dispatcher`, used by `rl.run`. Items and results are JSON; floats are written
with Python's shortest round-trip repr, so Rollouts come back exactly as they left.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qedjax import preempt
from qedjax.benchmarks import Problem
from qedjax.config_io import build, to_dict
from qedjax.convert import _get, _set, abstract_model, key_table, to_ours
from qedjax.rewards import Grade
from qedjax.rollout import groups
from qedjax.rollout.engine import Completion, RolloutEngine
from qedjax.rollout.jax_engine import JaxEngine
from qedjax.rollout.queue import WorkQueue, check_id
from qedjax.rollout.rc import RCState
from qedjax.rollout.weights import WeightStore, WeightStoreError

FORMAT = "qedjax-rollout-work/1"
HEARTBEAT_S = 10.0  # a worker bumps its heartbeat this often
DEAD_AFTER_S = 300.0  # the trainer requeues the claims of a worker whose heartbeat was still this long
MAX_REQUEUES = 3  # an item whose workers keep dying stops the run instead of killing every worker
BROADCAST_BYTES = 64 * 2**20  # multi-host trainers share a result in pieces this big


# --- (de)serialisation --------------------------------------------------------------------------------

def problem_to_json(p: Problem) -> dict:
    return {"id": p.id, "problem": p.problem, "references": dict(p.references), "category": p.category,
            "level": p.level}


def problem_from_json(d: dict) -> Problem:
    return Problem(**d)


def rollouts_to_json(ro: groups.Rollouts) -> dict:
    return {
        "version": ro.version,
        "states": [dataclasses.asdict(s) for s in ro.states],
        "completions": [[dataclasses.asdict(c) for c in group] for group in ro.completions],
        "grades": [[dataclasses.asdict(g) for g in group] for group in ro.grades],
        "summary_tokens": list(ro.summary_tokens),
        "summary_stats": dict(ro.summary_stats),
        "times": dict(ro.times),
        "problems": [problem_to_json(p) for p in ro.problems],
    }


def _completion(d: dict) -> Completion:
    return Completion(text=d["text"], tokens=tuple(d["tokens"]), logprobs=tuple(d["logprobs"]),
                      finish_reason=d["finish_reason"], prompt_tokens=tuple(d["prompt_tokens"]),
                      policy_version=d["policy_version"])


def rollouts_from_json(d: dict) -> groups.Rollouts:
    return groups.Rollouts(version=d["version"], states=[RCState(**s) for s in d["states"]],
                       completions=[[_completion(c) for c in group] for group in d["completions"]],
                       grades=[[Grade(**g) for g in group] for group in d["grades"]],
                       summary_tokens=list(d["summary_tokens"]), times=dict(d["times"]),
                       problems=[problem_from_json(p) for p in d["problems"]],
                       summary_stats=dict(d["summary_stats"]))


def work_payload(g: groups.GRPOConfig, problems: list[Problem], *, step: int, seed: int, version: int,
                 summarizer: dict | None = None) -> dict:
    """One RL step's work: what `groups.sample_groups` needs, the least policy version to use, and the
    RC summariser's store when it is a model of its own (`StoreSummarizer.spec`; None: the policy)."""
    return {"format": FORMAT, "grpo": to_dict(g), "problems": [problem_to_json(p) for p in problems],
            "step": step, "seed": seed, "version": version, "summarizer": summarizer}


def grpo_config(payload: dict) -> groups.GRPOConfig:
    if payload.get("format") != FORMAT:
        raise ValueError(f"work item of format {payload.get('format')!r}, this worker reads {FORMAT!r} "
                         f"(trainer and workers must run the same qedjax)")
    return build(groups.GRPOConfig, payload["grpo"], "grpo.")


@dataclasses.dataclass(frozen=True)
class StoreSummarizer:
    """The trainer's handle on an RC summariser that rollout workers run: its weights, published once
    as `version` of the store at `store`, and the tokenizer directory it came with (None: the policy's).
    It generates nothing in the trainer."""

    store: str
    version: int = 0
    tokenizer: str | None = None

    def spec(self) -> dict:
        return dataclasses.asdict(self)

    def generate(self, requests, params):
        raise RuntimeError("engine.kind=workers: the RC summariser runs on the rollout workers")


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


def serve(queue_dir: str | os.PathLike, store: WeightStore | str, make_engine: Callable[[int], RolloutEngine], *,
          worker_id: str, poll_s: float = 2.0, max_items: int | None = None,
          stop: threading.Event | None = None, heartbeat_s: float = HEARTBEAT_S,
          make_summarizer: Callable[[dict], RolloutEngine] | None = None) -> int:
    """Takes RL rollout work from the queue until told to stop; returns the number of items done.

    Args:
      queue_dir: the work queue's directory.
      store: the weight store (or its path / URL) the trainer publishes to.
      make_engine: version -> RolloutEngine loaded with that store version; its `load_weights(v)`
        must read version v from the store (VllmEngine, StoreJaxEngine).
      worker_id: this worker's name in claims and heartbeats.
      poll_s: wait between looks at an empty queue.
      max_items: stop after this many items.
      stop: stop once idle when set.
      make_summarizer: a summariser spec (StoreSummarizer.spec: store, version, tokenizer) -> an engine
        loaded with it, for items whose RC summariser is a model of its own.
    Stops (once idle) when the trainer closes the queue, if this worker saw it open.
    """
    check_id(worker_id, "worker id")
    queue = WorkQueue(queue_dir)
    store = WeightStore(store) if isinstance(store, (str, os.PathLike)) else store
    for item in queue.release_all(worker_id):
        _log(worker_id, f"handed back {item}, claimed under this id by an earlier run of the worker")
    status = {"item": None, "version": None, "done": 0}
    beat = _Heartbeat(queue, worker_id, heartbeat_s, status)
    beat.start()
    engine, done, seen_open = None, 0, False
    summarizers = _Summarizers(make_summarizer, worker_id)
    try:
        while (max_items is None or done < max_items) and not (stop is not None and stop.is_set()):
            closed = queue.closed
            seen_open = seen_open or not closed
            engine = _follow(store, engine, make_engine, worker_id)
            claimed = queue.claim(worker_id) if engine is not None else None
            if claimed is None:
                if closed and seen_open:
                    break
                time.sleep(poll_s)
                continue
            item, payload = claimed
            status["item"] = item
            try:
                # The newest version, and never one older than the trainer had when it asked.
                engine = _follow(store, engine, make_engine, worker_id)
                while engine.version < payload["version"]:
                    time.sleep(poll_s)
                    engine = _follow(store, engine, make_engine, worker_id)
                status["version"] = engine.version
                summarizer = summarizers.get(payload.get("summarizer"), engine)
                ro = groups.sample_groups(grpo_config(payload), engine, summarizer,
                                      [problem_from_json(p) for p in payload["problems"]],
                                      payload["step"], payload["seed"])
                result = {"worker": worker_id, "rollouts": rollouts_to_json(ro)}
            except Exception:
                queue.complete(item, {"worker": worker_id, "error": traceback.format_exc()}, worker_id)
                raise
            except BaseException:  # interrupted (SIGTERM, Ctrl-C): another worker takes the item
                queue.release(item, worker_id)
                raise
            queue.complete(item, result, worker_id)
            done += 1
            status.update(item=None, done=done)
            _log(worker_id, f"{item}: {sum(map(len, ro.completions))} rollouts at version {ro.version} in "
                            f"{ro.times['states_s'] + ro.times['generate_s']:.1f}s")
    finally:
        summarizers.close()
        beat.stopped.set()
        beat.join()
        queue.leave(worker_id)
    return done


# --- the trainer's side ---------------------------------------------------------------------------------

class Dispatcher:
    """Rollouts from the workers, for `rl.run`: keeps `depth` steps of work queued, returns finished
    steps oldest first, graded here. Every process of a multi-host trainer takes the same problems
    from its sampler; process 0 alone talks to the queue and shares each result with the others."""

    def __init__(self, queue_dir: str, g: groups.GRPOConfig, sampler: groups.ProblemSampler, seed: int, grader, *,
                 depth: int, version: Callable[[], int], poll_s: float = 1.0, dead_after_s: float = DEAD_AFTER_S,
                 summarizer: StoreSummarizer | None = None):
        self.g, self.sampler, self.seed, self.grader = g, sampler, seed, grader
        self.summarizer = summarizer.spec() if summarizer is not None else None
        self.depth, self.version, self.poll_s, self.dead_after_s = max(depth, 1), version, poll_s, dead_after_s
        self.lead = jax.process_index() == 0
        self.queue = WorkQueue(queue_dir) if self.lead else None
        self.session = uuid.uuid4().hex[:8]  # item ids of this trainer run (leftovers are dropped)
        self.pending: collections.deque[str] = collections.deque()
        self.results: dict[str, dict] = {}
        self.requeues: collections.Counter = collections.Counter()
        self.submitted = 0

    def start(self) -> None:
        if self.lead:
            self.queue.purge()

    def _submit(self) -> None:
        problems = self.sampler.take(self.g.problems_per_step)
        item = f"{self.session}-{self.submitted:08d}"
        self.submitted += 1
        if self.lead:
            self.queue.submit(item, work_payload(self.g, problems, step=self.sampler.cursor, seed=self.seed,
                                                 version=self.version(), summarizer=self.summarizer))
        self.pending.append(item)

    def _wait(self, item: str, check=lambda: None) -> dict:
        wanted = set(self.pending) | {item}
        t0 = noted = time.monotonic()
        while item not in self.results:
            check()  # raises preempt.Preempted when any trainer process was asked to stop
            self.results.update({k: v for k, v in self.queue.take_results().items() if k in wanted})
            if item in self.results:
                break
            for again in self.queue.requeue_dead(self.dead_after_s):
                self.requeues[again] += 1
                if self.requeues[again] > MAX_REQUEUES:
                    raise RuntimeError(f"{self.queue}: item {again} was requeued {MAX_REQUEUES} times (its "
                                       f"workers stopped heartbeating); see the workers' logs")
            if time.monotonic() - noted > 120:
                noted = time.monotonic()
                print(f"[qedjax] waited {noted - t0:.0f}s for rollout workers on {item}: {self.queue.counts()}",
                      file=sys.stderr, flush=True)
            time.sleep(self.poll_s)
        return self.results.pop(item)

    def get(self) -> groups.Rollouts:
        while len(self.pending) < self.depth:
            self._submit()
        item = self.pending.popleft()
        t0 = time.perf_counter()
        result = preempt.lead_waits(lambda check: self._wait(item, check))  # None on processes other than 0
        if jax.process_count() > 1:
            result = _broadcast_json(result)
        if "error" in result:
            raise RuntimeError(f"rollout worker {result.get('worker')} failed on {item}:\n{result['error']}")
        ro = rollouts_from_json(result["rollouts"])
        ro = dataclasses.replace(ro, times={**ro.times, "wait_s": time.perf_counter() - t0})
        return groups.grade_rollouts(ro, self.grader)

    def stop(self) -> None:
        """Withdraws the work nobody started (the trainer is stopping)."""
        if self.lead:
            self.queue.withdraw()

    def close(self) -> None:
        """The stage is finished: idle workers exit."""
        if self.lead:
            self.queue.close()


def _broadcast_json(obj: dict | None) -> dict:
    """Process 0's JSON object on every process, sent in pieces (bounded device memory)."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if obj is not None else np.zeros(0, np.uint8)
    size = multihost_utils.broadcast_one_to_all(np.asarray(divmod(data.size, 2**30), np.int32))
    n = int(size[0]) * 2**30 + int(size[1])
    out = bytearray()
    for at in range(0, n, BROADCAST_BYTES):
        piece = data[at:at + BROADCAST_BYTES] if data.size else np.zeros(min(BROADCAST_BYTES, n - at), np.uint8)
        out += np.asarray(multihost_utils.broadcast_one_to_all(piece)).astype(np.uint8).tobytes()
    return json.loads(bytes(out))


# --- command line ---------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m qedjax.rollout.worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="weight store path or URL (the trainer's engine.store)")
    p.add_argument("--queue", required=True, help="work queue directory (the trainer's engine.queue)")
    p.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer directory (the trainer's)")
    p.add_argument("--worker-id", default=re.sub(r"[^A-Za-z0-9_.-]", "_", f"{socket.gethostname()}-{os.getpid()}"))
    p.add_argument("--poll-s", type=float, default=2.0, help="seconds between looks at an empty queue")
    p.add_argument("--max-items", type=int, help="exit after this many items")
    p.add_argument("--engine", choices=("vllm", "jax"), default="vllm",
                   help="vllm (GPUs), or the JAX sampler (CPU/TPU; for trying the setup without GPUs)")
    p.add_argument("--max-batch", type=int, default=256, help="jax engine: rows decoded together")
    p.add_argument("--tensor-parallel-size", type=int, help="vLLM: GPUs per engine")
    p.add_argument("--gpu-memory-utilization", type=float, help="vLLM: fraction of GPU memory it may use")
    p.add_argument("--max-model-len", type=int, help="vLLM: longest prompt + completion")
    p.add_argument("--max-num-seqs", type=int, help="vLLM: sequences decoded together")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM: no CUDA graphs")
    p.add_argument("--vllm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other vllm.LLM argument (value read as JSON if it parses, else a string)")
    p.add_argument("--summarizer-tokenizer",
                   help="the RC summariser's tokenizer directory, when the trainer's grpo.rc.summarizer is a model "
                        "with a tokenizer of its own (default: the path the trainer names, if it exists here)")
    p.add_argument("--summarizer-vllm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="vLLM: an argument of the summariser's engine, over the policy engine's (e.g. "
                        "gpu_memory_utilization=0.2: both engines share the GPUs)")
    return p.parse_args(argv)


def _key_values(items: list[str], flag: str) -> dict:
    options = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"{flag} {item!r} is not KEY=VALUE")
        try:
            options[key] = json.loads(text)
        except ValueError:
            options[key] = text
    return options


def vllm_options(args, summarizer: bool = False) -> dict:
    """vllm.LLM keyword arguments from the command line: the policy engine's, or the summariser's
    (the policy's overlaid with --summarizer-vllm-arg)."""
    options = {k: getattr(args, k) for k in ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len",
                                             "max_num_seqs") if getattr(args, k) is not None}
    if args.enforce_eager:
        options["enforce_eager"] = True
    options.update(_key_values(args.vllm_arg, "--vllm-arg"))
    if summarizer:
        options.update(_key_values(args.summarizer_vllm_arg, "--summarizer-vllm-arg"))
    return options


def summarizer_tokenizer(args, spec: dict) -> str:
    """The summariser's tokenizer directory on this worker (see --summarizer-tokenizer)."""
    if args.summarizer_tokenizer:
        return args.summarizer_tokenizer
    named = spec.get("tokenizer")
    if named is None:
        return args.tokenizer
    if os.path.isdir(named):
        return named
    raise FileNotFoundError(f"the RC summariser has a tokenizer of its own ({named} on the trainer), which this "
                            f"worker does not have at that path: pass --summarizer-tokenizer DIR")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    store = WeightStore(args.store)
    if args.engine == "vllm":
        from qedjax.rollout.vllm import VllmEngine  # vLLM is imported only here

        def make_engine(version):
            return VllmEngine(store, args.tokenizer, version=version, **vllm_options(args))

        def make_summarizer(spec):
            return VllmEngine(WeightStore(spec["store"]), summarizer_tokenizer(args, spec), version=spec["version"],
                              **vllm_options(args, summarizer=True))
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)

        def make_engine(version):
            return StoreJaxEngine(store, tokenizer, version=version, max_batch=args.max_batch)

        def make_summarizer(spec):
            return StoreJaxEngine(WeightStore(spec["store"]), AutoTokenizer.from_pretrained(
                summarizer_tokenizer(args, spec)), version=spec["version"], max_batch=args.max_batch)

    def interrupted(signum, frame):  # SIGTERM (scancel, preemption) releases the current item
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, interrupted)
    _log(args.worker_id, f"store {store.path} | queue {args.queue} | engine {args.engine}")
    done = serve(args.queue, store, make_engine, worker_id=args.worker_id, poll_s=args.poll_s,
                 max_items=args.max_items, make_summarizer=make_summarizer)
    _log(args.worker_id, f"done: {done} item(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
