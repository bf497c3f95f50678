"""What the trainer and its rollout workers exchange: work items and results as JSON, and the run
description through which the trainer configures the workers.

Work items. A step's problems are cut into items of a few problems each (`engine.problems_per_item`);
an item names its problems, their position in the step (`first`), the step and seed, the grpo
section, the least policy version to use and the RC summariser's store. Its result is the ungraded
Rollouts of those problems. Floats are written with Python's shortest round-trip repr, so Rollouts
come back exactly as they left.

The run description (`run.json` at the root of the weight store, and the tokenizer files under
`tokenizer/` beside it): everything a worker needs beyond the store's URL and its own machine's
settings (GPU memory share, tensor parallelism): the queue's URL, the engines' context length, the
heartbeat period, the protocol version. The dtype is the store's (versions are published in the
engines' dtype), sampling comes with each item, and the summariser's store carries its own tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time

from qedjax import storage
from qedjax.benchmarks import Problem
from qedjax.config_io import build, to_dict
from qedjax.rewards import Grade
from qedjax.rollout import groups
from qedjax.rollout.engine import Completion
from qedjax.rollout.rc import RCState

FORMAT = "qedjax-rollout-work/2"  # the work protocol: a worker and a trainer must speak the same
RUN_KEY = "run.json"
TOKENIZER = "tokenizer"


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
                 summarizer: dict | None = None, first: int = 0) -> dict:
    """A work item: problems `first`.. of RL step `step`, what `groups.sample_groups` needs for them, the
    least policy version to use, and the RC summariser's store when it is a model of its own
    (`StoreSummarizer.spec`; None: the policy)."""
    return {"format": FORMAT, "grpo": to_dict(g), "problems": [problem_to_json(p) for p in problems],
            "step": step, "seed": seed, "version": version, "summarizer": summarizer, "first": first}


def grpo_config(payload: dict) -> groups.GRPOConfig:
    if payload.get("format") != FORMAT:
        raise ValueError(f"work item of format {payload.get('format')!r}, this worker reads {FORMAT!r} "
                         f"(trainer and workers must run the same qedjax)")
    return build(groups.GRPOConfig, payload["grpo"], "grpo.")


@dataclasses.dataclass(frozen=True)
class StoreSummarizer:
    """The trainer's handle on an RC summariser that rollout workers run: its weights, published once
    as `version` of the store at `store`, with its tokenizer beside them when it has one of its own
    (`tokenizer`: True; else the policy's). It generates nothing in the trainer."""

    store: str
    version: int = 0
    tokenizer: bool = False

    def spec(self) -> dict:
        return dataclasses.asdict(self)

    def generate(self, requests, params, seeds=None):
        raise RuntimeError("engine.kind=workers: the RC summariser runs on the rollout workers")


# --- the run description ------------------------------------------------------------------------------

def publish_tokenizer(tokenizer, store: str) -> None:
    """Puts the tokenizer's files (with its chat template) under `tokenizer/` of a store."""
    with tempfile.TemporaryDirectory(prefix="qedjax_tokenizer_") as tmp:
        tokenizer.save_pretrained(tmp)
        kv = storage.open_kvstore(storage.join(store, TOKENIZER))
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                kv.write(name, f.read()).result(timeout=storage.TIMEOUT_S)


def fetch_tokenizer(store: str, directory: str) -> str | None:
    """Copies a store's tokenizer files into `directory`; returns it, or None if the store has none."""
    kv = storage.open_kvstore(storage.join(store, TOKENIZER))
    names = [k.decode() for k in kv.list().result(timeout=storage.TIMEOUT_S)]
    if not names:
        return None
    os.makedirs(directory, exist_ok=True)
    for name in names:
        with open(os.path.join(directory, os.path.basename(name)), "wb") as f:
            f.write(kv.read(name).result(timeout=storage.TIMEOUT_S).value)
    return directory


def publish_run(store: str, **settings) -> dict:
    """Writes the run description at the store's root: the protocol version and `settings` (queue,
    max_model_len, heartbeat_s, ...)."""
    run = {"format": FORMAT, "time": time.time(), **settings}
    storage.open_kvstore(store).write(RUN_KEY, json.dumps(run).encode()).result(timeout=storage.TIMEOUT_S)
    return run


def read_run(store: str, wait_s: float = 0.0, poll_s: float = 2.0) -> dict | None:
    """The run description of a store, waiting up to `wait_s` for a trainer to write it (None if it
    never does). Raises ValueError if the trainer speaks another protocol."""
    kv = storage.open_kvstore(store)
    deadline = time.monotonic() + wait_s
    while True:
        got = kv.read(RUN_KEY).result(timeout=storage.TIMEOUT_S)
        if got.state == "value":
            run = json.loads(got.value)
            if run.get("format") != FORMAT:
                raise ValueError(f"{storage.location(store)}: the trainer speaks {run.get('format')!r}, this worker "
                                 f"{FORMAT!r}: run the same qedjax on both")
            return run
        if time.monotonic() >= deadline:
            return None
        time.sleep(poll_s)


def max_model_len(g: groups.GRPOConfig, prompt_tokens: int) -> int:
    """The context an engine needs for the grpo section: the longest call is a summary request (the
    prompt holds a whole reasoning turn and the summary so far, and the reply is a summary), or a
    reasoning turn (problem and summary, then max_new_tokens); `prompt_tokens` bounds the problem and
    the template around it."""
    summary = g.rc.summary_max_new_tokens if g.rc.enabled else 0
    turns = g.rc.turns if g.rc.enabled and g.rc.mode == "append" else 1  # append mode keeps every summary
    need = g.sampling.max_new_tokens + summary * (turns + 1) + prompt_tokens
    return -(-need // 1024) * 1024
