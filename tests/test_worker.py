"""Rollout workers: the file queue (exclusive claims across processes, whole files only, dead-worker
requeue), Rollouts through JSON, the trainer/worker protocol with a scripted engine, and the RL loop
with `engine.kind=workers` fed by a worker thread that follows the weight store, and by a vLLM worker
process (vLLM's CPU build) killed mid-item and replaced."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import yaml

from qedjax import launch, rl
from qedjax.benchmarks import Problem
from qedjax.config_io import build, to_dict
from qedjax.metrics import read_metrics
from qedjax.rewards import Grade
from qedjax.rollout import groups, worker
from qedjax.rollout.engine import Completion, SamplingParams
from qedjax.rollout.queue import WorkQueue
from qedjax.rollout.rc import RCState
from fakes import FakeEngine, FakeGrader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CLAIMER = """
import json, os, sys, time
from qedjax.rollout.queue import WorkQueue
root, me, go = sys.argv[1:]
queue = WorkQueue(root)
while not os.path.exists(go):
    time.sleep(0.001)
got = []
while (claimed := queue.claim(me)) is not None:
    item, payload = claimed
    assert payload == {"n": int(item.split("-")[1])}, (item, payload)
    got.append(item)
print(json.dumps(got))
"""

WRITER = """
import sys
from qedjax.rollout.queue import WorkQueue
queue = WorkQueue(sys.argv[1])
for i in range(int(sys.argv[2])):
    queue.complete(f"r-{i:03d}", {"i": i, "data": list(range(100_000))}, "w")
"""


def _python(code, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE, env=env, text=True)


def test_two_processes_claim_every_item_exactly_once(tmp_path):
    queue = WorkQueue(tmp_path / "q")
    items = [f"item-{i:03d}" for i in range(40)]
    for i, item in enumerate(items):
        queue.submit(item, {"n": i})
    go = tmp_path / "go"
    procs = [_python(CLAIMER, tmp_path / "q", f"w{k}", go) for k in range(2)]
    time.sleep(0.5)  # both started and waiting
    go.touch()
    got = [json.loads(p.communicate(timeout=600)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(got[0] + got[1]) == items  # each item once: no loss, no double claim
    assert all(g == sorted(g) for g in got)  # oldest first
    assert queue.counts() == {"todo": 0, "claimed": 40, "done": 0}


def test_results_are_never_read_half_written(tmp_path):
    queue = WorkQueue(tmp_path / "q")
    n = 20
    writer = _python(WRITER, tmp_path / "q", n)
    got, deadline = {}, time.monotonic() + 600  # a hang guard, not under test
    while len(got) < n and time.monotonic() < deadline:
        got.update(queue.take_results())  # a partial file would fail to parse here
        time.sleep(0.001)
    writer.communicate(timeout=600)
    assert writer.returncode == 0
    assert sorted(got) == [f"r-{i:03d}" for i in range(n)]
    assert all(r["data"] == list(range(100_000)) and r["i"] == int(k[2:]) for k, r in got.items())
    assert os.listdir(tmp_path / "q" / "tmp") == [] and queue.take_results() == {}


def test_claims_of_a_dead_worker_are_requeued(tmp_path):
    queue = WorkQueue(tmp_path / "q")
    for i in range(3):
        queue.submit(f"i-{i}", {"n": i})
    queue.heartbeat("dead")
    assert queue.claim("dead") == ("i-0", {"n": 0})
    queue.heartbeat("alive")
    assert queue.claim("alive") == ("i-1", {"n": 1})
    trainer = WorkQueue(tmp_path / "q")  # its own clock and memory of heartbeats
    assert trainer.requeue_dead(0.2) == []  # first sight of both heartbeats
    time.sleep(0.3)
    queue.heartbeat("alive")
    assert trainer.requeue_dead(0.2) == ["i-0"]  # "dead" stood still; "alive" moved on
    assert trainer.counts() == {"todo": 2, "claimed": 1, "done": 0}
    assert queue.claim("other") == ("i-0", {"n": 0})
    # A worker stopping mid-item hands it back; a finished one leaves no claim behind.
    queue.release("i-1", "alive")
    assert queue.claim("alive") == ("i-1", {"n": 1})
    assert queue.release_all("alive") == ["i-1"]  # the worker restarted under the same id
    queue.complete("i-0", {"ok": 1}, "other")
    assert trainer.counts() == {"todo": 2, "claimed": 0, "done": 1}
    assert trainer.take_results() == {"i-0": {"ok": 1}}
    # A new trainer session starts clean and opens the queue; closing it tells idle workers to go.
    queue.close()
    assert queue.closed
    trainer.purge()
    assert not queue.closed and trainer.counts() == {"todo": 0, "claimed": 0, "done": 0}
    with pytest.raises(ValueError, match="worker id"):
        queue.claim("bad@id")


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
    back = worker.rollouts_from_json(json.loads(json.dumps(worker.rollouts_to_json(ro))))
    assert back == ro
    assert isinstance(back.completions[0][0].tokens, tuple) and isinstance(back.completions[0][0].logprobs, tuple)
    g = groups.GRPOConfig(group_size=4, rc=groups.RCTrainConfig(enabled=True, turns=2, summarizer="policy"),
                          sampling=SamplingParams(max_new_tokens=64, temperature=0.7, top_k=5, seed=9))
    payload = json.loads(json.dumps(worker.work_payload(g, ro.problems, step=6, seed=2, version=4)))
    assert payload["summarizer"] is None  # the policy summarises
    assert worker.grpo_config(payload) == g == build(groups.GRPOConfig, to_dict(g))
    own = worker.StoreSummarizer("gs://b/summarizer", 0, "/ckpt/Qwen3-4B-Instruct-2507")
    payload = json.loads(json.dumps(worker.work_payload(g, ro.problems, step=6, seed=2, version=4,
                                                        summarizer=own.spec())))
    assert worker.StoreSummarizer(**payload["summarizer"]) == own
    assert [worker.problem_from_json(p) for p in payload["problems"]] == ro.problems
    with pytest.raises(ValueError, match="format"):
        worker.grpo_config({**payload, "format": "other/9"})
    args = worker.parse_args(["--store", "s", "--queue", "q", "--tokenizer", "t", "--tensor-parallel-size", "2",
                              "--enforce-eager", "--vllm-arg", "swap_space=8", "--vllm-arg", "kv_cache_dtype=fp8"])
    assert worker.vllm_options(args) == {"tensor_parallel_size": 2, "enforce_eager": True, "swap_space": 8,
                                         "kv_cache_dtype": "fp8"}
    # The summariser's engine: the policy engine's options, overlaid with --summarizer-vllm-arg.
    args = worker.parse_args(["--store", "s", "--queue", "q", "--tokenizer", "t", "--gpu-memory-utilization", "0.6",
                              "--summarizer-vllm-arg", "gpu_memory_utilization=0.25", "--vllm-arg", "dtype=bfloat16"])
    assert worker.vllm_options(args) == {"gpu_memory_utilization": 0.6, "dtype": "bfloat16"}
    assert worker.vllm_options(args, summarizer=True) == {"gpu_memory_utilization": 0.25, "dtype": "bfloat16"}
    # Its tokenizer: the flag, else the directory the trainer named if it is here, else the policy's.
    assert worker.summarizer_tokenizer(args, own.spec() | {"tokenizer": None}) == "t"
    assert worker.summarizer_tokenizer(args, own.spec() | {"tokenizer": ROOT}) == ROOT
    with pytest.raises(FileNotFoundError, match="--summarizer-tokenizer"):
        worker.summarizer_tokenizer(args, own.spec())
    args = worker.parse_args(["--store", "s", "--queue", "q", "--tokenizer", "t", "--summarizer-tokenizer", "u"])
    assert worker.summarizer_tokenizer(args, own.spec()) == "u"


class _Store:
    """A weight store with one committed version and nothing in it (for scripted engines)."""

    def latest(self):
        return 0


def _serve_in_thread(queue_dir, make_engine):
    errors = []

    def target():
        try:
            worker.serve(str(queue_dir), _Store(), make_engine, worker_id="w0", poll_s=0.01)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            errors.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, errors


def test_workers_make_the_rollouts_sync_mode_would(tmp_path):
    problems = [Problem(str(i), f"Show that {i} is {i}.", {}) for i in range(6)]
    g = groups.GRPOConfig(problems_per_step=2, group_size=2, sampling=SamplingParams(max_new_tokens=40, seed=3),
                          rc=groups.RCTrainConfig(enabled=True, turns=1, states_per_problem=2, summarizer="policy"))
    grader = FakeGrader(lambda item: 7.0 if "1" in item.response else 0.0)
    sampler = groups.ProblemSampler(problems, seed=5)
    dispatcher = worker.Dispatcher(str(tmp_path / "q"), g, sampler, 11, grader, depth=2, version=lambda: 0, poll_s=0.01)
    dispatcher.start()
    thread, errors = _serve_in_thread(tmp_path / "q", lambda version: FakeEngine())
    got = [dispatcher.get() for _ in range(3)]
    assert sampler.cursor == 4 * 2  # three steps taken, one more queued ahead (depth 2)
    reference, engine = groups.ProblemSampler(problems, seed=5), FakeEngine()
    for ro in got:
        picked = reference.take(2)
        want = rl.collect(g, engine, engine, grader, picked, reference.cursor, 11)
        assert (ro.problems, ro.states, ro.completions, ro.grades, ro.summary_tokens) == (
            want.problems, want.states, want.completions, want.grades, want.summary_tokens)
        assert {"states_s", "generate_s", "grade_s", "wait_s"} <= set(ro.times)
    dispatcher.stop()
    dispatcher.close()
    thread.join(10)
    assert not thread.is_alive() and not errors  # the closed queue sent the worker home
    counts = WorkQueue(tmp_path / "q").counts()  # the step queued ahead was withdrawn, or finished unused
    assert counts["todo"] == counts["claimed"] == 0 and counts["done"] <= 1
    # A worker that fails reports it: the trainer stops with the worker's traceback.
    sampler = groups.ProblemSampler(problems, seed=5)
    dispatcher = worker.Dispatcher(str(tmp_path / "q2"), g, sampler, 11, grader, depth=1, version=lambda: 0,
                                   poll_s=0.01)
    dispatcher.start()
    thread, errors = _serve_in_thread(tmp_path / "q2", lambda version: FakeEngine(fail_on_call=0))
    with pytest.raises(RuntimeError, match="(?s)rollout worker w0 failed.*engine killed"):
        dispatcher.get()
    thread.join(10)
    assert len(errors) == 1 and "engine killed" in str(errors[0])
    # A worker interrupted mid-item (SIGTERM raises SystemExit in `main`) hands the item back.

    class Interrupted(FakeEngine):
        def generate(self, requests, params):
            raise SystemExit(143)

    queue = WorkQueue(tmp_path / "q3")
    queue.submit("a-0", worker.work_payload(g, problems[:2], step=2, seed=0, version=0))
    thread, errors = _serve_in_thread(tmp_path / "q3", lambda version: Interrupted())
    thread.join(10)
    assert len(errors) == 1 and isinstance(errors[0], SystemExit)
    assert queue.counts() == {"todo": 1, "claimed": 0, "done": 0} and queue.heartbeat_of("w0") is None


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
def test_rl_loop_with_a_worker_following_the_store(tmp_path):
    """engine.kind=workers with an RC summariser of its own (the tiny preset with its own random
    weights): the trainer publishes it once to the summariser store, the worker builds a second engine
    on it, every summary call goes there with the summary sampling, and the summary counts come back
    to the trainer's metrics with the rollouts."""
    from transformers import AutoTokenizer

    from qedjax.rollout.weights import WeightStore

    path, run_dir = _config(tmp_path, "workers")
    raw = yaml.safe_load(open(path))
    raw["grpo"]["rc"]["summarizer"] = "tiny"
    open(path, "w").write(yaml.safe_dump(raw))
    versions, summary_calls, policy_prompts, specs = [], [], [], []

    class Recording(worker.StoreJaxEngine):
        def generate(self, requests, params):
            versions.append(self.version)
            policy_prompts.extend(r[0]["content"] for r in requests)
            return super().generate(requests, params)

    class Summarizer(worker.StoreJaxEngine):
        def generate(self, requests, params):
            summary_calls.append((len(requests), params,
                                  all("summary of an attempt" in r[0]["content"] for r in requests)))
            return super().generate(requests, params)

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
    serving = threading.Thread(target=run, args=serve_args, daemon=True,
                               kwargs={"worker_id": "w0", "poll_s": 0.05, "make_summarizer": make_summarizer})
    training = threading.Thread(target=run, args=(launch.main, ["--config", path]), daemon=True)
    serving.start()
    training.start()
    deadline = time.monotonic() + 1200  # a hang guard, not under test
    while training.is_alive() and not errors and time.monotonic() < deadline:
        time.sleep(0.2)
    serving.join(30)
    if errors:
        raise errors[0]
    assert not training.is_alive() and not serving.is_alive()  # finished; the closed queue stopped the worker
    rows = [r for r in read_metrics(str(run_dir), "grpo") if "reward_mean" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["lag_max"] <= 1 and r["lag_min"] >= 0 for r in rows)
    assert all(sum(r["score_hist"]) == 2 * 2 * 4 and "wait_s" in r for r in rows)
    assert versions == sorted(versions) and versions[-1] > 0  # the worker followed the trainer's versions
    # The summariser: built once, from version 0 of its own store, which holds the tiny preset's own
    # weights (not the policy's version 0); 2 problems x 1 turn summarised per step, at T 0.7.
    assert specs == [{"store": str(run_dir / "summarizer_weights"), "version": 0, "tokenizer": None}]
    summarizer_store, policy_store = WeightStore(specs[0]["store"]), WeightStore(tmp_path / "weights")
    assert summarizer_store.versions() == [0]
    first = dict(summarizer_store.read(0))
    assert any((first[k] != v).any() for k, v in policy_store.read(policy_store.versions()[0]) if k in first)
    assert len(summary_calls) >= 3 and all(n == 2 and p.temperature == 0.7 and p.top_k == 20 and asked
                                           for n, p, asked in summary_calls)
    assert not any("summary of an attempt" in prompt for prompt in policy_prompts)  # the policy wrote none
    assert all(r["summaries_attempted"] == 2 for r in rows)  # the counts came back with the rollouts
    counts = WorkQueue(tmp_path / "queue").counts()  # the step queued ahead: withdrawn, or finished unused
    assert counts["todo"] == counts["claimed"] == 0 and counts["done"] <= 1 and WorkQueue(tmp_path / "queue").closed


@pytest.mark.vllm
@pytest.mark.xdist_group("vllm")
def test_rl_loop_with_a_vllm_worker_process_killed_and_replaced(tmp_path):
    """GRPO with engine.kind=workers on CPU and `python -m qedjax.rollout.worker --engine vllm` (vLLM's
    CPU build) as a separate process. Sync mode (max_lag 0), so the trainer's logprobs of the sampled
    tokens are those of the very weights vLLM sampled with: the gap is rounding, not policy drift. The
    worker is SIGKILLed (with its vLLM processes) while it holds an item; a new process under the same
    worker id hands the claim back to the queue and takes it, so every step is made exactly once."""
    import signal

    from test_vllm import need_vllm

    need_vllm()
    steps = 3
    path, run_dir = _config(tmp_path, "workers", steps=steps, mode="sync", max_lag=0,
                            sampling={"max_new_tokens": 12, "temperature": 1.0, "seed": 0})
    raw = yaml.safe_load(open(path))
    raw["model"] = {"preset": "demo"}  # vLLM's CPU attention needs head_dim >= 32 (the demo model's)
    raw["grpo"]["checkpoint"]["every"] = 1
    raw["grpo"]["rc"]["summarizer"] = "frozen"  # a second vLLM engine in the worker, on its own store
    open(path, "w").write(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "qedjax.rollout.worker", "--store", str(tmp_path / "weights"),
               "--queue", str(tmp_path / "queue"), "--tokenizer", str(run_dir / "toy" / "tokenizer"),
               "--worker-id", "w0", "--poll-s", "0.05", "--engine", "vllm", "--max-model-len", "256",
               "--max-num-seqs", "16", "--enforce-eager", "--vllm-arg", f"kv_cache_memory_bytes={64 * 2**20}",
               "--summarizer-vllm-arg", f"kv_cache_memory_bytes={32 * 2**20}"]
    logs = [open(tmp_path / f"worker{k}.log", "w+") for k in range(2)]

    def start(k):  # its own session: SIGKILL to the group takes vLLM's engine-core and worker processes too
        return subprocess.Popen(command, stdout=logs[k], stderr=subprocess.STDOUT, env=env, start_new_session=True)

    errors = []

    def train():
        try:
            launch.main(["--config", path])
        except BaseException as e:  # noqa: BLE001 - reported to the test
            errors.append(e)

    workers = [start(0)]
    training = threading.Thread(target=train, daemon=True)
    training.start()
    queue = WorkQueue(tmp_path / "queue")
    try:
        deadline = time.monotonic() + 600
        while queue.counts()["claimed"] == 0:
            assert time.monotonic() < deadline and not errors and workers[0].poll() is None, "no item claimed"
            time.sleep(0.02)
        os.killpg(workers[0].pid, signal.SIGKILL)  # mid-item: claimed, not completed
        workers[0].wait(30)
        assert queue.counts()["claimed"] == 1 and queue.counts()["done"] == 0
        workers.append(start(1))
        training.join(900)
        assert not training.is_alive(), "the trainer did not finish"
        if errors:
            raise errors[0]
        assert workers[1].wait(120) == 0  # the closed queue sent the new worker home
    finally:
        for w in workers:
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGKILL)
                w.wait(30)
    first, second = (open(tmp_path / f"worker{k}.log").read() for k in range(2))
    assert "engine vllm" in first and "handed back" in second  # the claim of the killed worker went back
    assert "loaded version" in second and "rollouts at version" in second
    assert "built the RC summariser" in second
    # The summary counts came back from the worker (a random model's summaries never close its think block).
    assert all(r["summaries_attempted"] == 2 for r in [r for r in read_metrics(str(run_dir), "grpo")
                                                       if "reward_mean" in r])
    rows = [r for r in read_metrics(str(run_dir), "grpo") if "reward_mean" in r]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # no step lost, none made twice
    assert all(sum(r["score_hist"]) == 2 * 2 * 4 for r in rows)
    assert all(r["lag_max"] == 0 for r in rows)  # max_lag 0
    # Behaviour logprobs from vLLM, trainer logprobs from the JAX model on the same fp32 weights: they
    # differ by rounding only (~1e-6 a token, written to metrics.jsonl with 6 decimals; the vLLM tests
    # bound each token by 1e-4).
    assert all("logprob_gap" in r and r["logprob_gap"] < 1e-4 for r in rows), [r["logprob_gap"] for r in rows]
    counts = queue.counts()
    assert counts == {"todo": 0, "claimed": 0, "done": 0} and queue.closed
