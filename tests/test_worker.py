"""Rollout workers: the work queue (the trainer assigns, workers hand back; on a local path and on gs://
through a Cloud Storage emulator), Rollouts through JSON, a step the same however it is cut into items,
the trainer/worker protocol with scripted engines (items spread over every worker, a dead worker's
items given to another, incompatible workers refused), and the RL loop with `engine.kind=workers` fed
by two worker threads that follow the weight store and share every step."""

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import yaml

from qedjax import launch, rl
from qedjax.benchmarks import Problem
from qedjax.config_io import build, to_dict
from qedjax.metrics import read_metrics
from qedjax.rewards import Grade
from qedjax.rollout import dispatch, groups, items, worker
from qedjax.rollout.engine import Completion, SamplingParams
from qedjax.rollout.queue import WorkQueue
from qedjax.rollout.rc import RCState
from fakes import FakeEngine, FakeGrader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WRITER = """
import sys
from qedjax.rollout.queue import WorkQueue
queue = WorkQueue(sys.argv[1])
for i in range(int(sys.argv[2])):
    queue.complete(f"r-{i:03d}", {"i": i, "data": list(range(100_000))}, "w")
"""


def _python(code, *args, env=None):
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE, env=env, text=True)


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
    """A queue root: a local directory, or a prefix of a bucket on the GCS emulator."""
    if request.param == "local":
        return str(tmp_path / "q")
    return f"{request.getfixturevalue('gcs').bucket()}/run/queue"


def test_the_trainer_assigns_items_and_takes_back_a_dead_workers(root):
    trainer, w = WorkQueue(root), WorkQueue(root)  # each its own clock and memory of heartbeats
    for i in range(5):
        trainer.submit(f"i-{i}", {"n": i})
    assert trainer.dispatch(trainer.live(60)) == {"assigned": [], "reassigned": []}  # nobody joined yet
    w.heartbeat("a", format=items.FORMAT)
    w.heartbeat("b", format=items.FORMAT)
    live = trainer.live(0.3)
    assert live == {"a", "b"}
    moved = trainer.dispatch(live, slots=1)
    assert sorted(moved["assigned"]) == [("i-0", "a"), ("i-1", "b")]  # one each, oldest first
    assert trainer.dispatch(live, slots=1)["assigned"] == []  # both busy
    assert w.next_item("a") == ("i-0", {"n": 0}) and w.next_item("b") == ("i-1", {"n": 1})
    w.complete("i-0", {"ok": 0}, "a")
    assert trainer.take_results() == {"i-0": {"ok": 0, "worker": "a"}}
    assert trainer.dispatch(live, slots=1)["assigned"] == [("i-2", "a")]  # "a" is free again
    assert w.next_item("a", skip={"i-0"}) == ("i-2", {"n": 2})
    # "b" dies holding i-1: its heartbeat stands still past the timeout while "a"'s moves on.
    time.sleep(0.4)
    w.heartbeat("a", format=items.FORMAT)
    live = trainer.live(0.3)
    assert live == {"a"}
    moved = trainer.dispatch(live, slots=2)
    assert moved == {"assigned": [("i-1", "a")], "reassigned": ["i-1"]}  # i-1 went to "a", next to its i-2
    assert trainer.assignments() == {"a": ["i-1", "i-2"]} and trainer.attempts["i-1"] == 2
    # The slow worker delivers after all, and so does the new owner: the first result counts.
    w.complete("i-1", {"ok": "late"}, "b")
    w.complete("i-1", {"ok": "new"}, "a")
    assert list(trainer.take_results()) == ["i-1"]
    # A worker that leaves (SIGTERM, a clean exit) is dead at once.
    w.leave("a")
    assert trainer.live(0.3) == set()  # "b" is still dead, "a" is gone
    assert trainer.dispatch(set())["reassigned"] == ["i-2"]
    # A new trainer session starts clean and opens the queue; closing it tells idle workers to go.
    trainer.close()
    assert w.closed
    trainer.purge()
    assert not w.closed and trainer.counts() == {"items": 0, "assigned": 0, "done": 0}
    with pytest.raises(ValueError, match="worker id"):
        w.next_item("bad@id")


def test_results_are_never_read_half_written(root, gcs):
    queue = WorkQueue(root)
    n = 20
    writer = _python(WRITER, root, n, env=gcs.env())
    got, deadline = {}, time.monotonic() + 600  # a hang guard, not under test
    while len(got) < n and time.monotonic() < deadline:
        got.update(queue.take_results())  # a partial object would fail to parse here
        time.sleep(0.001)
    writer.communicate(timeout=600)
    assert writer.returncode == 0
    assert sorted(got) == [f"r-{i:03d}" for i in range(n)]
    assert all(r["data"] == list(range(100_000)) and r["i"] == int(k[2:]) for k, r in got.items())
    assert queue.take_results() == {}


def _rollouts() -> groups.Rollouts:
    problems = [Problem("p1", "Show that 1 + 1 = 2.", {"marking_scheme": "7 points"}, "algebra", "easy"),
                Problem("p2", "Prove x^2 >= 0.", {"answer": "0"})]

    def completion(k):
        return Completion(text=f"<think>\nstep {k} ü ∑\n</think>\n\nDone.", tokens=(5, 17, k),
                          logprobs=(-0.1234567890123457, -1e-300, -17.25 * k),
                          finish_reason="stop" if k % 2 else "length", prompt_tokens=(1, 2, 3, 4), policy_version=k)

    states = [RCState("Show that 1 + 1 = 2.", "", 0), RCState("Prove x^2 >= 0.", "so far", 2)]
    return groups.Rollouts(version=3, states=states,
                       completions=[[completion(1), completion(2)], [completion(3), completion(4)]],
                       grades=[[Grade(7.0, 1.0, "ok", "fine"), Grade(0.0, 0.0, "truncated", "")]] * 2,
                       summary_tokens=[0, 12], times={"states_s": 0.1 + 0.2, "generate_s": 1 / 3}, problems=problems,
                       summary_stats={"summaries_attempted": 2.0, "summaries_ok": 1.0,
                                      "summaries_failed_unclosed_think": 1.0, "summary_tokens_mean": 2048 / 3})


def test_rollouts_and_work_items_round_trip_through_json():
    ro = _rollouts()
    back = items.rollouts_from_json(json.loads(json.dumps(items.rollouts_to_json(ro))))
    assert back == ro
    assert isinstance(back.completions[0][0].tokens, tuple) and isinstance(back.completions[0][0].logprobs, tuple)
    g = groups.GRPOConfig(group_size=4, rc=groups.RCTrainConfig(enabled=True, turns=2, summarizer="policy"),
                          sampling=SamplingParams(max_new_tokens=64, temperature=0.7, top_k=5, seed=9))
    payload = json.loads(json.dumps(items.work_payload(g, ro.problems, step=6, seed=2, version=4, first=3)))
    assert payload["summarizer"] is None and payload["first"] == 3  # the policy summarises
    assert items.grpo_config(payload) == g == build(groups.GRPOConfig, to_dict(g))
    own = items.StoreSummarizer("gs://b/summarizer", 0, True)
    payload = json.loads(json.dumps(items.work_payload(g, ro.problems, step=6, seed=2, version=4,
                                                       summarizer=own.spec())))
    assert items.StoreSummarizer(**payload["summarizer"]) == own
    assert [items.problem_from_json(p) for p in payload["problems"]] == ro.problems
    with pytest.raises(ValueError, match="format"):
        items.grpo_config({**payload, "format": "other/9"})
    # A worker's own settings, over what the run says (its context length).
    run = {"max_model_len": 57344}
    args = worker.parse_args(["--store", "s", "--tensor-parallel-size", "2", "--enforce-eager",
                              "--vllm-arg", "swap_space=8", "--vllm-arg", "kv_cache_dtype=fp8"])
    assert worker.vllm_options(args, run=run) == {"max_model_len": 57344, "tensor_parallel_size": 2,
                                                  "enforce_eager": True, "swap_space": 8, "kv_cache_dtype": "fp8"}
    # The summariser's engine: the policy engine's options, overlaid with --summarizer-vllm-arg.
    args = worker.parse_args(["--store", "s", "--gpu-memory-utilization", "0.6", "--max-model-len", "4096",
                              "--summarizer-vllm-arg", "gpu_memory_utilization=0.25"])
    assert worker.vllm_options(args, run=run) == {"gpu_memory_utilization": 0.6, "max_model_len": 4096}
    assert worker.vllm_options(args, summarizer=True, run=run) == {"gpu_memory_utilization": 0.25,
                                                                   "max_model_len": 4096}
    # Its tokenizer: the flag, else the policy's when the summariser has none of its own.
    assert worker.summarizer_tokenizer(args, own.spec() | {"tokenizer": False}, "t") == "t"
    args = worker.parse_args(["--store", "s", "--summarizer-tokenizer", "u"])
    assert worker.summarizer_tokenizer(args, own.spec(), "t") == "u"
    # The context the engines need: a summary request holds a whole reasoning turn and the summary so far.
    # 64 new tokens + 2 x 2,048 (the summary so far in the prompt, the new one out) + 4,096 = 8,256 -> 9,216.
    assert items.max_model_len(g, 4096) == 9216


def test_a_step_is_the_same_however_it_is_cut_into_items(toy_tokenizer):
    """Every draw is seeded per problem: items of one problem, or of two, make the step's groups exactly
    (scripted engine with RC, and the JAX sampler on a tiny model)."""
    from flax import nnx

    from qedjax.models.qwen3 import Qwen3, Qwen3Config
    from qedjax.rollout.jax_engine import JaxEngine

    problems = [Problem(str(i), f"Show that {i} is {i}.", {}) for i in range(3)]
    g = groups.GRPOConfig(problems_per_step=3, group_size=3, sampling=SamplingParams(max_new_tokens=40, seed=3),
                          rc=groups.RCTrainConfig(enabled=True, turns=2, states_per_problem=2, summarizer="policy"))
    engine = FakeEngine()
    whole = groups.sample_groups(g, engine, engine, problems, 7, 11)
    for cut in ([1, 1, 1], [2, 1], [1, 2]):
        firsts = [sum(cut[:k]) for k in range(len(cut))]
        parts = [groups.sample_groups(g, engine, engine, problems[f:f + n], 7, 11, first=f) for f, n in zip(firsts, cut)]
        merged = groups.merge_rollouts(parts)
        assert (merged.states, merged.completions, merged.summary_tokens, merged.problems) == (
            whole.states, whole.completions, whole.summary_tokens, whole.problems)
        assert merged.summary_stats == pytest.approx(whole.summary_stats)
    assert len({c.text for group in whole.completions for c in group}) == 2 * 3 * 3  # every rollout its own draw
    tiny = JaxEngine(Qwen3(Qwen3Config.preset("tiny"), rngs=nnx.Rngs(0)), toy_tokenizer)
    g = groups.GRPOConfig(problems_per_step=3, group_size=2, sampling=SamplingParams(max_new_tokens=6, seed=3))
    whole = groups.sample_groups(g, tiny, tiny, problems, 7, 11)
    parts = [groups.sample_groups(g, tiny, tiny, problems[:1], 7, 11),
             groups.sample_groups(g, tiny, tiny, problems[1:], 7, 11, first=1)]
    got = [c for group in groups.merge_rollouts(parts).completions for c in group]
    want = [c for group in whole.completions for c in group]
    assert [c.tokens for c in got] == [c.tokens for c in want] and len({c.tokens for c in want}) == 6
    # The logprobs of a row depend on its batch's padded shape by fp32 rounding only: |logp| ~ 7 over a
    # 512-token vocabulary, a few ulps (~5e-7) of a float32 near 7; 1e-5 leaves room, not slack.
    np.testing.assert_allclose([c.logprobs for c in got], [c.logprobs for c in want], rtol=0, atol=1e-5)


class _Store:
    """A weight store with one committed version and nothing in it (for scripted engines)."""

    def latest(self):
        return 0


def _serve_in_thread(queue_dir, make_engine, worker_id="w0"):
    errors = []

    def target():
        try:
            worker.serve(str(queue_dir), _Store(), make_engine, worker_id=worker_id, poll_s=0.01, heartbeat_s=0.05)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            errors.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, errors


class _Both(FakeEngine):
    """Answers only once two workers are generating at the same time (so a step is shared, whatever the load)."""

    def __init__(self, barrier, **kwargs):
        super().__init__(**kwargs)
        self.barrier = barrier

    def generate(self, requests, params, seeds=None):
        self.barrier.wait()
        return super().generate(requests, params, seeds)


def test_workers_share_every_step_and_make_the_rollouts_sync_mode_would(tmp_path):
    problems = [Problem(str(i), f"Show that {i} is {i}.", {}) for i in range(6)]
    g = groups.GRPOConfig(problems_per_step=4, group_size=2, sampling=SamplingParams(max_new_tokens=40, seed=3),
                          rc=groups.RCTrainConfig(enabled=True, turns=1, states_per_problem=2, summarizer="policy"))
    grader = FakeGrader(lambda item: 7.0 if "1" in item.response else 0.0)
    sampler = groups.ProblemSampler(problems, seed=5)
    dispatcher = dispatch.Dispatcher(str(tmp_path / "q"), g, sampler, 11, grader, depth=2, version=lambda: 0,
                                     problems_per_item=2, slots=1, poll_s=0.01)  # one item at a time each
    dispatcher.start()
    barrier = threading.Barrier(2, timeout=300)  # a hang guard, not under test
    served = [_serve_in_thread(tmp_path / "q", lambda version: _Both(barrier), worker_id=w) for w in ("w0", "w1")]
    got = [dispatcher.get() for _ in range(3)]
    assert sampler.cursor == 4 * 4  # three steps taken, one more queued ahead (depth 2)
    reference, engine = groups.ProblemSampler(problems, seed=5), FakeEngine()
    for ro in got:
        picked = reference.take(4)
        want = rl.collect(g, engine, engine, grader, picked, reference.cursor, 11)
        assert (ro.problems, ro.states, ro.completions, ro.grades, ro.summary_tokens) == (
            want.problems, want.states, want.completions, want.grades, want.summary_tokens)
        assert {"states_s", "generate_s", "grade_s", "wait_s"} <= set(ro.times)
        assert ro.workers == {"w0": 4, "w1": 4}  # two items of 2 problems x 2 states, one on each worker
        metrics = rl.rollout_metrics(ro, 0)
        assert metrics["rollout_workers"] == 2 and metrics["rollout_share/w0"] == metrics["rollout_share/w1"] == 0.5
    dispatcher.stop()
    dispatcher.close()
    barrier.abort()  # a worker may be waiting on the step queued ahead, which the trainer withdrew
    for thread, errors in served:
        thread.join(30)
        assert not thread.is_alive()  # the closed queue sent the worker home
    counts = WorkQueue(tmp_path / "q").counts()  # the step queued ahead was withdrawn, or finished unused
    assert counts["items"] == counts["assigned"] == 0


def test_a_dead_workers_items_go_to_another_and_a_failure_stops_the_trainer(tmp_path):
    problems = [Problem(str(i), f"Show that {i} is {i}.", {}) for i in range(6)]
    g = groups.GRPOConfig(problems_per_step=2, group_size=2, sampling=SamplingParams(max_new_tokens=40, seed=3))
    grader = FakeGrader(lambda item: 0.0)
    # A worker interrupted mid-item (SIGTERM raises SystemExit in `main`) leaves; its item goes to the other.

    class Interrupted(FakeEngine):
        def generate(self, requests, params, seeds=None):
            raise SystemExit(143)

    sampler = groups.ProblemSampler(problems, seed=5)
    dispatcher = dispatch.Dispatcher(str(tmp_path / "q"), g, sampler, 11, grader, depth=1, version=lambda: 0,
                                     problems_per_item=1, poll_s=0.01)
    dispatcher.start()
    dying, died = _serve_in_thread(tmp_path / "q", lambda version: Interrupted(), worker_id="dies")
    got = []
    getting = threading.Thread(target=lambda: got.append(dispatcher.get()), daemon=True)
    getting.start()  # submits the step: both items go to the only worker there is, one at a time
    dying.join(300)
    assert len(died) == 1 and isinstance(died[0], SystemExit)
    assert WorkQueue(tmp_path / "q").heartbeat_of("dies") is None
    thread, errors = _serve_in_thread(tmp_path / "q", lambda version: FakeEngine(), worker_id="w1")
    getting.join(300)
    ro = got[0]
    assert ro.workers == {"w1": 2} and len(ro.completions) == 2
    assert dispatcher.queue.attempts[f"{dispatcher.session}-00000000-0000"] == 2  # given to "dies", then to w1
    dispatcher.stop()
    dispatcher.close()
    thread.join(30)
    assert not thread.is_alive() and not errors
    # A worker that fails reports it: the trainer stops with the worker's traceback.
    sampler = groups.ProblemSampler(problems, seed=5)
    dispatcher = dispatch.Dispatcher(str(tmp_path / "q2"), g, sampler, 11, grader, depth=1, version=lambda: 0,
                                     poll_s=0.01)
    dispatcher.start()
    thread, errors = _serve_in_thread(tmp_path / "q2", lambda version: FakeEngine(fail_on_call=0))
    with pytest.raises(RuntimeError, match="(?s)rollout worker w0 failed.*engine killed"):
        dispatcher.get()
    thread.join(10)
    assert len(errors) == 1 and "engine killed" in str(errors[0])
    dispatcher.stop()
    # A worker of another protocol is named before the first step.
    WorkQueue(tmp_path / "q3").heartbeat("old-worker", format="qedjax-rollout-work/1")
    dispatcher = dispatch.Dispatcher(str(tmp_path / "q3"), g, sampler, 11, grader, depth=1, version=lambda: 0)
    with pytest.raises(dispatch.IncompatibleWorkerError, match="old-worker"):
        dispatcher.start()
    # ... unless its heartbeat is long stale (a worker killed without leaving, by its own clock).
    WorkQueue(tmp_path / "q4").heartbeat("long-gone", format="qedjax-rollout-work/1", time=0.0)
    dispatcher = dispatch.Dispatcher(str(tmp_path / "q4"), g, sampler, 11, grader, depth=1, version=lambda: 0)
    dispatcher.start()
    dispatcher.stop()


def _config(tmp_path, name, **grpo):
    raw = {
        "run": {"dir": str(tmp_path / name), "seed": 0, "stages": ["grpo"]},
        "model": {"preset": "tiny"},
        "toy": {"sft_rows": 8, "rl_problems": 16, "eval_problems": 2},
        "engine": {"kind": "workers", "store": str(tmp_path / "weights"), "queue": str(tmp_path / "queue")},
        "grpo": {"init": "model", "steps": 3, "problems_per_step": 2, "group_size": 4, "mode": "async", "max_lag": 1,
                 "skip_zero_variance": False,  # a random policy scores 0 everywhere: train anyway, new versions
                 "rc": {"enabled": True, "turns": 1, "states_per_problem": 2, "summary_max_new_tokens": 8,
                        "summarizer": "policy"},
                 "sampling": {"max_new_tokens": 12, "temperature": 1.0, "seed": 0},
                 "loss": {"clip_low": 0.2, "clip_high": 0.28},
                 "optim": {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0},
                 "checkpoint": {"every": 3, "keep": 1, "async_save": False}, **grpo},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path), tmp_path / name


@pytest.mark.slow
def test_rl_loop_with_two_workers_following_the_store(tmp_path):
    """engine.kind=workers in sync mode with two worker threads, each of whose engines answers only while
    the other generates too (so every step is shared, whatever the load): every step's metrics say
    rollout_workers == 2 with half the groups each. With an RC summariser of its own (the tiny preset with
    its own random weights): the trainer publishes it once to the summariser store, each worker builds a
    second engine on it, every summary call goes there with the summary sampling, and the summary counts
    come back to the trainer's metrics with the rollouts."""
    from transformers import AutoTokenizer

    from qedjax.rollout.weights import WeightStore

    path, run_dir = _config(tmp_path, "workers", mode="sync", max_lag=0)
    raw = yaml.safe_load(open(path))
    raw["grpo"]["rc"]["summarizer"] = "tiny"
    raw["engine"].update(problems_per_item=1, worker_slots=1)  # a worker holds one item at a time
    open(path, "w").write(yaml.safe_dump(raw))
    versions, summary_calls, policy_prompts, specs = [], [], [], []
    both = threading.Barrier(2, timeout=600)  # a hang guard, not under test

    class Recording(worker.StoreJaxEngine):
        def generate(self, requests, params, seeds=None):
            both.wait()
            versions.append(self.version)
            policy_prompts.extend(r[0]["content"] for r in requests)
            return super().generate(requests, params, seeds)

    class Summarizer(worker.StoreJaxEngine):
        def generate(self, requests, params, seeds=None):
            summary_calls.append((len(requests), params,
                                  all("summary of an attempt" in r[0]["content"] for r in requests)))
            return super().generate(requests, params, seeds)

    def tokenizer():
        return AutoTokenizer.from_pretrained(str(run_dir / "toy" / "tokenizer"))

    def make_engine(version):
        return Recording(WeightStore(tmp_path / "weights"), tokenizer(), version=version, max_batch=64)

    def make_summarizer(spec):
        specs.append(spec)
        return Summarizer(WeightStore(spec["store"]), tokenizer(), version=spec["version"], max_batch=64)

    errors = []

    def run(fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            errors.append(e)

    serve_args = (worker.serve, str(tmp_path / "queue"), str(tmp_path / "weights"), make_engine)
    serving = [threading.Thread(target=run, args=serve_args, daemon=True,
                                kwargs={"worker_id": w, "poll_s": 0.05, "make_summarizer": make_summarizer})
               for w in ("w0", "w1")]
    training = threading.Thread(target=run, args=(launch.main, ["--config", path]), daemon=True)
    for t in serving + [training]:
        t.start()
    deadline = time.monotonic() + 1200  # a hang guard, not under test
    while training.is_alive() and not errors and time.monotonic() < deadline:
        time.sleep(0.2)
    for t in serving:
        t.join(30)
    if errors:
        raise errors[0]
    assert not training.is_alive() and not any(t.is_alive() for t in serving)  # the closed queue stopped them
    rows = [r for r in read_metrics(str(run_dir), "grpo") if "reward_mean" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["rollout_workers"] == 2 and r["rollout_share/w0"] == r["rollout_share/w1"] == 0.5 for r in rows)
    assert all(r["lag_max"] == 0 for r in rows)
    assert all(sum(r["score_hist"]) == 2 * 2 * 4 and "wait_s" in r for r in rows)
    assert versions == sorted(versions) and versions[-1] > 0  # the workers followed the trainer's versions
    # The summariser: built once per worker, from version 0 of its own store, which holds the tiny preset's
    # own weights (not the policy's version 0); 1 problem x 1 turn summarised per item, at T 0.7.
    assert specs == 2 * [{"store": str(run_dir / "summarizer_weights"), "version": 0, "tokenizer": False}]
    summarizer_store, policy_store = WeightStore(specs[0]["store"]), WeightStore(tmp_path / "weights")
    assert summarizer_store.versions() == [0]
    first = dict(summarizer_store.read(0))
    assert any((first[k] != v).any() for k, v in policy_store.read(policy_store.versions()[0]) if k in first)
    assert len(summary_calls) == 6 and all(n == 1 and p.temperature == 0.7 and p.top_k == 20 and asked
                                           for n, p, asked in summary_calls)
    assert not any("summary of an attempt" in prompt for prompt in policy_prompts)  # the policy wrote none
    assert all(r["summaries_attempted"] == 2 for r in rows)  # the counts came back with the rollouts
    queue = WorkQueue(tmp_path / "queue")
    assert queue.counts() == {"items": 0, "assigned": 0, "done": 0} and queue.closed
