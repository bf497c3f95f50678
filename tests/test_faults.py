"""Crash drills: real `python -m qedjax.launch` processes SIGKILLed at chosen points (mid-step, mid
asynchronous save; qedjax.checkpoint.fault_point) and re-run with the same command must end exactly
where an uninterrupted run ends: the same parameters and the same metrics.jsonl, byte for byte.
A corrupt or truncated checkpoint is named and skipped, never restored."""

import json
import os
import shutil
import signal
import sys

import jax
import numpy as np
import pytest
import yaml

from qedjax import launch, sharding, toy, train
from qedjax.checkpoint import Checkpointer, CorruptCheckpointError, restore_params
from qedjax.config import load_config

from test_multihost import _child_env

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import fault_drill  # noqa: E402

KILLED = -signal.SIGKILL
TIMEOUT_S = 1200  # hang guard per process, far above what these take


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), "rb") as f:
        return f.read()


def _params(config, run_dir, stage, step=None):
    """The parameters of a stage's checkpoint (the last one by default)."""
    cfg = load_config(str(config))
    _, _, target = train.abstract_params(cfg.model, sharding.make_mesh(cfg.run.mesh), sharding.TRAIN_RULES)
    return jax.device_get(restore_params(os.path.join(run_dir, stage, "checkpoints"), target, step))


def _assert_same_params(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def sft_config(tmp_path_factory, toy_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("faults_sft")
    data = toy.write_data(toy.ToyConfig(sft_rows=64, rl_problems=1, eval_problems=1), str(tmp / "data"))
    raw = {"run": {"dir": str(tmp / "unused"), "seed": 0, "mesh": "data=2,fsdp=4", "deterministic": True},
           "model": {"preset": "tiny", "tokenizer": toy_tokenizer_dir},
           "sft": {"global_batch": 8, "steps": 5, "data": {"path": data["sft"], "seq_len": 96},
                   "optim": {"lr": 3e-3, "warmup_ratio": 0.25},
                   "checkpoint": {"every": 2, "keep": 3}}}  # asynchronous saves: the default
    path = tmp / "sft.yaml"
    path.write_text(yaml.safe_dump(raw))
    straight = tmp / "straight"
    assert launch.main(["--config", str(path), f"run.dir={straight}"]) == 0
    return path, straight


def test_sft_sigkill_mid_step_and_mid_async_save_resumes_exactly(sft_config, tmp_path):
    config, straight = sft_config
    killed = tmp_path / "killed"
    command = fault_drill.launch_command(str(config), str(killed))
    log, env = str(tmp_path / "log.txt"), _child_env(8)
    assert fault_drill.run_launch(command, log, fault="sft:step:3", env=env, timeout=TIMEOUT_S) == KILLED
    steps = [r["step"] for r in map(json.loads, _metrics(killed).splitlines())]
    assert steps == [0, 1, 2]  # the start row and steps 1-2: step 3 died before its row
    assert fault_drill.run_launch(command, log, fault="sft:save:4", env=env, timeout=TIMEOUT_S) == KILLED
    ckpt_dir = killed / "sft" / "checkpoints"
    half = [p for p in os.listdir(ckpt_dir) if p.startswith("4") and p != "4"]
    assert half and not (ckpt_dir / "4").exists(), os.listdir(ckpt_dir)  # step 4 half written
    assert Checkpointer(str(ckpt_dir)).latest_step() == 2  # ... and not taken for a checkpoint
    assert fault_drill.run_launch(command, log, env=env, timeout=TIMEOUT_S) == 0
    assert _metrics(killed) == _metrics(straight)
    _assert_same_params(_params(config, killed, "sft"), _params(config, straight, "sft"))


def _truncate_largest_file(directory):
    files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)
    return largest


def test_corrupt_latest_checkpoint_is_named_and_the_previous_step_restored(sft_config, tmp_path, capsys):
    config, straight = sft_config
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    ckpt_dir = run / "sft" / "checkpoints"
    assert sorted(int(p) for p in os.listdir(ckpt_dir) if p.isdigit()) == [2, 4, 5]
    _truncate_largest_file(ckpt_dir / "5" / "params")  # a file cut short
    shutil.rmtree(ckpt_dir / "4" / "opt")  # a directory half deleted
    # Rewind the finished run's metrics as a crash after step 2 would have left them, then resume.
    with open(run / "metrics.jsonl") as f:
        rows = [line for line in f if '"step": 0' in line or '"step": 1,' in line or '"step": 2,' in line]
    (run / "metrics.jsonl").write_text("".join(rows))
    capsys.readouterr()
    assert launch.main(["--config", str(config), f"run.dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint step 5" in out and "checkpoint step 4" in out and "unreadable, not restored" in out
    assert "falling back to checkpoint step 2" in out
    assert {"corrupt-5", "corrupt-4"} <= set(os.listdir(ckpt_dir))
    assert _metrics(run) == _metrics(straight)
    _assert_same_params(_params(config, run, "sft"), _params(config, straight, "sft"))
    # No readable step at all: the run stops, naming each step and why, and restores nothing.
    for step in ("2", "4", "5"):
        _truncate_largest_file(ckpt_dir / step / "params")
    with pytest.raises(CorruptCheckpointError, match=r"no readable checkpoint in .*step 5 .*step 4 .*step 2"):
        launch.main(["--config", str(config), f"run.dir={run}", "sft.steps=6"])


def test_grpo_sync_sigkill_mid_step_and_mid_async_save_resumes_exactly(tmp_path):
    raw = {"run": {"dir": str(tmp_path / "unused"), "seed": 0, "stages": ["grpo"], "deterministic": True},
           "model": {"preset": "tiny"},
           "toy": {"sft_rows": 8, "rl_problems": 16, "eval_problems": 2},
           "grpo": {"init": "model", "steps": 3, "problems_per_step": 2, "group_size": 4, "mode": "sync",
                    "rc": {"enabled": True, "turns": 1, "states_per_problem": 2, "summary_max_new_tokens": 8},
                    "sampling": {"max_new_tokens": 12, "temperature": 1.0, "seed": 0},
                    # A random tiny model never closes its think block, so every reward is 0: the entropy
                    # bonus (and training on zero-variance groups) still moves the weights each step.
                    "skip_zero_variance": False,
                    "loss": {"clip_low": 0.2, "clip_high": 0.28, "entropy_coef": 0.01},
                    "optim": {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0},
                    "checkpoint": {"every": 1, "keep": 3}}}  # asynchronous saves: the default
    config = tmp_path / "grpo.yaml"
    config.write_text(yaml.safe_dump(raw))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert launch.main(["--config", str(config), f"run.dir={straight}"]) == 0
    first, last = (_params(config, straight, "grpo", s) for s in (1, 3))
    assert any(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a != b).any()), first, last)))  # it trains
    command = fault_drill.launch_command(str(config), str(killed))
    log, env = str(tmp_path / "log.txt"), _child_env(8)
    assert fault_drill.run_launch(command, log, fault="grpo:step:2", env=env, timeout=TIMEOUT_S) == KILLED
    assert fault_drill.run_launch(command, log, fault="grpo:save:2", env=env, timeout=TIMEOUT_S) == KILLED
    ckpt_dir = killed / "grpo" / "checkpoints"
    assert not (ckpt_dir / "2").exists() and Checkpointer(str(ckpt_dir)).latest_step() == 1
    assert fault_drill.run_launch(command, log, env=env, timeout=TIMEOUT_S) == 0
    assert _metrics(killed) == _metrics(straight)
    _assert_same_params(_params(config, killed, "grpo"), _params(config, straight, "grpo"))


def test_malformed_problem_file_fails_the_launch_naming_the_line(tmp_path, toy_tokenizer_dir, monkeypatch):
    problems = tmp_path / "problems.jsonl"
    problems.write_text('{"id": "a", "problem": "Show P.", "marking_scheme": "7 pts"}\n{"id": "b", "problem": 3}\n')
    raw = {"run": {"dir": str(tmp_path / "run"), "stages": ["grpo"]},
           "model": {"preset": "tiny", "tokenizer": toy_tokenizer_dir},
           "grpo": {"init": "model", "steps": 1, "problems": {"path": str(problems), "format": "proofbench"}}}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    monkeypatch.setattr(train, "init_params", lambda *a, **k: pytest.fail("compiled before reading the problems"))
    with pytest.raises(ValueError, match=r"problems.jsonl:2: 'problem' \(column 'problem'\) is int, expected text"):
        launch.main(["--config", str(config)])


# --- judge faults inside the RL loop ----------------------------------------------------------------------
# Each step grades 8 responses; response k of the run gets the fault JUDGE_FAULTS[k // 8][k % 8].
JUDGE_FAULTS = [["http500", "429secs", "429date", "429huge", "429none", "nochoices", "nullcontent", "drop"],
                ["slow"] + ["ok"] * 7, ["http500"] * 8, ["http500"] * 8]
FAR_FUTURE = "Fri, 01 Jan 2100 00:00:00 GMT"


def _judge_script(proof, n):
    kind = proof.split(":", 1)[1].rsplit("-", 1)[0]
    ok = ("text", "Checkpoint met.\n<score>7</score>")
    retry_after = {"429secs": "0.05", "429date": FAR_FUTURE, "429huge": "1000000000"}
    if kind in retry_after:  # once, then a score: the wait asked for is honoured, and capped
        return ("status", 429, {"Retry-After": retry_after[kind]}) if n == 0 else ok
    return {"ok": ok, "http500": ("status", 500, {}), "429none": ("status", 429, {}), "drop": ("drop",),
            "nochoices": ("raw", json.dumps({"id": "x", "object": "chat.completion"})),
            "nullcontent": ("raw", json.dumps({"choices": [{"message": {"role": "assistant", "content": None}}]})),
            "slow": ("hang", "<score>7</score>")}[kind]


def test_judge_faults_cost_their_sample_and_a_judge_down_stops_the_run(tmp_path, toy_tokenizer_dir, monkeypatch,
                                                                        capsys):
    import dataclasses

    from qedjax.rl import GradingDownError
    from qedjax.rollout import jax_engine
    from test_judge import FakeJudge

    real = jax_engine.JaxEngine.generate
    made = []

    def generate(self, requests, params, seeds=None):  # complete answers, each naming its fault for the server
        out = real(self, requests, params, seeds)
        texts = []
        for c in out:
            k = len(made)
            made.append(k)
            texts.append(f"<think>\nok\n</think>\n\nSCRIPT:{JUDGE_FAULTS[k // 8][k % 8]}-{k}")
        return [dataclasses.replace(c, text=t, finish_reason="stop") for c, t in zip(out, texts)]

    monkeypatch.setattr(jax_engine.JaxEngine, "generate", generate)
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"id": str(i), "problem": f"Show that {i} + 0 = {i}.",
                                            "marking_scheme": "7 points: a correct proof."}) + "\n" for i in range(8)))
    judge = FakeJudge(_judge_script)
    run_dir = tmp_path / "run"
    raw = {"run": {"dir": str(run_dir), "seed": 0, "stages": ["grpo"], "deterministic": True},
           "model": {"preset": "tiny", "tokenizer": toy_tokenizer_dir},
           "grpo": {"init": "model", "steps": 6, "problems_per_step": 2, "group_size": 4, "grader": "judge",
                    "rc": {"enabled": False}, "problems": {"path": str(problems), "format": "proofbench"},
                    "sampling": {"max_new_tokens": 4, "temperature": 1.0, "seed": 0},
                    "max_failed_grading_steps": 2, "checkpoint": {"every": 10, "keep": 1, "async_save": False}},
           "judge": {"base_url": judge.base_url, "model": "judge", "max_retries": 1, "timeout_s": 1.0,
                     "backoff_s": 0.0, "max_wait_s": 0.2, "concurrency": 8}}
    config = tmp_path / "judge.yaml"
    config.write_text(yaml.safe_dump(raw))
    try:
        with pytest.raises(GradingDownError, match=r"every grader call failed in 2 consecutive steps.*step 4.*HTTP 500"):
            launch.main(["--config", str(config)])
    finally:
        judge.close()
    out = capsys.readouterr().out
    rows = {r["step"]: r for r in map(json.loads, _metrics(run_dir).splitlines()) if "reward_mean" in r}
    assert sorted(rows) == [1, 2, 3, 4]  # every step completed, the faulty ones too
    # Step 1: 500, 429 without Retry-After, no `choices`, a dropped connection: judge errors; null content: no
    # score to parse; the three 429s with Retry-After (seconds, a far HTTP date, 1e9 s: capped) score on retry.
    assert (rows[1].get("grader_judge_error"), rows[1].get("grader_parse_error")) == (4, 1)
    assert rows[1]["reward_mean"] == pytest.approx(3 / 8)
    for kind in ("429secs", "429date", "429huge"):
        assert judge.calls[f"SCRIPT:{kind}-{JUDGE_FAULTS[0].index(kind)}"] == 2
    assert judge.calls["SCRIPT:429none-4"] == judge.calls["SCRIPT:http500-0"] == 2  # retried, then given up
    # Step 2: a reply slower than the timeout costs its sample only.
    assert rows[2]["grader_timeout"] == 1 and rows[2]["reward_mean"] == pytest.approx(7 / 8)
    assert "grading_down_steps" not in rows[2]
    # Steps 3-4: the judge is down: a warning each step, then the run stops with a checkpoint.
    assert (rows[3]["grading_down_steps"], rows[4]["grading_down_steps"]) == (1, 2)
    assert "grpo step 3: WARNING every grader call failed (8 of 8" in out and "grpo step 4: WARNING" in out
    assert Checkpointer(str(run_dir / "grpo" / "checkpoints")).latest_step() == 4


# --- resume after prefetching ---------------------------------------------------------------------------

def test_sampler_checkpoints_the_trainers_position_not_the_prefetched_one():
    from qedjax.benchmarks import Problem
    from qedjax.rollout.groups import ProblemSampler

    problems = [Problem(str(i), f"p{i}", {}) for i in range(10)]
    sampler, straight = ProblemSampler(problems, 3), ProblemSampler(problems, 3)
    batches = [sampler.take(2) for _ in range(3)]  # a producer two batches ahead of the trainer
    sampler.consumed()
    saved = sampler.state()
    resumed = ProblemSampler(problems, 3)
    resumed.restore(saved)
    assert [straight.take(2) for _ in range(3)] == batches
    assert [resumed.take(2) for _ in range(2)] == batches[1:]  # the prefetched batches come again


def test_async_grpo_checkpoints_hold_the_consumed_problems(tmp_path):
    raw = {"run": {"dir": str(tmp_path / "run"), "seed": 0, "stages": ["grpo"]},
           "model": {"preset": "tiny"},
           "toy": {"sft_rows": 8, "rl_problems": 16, "eval_problems": 2},
           "grpo": {"init": "model", "steps": 3, "problems_per_step": 2, "group_size": 4, "mode": "async",
                    "max_lag": 2, "rc": {"enabled": False}, "skip_zero_variance": False,
                    "sampling": {"max_new_tokens": 8, "temperature": 1.0, "seed": 0},
                    "checkpoint": {"every": 1, "keep": 3, "async_save": False}}}
    config = tmp_path / "async.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert launch.main(["--config", str(config)]) == 0
    import orbax.checkpoint as ocp

    ckpt = Checkpointer(str(tmp_path / "run" / "grpo" / "checkpoints"))
    for step in (1, 2, 3):  # the producer ran up to 2 batches ahead; each checkpoint is where the trainer was
        data = ckpt.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
        assert data["cursor"] == 2 * step


# --- weight store under contention ----------------------------------------------------------------------

def _outcome(store, version):
    """'ok' if every element read is `version` (a mixed or partial read would show), 'error' for a
    WeightStoreError naming the version; anything else fails the test."""
    from qedjax.rollout.weights import WeightStoreError

    try:
        values = {float(x) for _, a in store.read(version) for x in np.unique(a)}
    except WeightStoreError as e:
        assert f"version {version}" in str(e), e
        return "error"
    assert values == {float(version)}, values
    return "ok"


def _tiny_store_params(value):
    from test_weights import TINY, _constant_params

    from qedjax.models.qwen3 import Qwen3Config

    cfg = Qwen3Config(**TINY)
    return cfg, _constant_params(cfg, value)


def test_weight_store_two_publishers_republish_and_gc_during_reads(tmp_path):
    import threading

    from qedjax.rollout.weights import WeightStore, WeightStoreError

    cfg, _ = _tiny_store_params(0)
    # Two publishers at once, of different versions (odd and even), with a reader polling the newest.
    errors, seen, done = [], [], threading.Event()

    def publish(versions):
        store = WeightStore(tmp_path / "a", keep=3)
        for v in versions:
            try:
                store.publish(_tiny_store_params(v)[1], v, config=cfg)
            except BaseException as e:  # noqa: BLE001 - reported to the test
                errors.append((v, e))

    def read():
        store = WeightStore(tmp_path / "a")
        while not done.is_set():
            v = store.latest()
            if v is not None:
                seen.append(_outcome(store, v))

    writers = [threading.Thread(target=publish, args=(range(first, 13, 2),)) for first in (1, 2)]
    reader = threading.Thread(target=read)
    for t in (*writers, reader):
        t.start()
    for t in writers:
        t.join(600)
    done.set()
    reader.join(600)
    # The other publisher's garbage collection may take a lower version's arrays while it is being
    # written (a known limit, README "Reliability"): that publish fails with an error naming its
    # version, and nothing else may fail.
    assert all(isinstance(e, WeightStoreError) and f"version {v}" in str(e) for v, e in errors), errors
    assert 12 not in [v for v, _ in errors]  # the newest version is never collected under its writer
    assert seen and set(seen) <= {"ok", "error"}
    store = WeightStore(tmp_path / "a")
    assert store.latest() == 12 and _outcome(store, 12) == "ok"
    for v in store.versions():  # a committed version is whole, or (its arrays collected by the other
        assert _outcome(store, v) in ("ok", "error")  # publisher's garbage collection) an error naming it

    # A version re-published while a reader is part-way through it: the old whole version, or an error.
    store = WeightStore(tmp_path / "b", keep=1)
    store.publish(_tiny_store_params(1)[1], 1, config=cfg)
    reading = store.read(1)
    first = next(reading)[1]
    store.publish(_tiny_store_params(2)[1], 1, config=cfg)  # same version number, other values
    try:
        rest = [a for _, a in reading]
        assert all((a == 1).all() for a in [first, *rest])  # read ahead before the re-publish: whole
    except WeightStoreError as e:
        assert "version 1" in str(e), e
    assert _outcome_value(store, 1) == 2.0  # a fresh read sees the new whole version

    # A reader during garbage collection: versions 2 and 3 collect version 1 under it.
    reading = store.read(1)
    next(reading)
    for v in (2, 3):
        store.publish(_tiny_store_params(v)[1], v, config=cfg)
    try:
        assert all((a == 2).all() for _, a in reading)
    except WeightStoreError as e:
        assert "version 1" in str(e), e
    assert store.versions() == [3]
    with pytest.raises(WeightStoreError, match="version 1"):
        list(store.read(1))


def _outcome_value(store, version):
    return {float(x) for _, a in store.read(version) for x in np.unique(a)}.pop()


# --- two processes, SIGTERM to one ----------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_both_resume(sft_config, tmp_path):
    import subprocess

    from test_multihost import ROOT, _free_port

    from qedjax.metrics import read_metrics

    config, _ = sft_config
    run = tmp_path / "two"

    def launch_two(fault_for_1=None):
        port, procs, logs = _free_port(), [], []
        for i in range(2):
            env = _child_env(4)
            env.pop("QEDJAX_FAULT", None)
            if i == 1 and fault_for_1:
                env["QEDJAX_FAULT"] = fault_for_1
            logs.append(open(tmp_path / f"p{i}.log", "a"))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "qedjax.launch", "--config", str(config), f"run.dir={run}", "sft.steps=6",
                 "sft.checkpoint.every=10", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                 "--process-id", str(i)], env=env, cwd=ROOT, stdout=logs[-1], stderr=subprocess.STDOUT))
        try:
            codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
        finally:
            for p, log in zip(procs, logs):
                if p.poll() is None:
                    p.kill()
                log.close()
        return codes

    codes = launch_two("sft:step:3/TERM")  # process 1 alone gets SIGTERM during step 3
    logs = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
    assert codes[0] == codes[1] != 0, (codes, [log[-2000:] for log in logs])
    assert all("sft stopped at step 3" in log for log in logs), [log[-2000:] for log in logs]
    ckpt_dir = run / "sft" / "checkpoints"
    assert Checkpointer(str(ckpt_dir)).latest_step() == 3  # one checkpoint, both processes' shards in it
    assert {p for p in os.listdir(ckpt_dir / "3" / "params") if p.startswith("ocdbt.process_")} >= {
        "ocdbt.process_0", "ocdbt.process_1"}
    assert launch_two() == [0, 0]
    logs = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
    assert "resuming from the checkpoint of step 3" in logs[0]
    resumed = [r for r in read_metrics(str(run), "sft") if "loss" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert Checkpointer(str(ckpt_dir)).latest_step() == 6
    # exact resume: each process took its own streams' data state back (a stream restarted or
    # taken from the other process would feed other rows at steps 4-6); one process of 8 devices
    # feeds the same batches, so its losses agree within the collectives' summation order
    one = tmp_path / "one"
    assert launch.main(["--config", str(config), f"run.dir={one}", "sft.steps=6", "sft.checkpoint.every=10"]) == 0
    straight = [r["loss"] for r in read_metrics(str(one), "sft") if "loss" in r]
    np.testing.assert_allclose([r["loss"] for r in resumed], straight, rtol=1e-5, atol=0)


# --- GRPO with rollout workers: kill the trainer, keep the worker ---------------------------------------

@pytest.mark.slow
def test_grpo_with_workers_sigkill_and_resume_equals_a_straight_run(tmp_path, toy_tokenizer_dir):
    import subprocess

    data = toy.write_data(toy.ToyConfig(sft_rows=1, rl_problems=16, eval_problems=1), str(tmp_path / "data"))
    env = _child_env(8)

    def config(name):
        raw = {"run": {"dir": str(tmp_path / name), "seed": 0, "stages": ["grpo"], "deterministic": True},
               "model": {"preset": "tiny", "tokenizer": toy_tokenizer_dir},
               "engine": {"kind": "workers", "store": str(tmp_path / name / "weights"),
                          "queue": str(tmp_path / name / "queue")},
               "grpo": {"init": "model", "steps": 3, "problems_per_step": 2, "group_size": 4, "mode": "sync",
                        "problems": {"path": data["rl"], "format": "rules"}, "skip_zero_variance": False,
                        # A frozen summariser: the worker process builds its second engine from the
                        # store the trainer publishes it to (again after each restart).
                        "rc": {"enabled": True, "turns": 1, "states_per_problem": 2, "summary_max_new_tokens": 8,
                               "summarizer": "frozen"},
                        "sampling": {"max_new_tokens": 12, "temperature": 1.0, "seed": 0},
                        "loss": {"clip_low": 0.2, "clip_high": 0.28, "entropy_coef": 0.01},
                        "optim": {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0},
                        "checkpoint": {"every": 1, "keep": 3}}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path, raw

    def start_worker(raw, name):
        log = open(tmp_path / f"{name}_worker.log", "w")
        return subprocess.Popen([sys.executable, "-m", "qedjax.rollout.worker", "--engine", "jax",
                                 "--store", raw["engine"]["store"], "--queue", raw["engine"]["queue"],
                                 "--tokenizer", toy_tokenizer_dir, "--poll-s", "0.05", "--worker-id", "w0"],  # one id: the metrics name it
                                env=env, stdout=log, stderr=subprocess.STDOUT), log

    runs = {}
    for name, faults in (("straight", []), ("killed", ["grpo:step:2", "grpo:save:2"])):
        path, raw = config(name)
        worker, log = start_worker(raw, name)  # one worker throughout: it outlives the killed trainers
        try:
            fault_drill.kill_and_resume(fault_drill.launch_command(str(path), raw["run"]["dir"]), faults,
                                        str(tmp_path / f"{name}.log"), env=env, timeout=TIMEOUT_S)
            assert worker.wait(timeout=TIMEOUT_S) == 0  # the finished stage closed the queue
        finally:
            if worker.poll() is None:
                worker.kill()
            log.close()
        runs[name] = (path, tmp_path / name)
    killed_log = (tmp_path / "killed.log").read_text()
    assert "resuming from the checkpoint of step 1" in killed_log  # version 2 was in the store: uncommitted
    # The trainer republished the summariser on each start; the worker rebuilt it for each publication.
    assert (tmp_path / "killed_worker.log").read_text().count("built the RC summariser") == 3
    assert _metrics(tmp_path / "killed") == _metrics(tmp_path / "straight")
    _assert_same_params(_params(*runs["killed"], "grpo"), _params(*runs["straight"], "grpo"))
