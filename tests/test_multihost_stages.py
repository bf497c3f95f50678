"""Every stage after SFT on two processes of 4 CPU devices each (jax.distributed, as test_multihost),
against one process of 8: GRPO over RC states with a KL penalty (kl_coef > 0), sync, on the JAX engine,
then the eval stage; and GRPO fed by a rollout-worker process. Each two-process run is also stopped
once by a SIGTERM to process 1 alone, in the middle of a step (a generation; a wait for the worker),
and resumed: the resumed run must then train like the one process of 8.

Per step: loss, reward and tokens trained agree within tests/parity.py's bounds, and every row is
trained exactly once (the rows and tokens the step counted on the devices equal those the trainer
built its batch from; a row fed by both processes would be counted twice).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from qedjax import launch, toy
from qedjax.checkpoint import Checkpointer
from qedjax.metrics import read_metrics

import parity
from test_multihost import ROOT, TIMEOUT_S, _child_env, _free_port

STEPS = 3
STOP_S = 30  # from a SIGTERM to every process gone, at most (seconds, against minutes for a step here under load)


def _grpo(extra: dict) -> dict:
    return {"init": "model", "steps": STEPS, "problems_per_step": 2, "group_size": 4, "mode": "sync",
            "skip_zero_variance": False,
            "rc": {"enabled": True, "turns": 1, "states_per_problem": 2, "summary_max_new_tokens": 8},
            "sampling": {"max_new_tokens": 16, "temperature": 1.0, "seed": 0},
            "loss": {"clip_low": 0.2, "clip_high": 0.28, "entropy_coef": 0.01},
            "optim": {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0},
            "checkpoint": {"every": 1, "keep": 3}, **extra}


def _write(tmp_path, name, raw) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _launch_two(config, run_dir, logs_dir, tag, *, fault_for_1=None, extra_env=None):
    """Starts both processes of a two-process run; returns them (with their log paths)."""
    port, procs = _free_port(), []
    for i in range(2):
        env = _child_env(4)
        env.pop("QEDJAX_FAULT", None)
        env.update(extra_env or {})
        if i == 1 and fault_for_1:
            env["QEDJAX_FAULT"] = fault_for_1
        log = os.path.join(logs_dir, f"{tag}_p{i}.log")
        with open(log, "w") as f:
            procs.append((subprocess.Popen(
                [sys.executable, "-m", "qedjax.launch", "--config", config, f"run.dir={run_dir}",
                 "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT), log))
    return procs


def _wait_all(procs, timeout=TIMEOUT_S):
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p, _ in procs) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    return [p.returncode for p, _ in procs]


def _logs(procs):
    return [open(log).read() for _, log in procs]


def _tails(procs):
    return "\n".join(f"--- {log} ---\n{text[-3000:]}" for (_, log), text in zip(procs, _logs(procs)))


def _steps(run_dir):
    rows = [r for r in read_metrics(str(run_dir), "grpo") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), [r["step"] for r in rows]
    return rows


def _assert_parity(two_dir, one_dir):
    two, one = _steps(two_dir), _steps(one_dir)
    for run in (two, one):
        for r in run:  # every row with signal trained exactly once, all its response tokens counted once
            assert r["train_sequences"] == r["sequences_trained"] > 0, r
            assert r["train_tokens"] == r["tokens_expected"] > 0, r
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=parity.GRAD_RTOL, atol=0)
    for key in ("reward_mean", "train_tokens", "rollout_tokens", "train_sequences", "summary_tokens_mean"):
        assert [r[key] for r in two] == [r[key] for r in one], key
    return two


def _preempted_step(log: str) -> int:
    found = re.findall(r"grpo: preempted during the rollouts of step (\d+) \((.*)\)", log)
    assert found, log[-3000:]
    return int(found[-1][0])


@pytest.mark.slow
def test_grpo_rc_kl_and_eval_on_two_processes_like_one_with_a_sigterm_mid_generation(tmp_path, toy_tokenizer_dir):
    data = toy.write_data(toy.ToyConfig(sft_rows=1, rl_problems=16, eval_problems=4), str(tmp_path / "data"))
    raw = {"run": {"dir": str(tmp_path / "unused"), "seed": 0, "stages": ["grpo", "eval"], "eval_targets": ["grpo"],
                   "mesh": "fsdp=8", "deterministic": True},
           "model": {"preset": "tiny", "tokenizer": toy_tokenizer_dir},
           # Decode 4 tokens per program call: a generation is several calls, and a stop lands between two.
           "engine": {"kind": "jax", "decode_chunk": 4},
           "grpo": _grpo({"problems": {"path": data["rl"], "format": "rules"},
                          "loss": {"clip_low": 0.2, "clip_high": 0.28, "entropy_coef": 0.01, "kl_coef": 0.1}}),
           "eval": {"benchmark": {"path": data["eval"], "format": "rules", "name": "toy"}, "scaffold": "single",
                    "sampling": {"max_new_tokens": 12, "temperature": 1.0, "seed": 0}, "samples": 2,
                    "grader": "rule"}}
    config = _write(tmp_path, "grpo_eval", raw)
    two, one = tmp_path / "two", tmp_path / "one"

    # Process 1 alone gets SIGTERM before its 13th decode call: inside step 2's generations (a step makes
    # about 10 calls: reasoning 4, summaries 2, the groups 4; fewer when rows stop early).
    procs = _launch_two(config, str(two), str(tmp_path), "stopped", fault_for_1="generate:chunk:13/TERM")
    codes = _wait_all(procs)
    assert codes[0] == codes[1] != 0, (codes, _tails(procs))
    logs = _logs(procs)
    stopped = {_preempted_step(log) for log in logs}
    assert len(stopped) == 1, stopped  # both processes stopped in the same step's generation
    step = stopped.pop()
    assert 1 < step <= STEPS, step
    delay = [float(x) for x in re.findall(r"stopped generating .* ([0-9.]+) s after the stop request", logs[1])]
    assert delay and delay[0] < STOP_S, logs[1][-3000:]
    assert Checkpointer(str(two / "grpo" / "checkpoints")).latest_step() == step - 1  # the last finished step
    assert [r["step"] for r in read_metrics(str(two), "grpo") if "loss" in r] == list(range(1, step))

    procs = _launch_two(config, str(two), str(tmp_path), "resumed")
    assert _wait_all(procs) == [0, 0], _tails(procs)
    assert f"resuming from the checkpoint of step {step - 1}" in _logs(procs)[0]
    assert launch.main(["--config", config, f"run.dir={one}"]) == 0  # this process: 8 devices

    rows = _assert_parity(two, one)
    assert all(r["kl_ref"] > 0 for r in rows[1:])  # the reference logprobs reached the loss
    assert all(r["summaries_attempted"] > 0 for r in rows)  # the RC summariser generated on both processes
    # The eval stage: process 0 wrote the records; every response and grade is the one process's.
    samples = [[json.loads(x) for x in open(d / "eval" / "grpo" / "samples.jsonl")] for d in (two, one)]
    key = lambda r: (r["key"], r["response"], r["score"])  # noqa: E731
    assert sorted(map(key, samples[0])) == sorted(map(key, samples[1])) and len(samples[0]) == 8
    assert json.loads((two / "summary.json").read_text())["stages"] == json.loads(
        (one / "summary.json").read_text())["stages"]


@pytest.mark.slow
def test_grpo_with_a_rollout_worker_on_two_processes_like_one_with_a_sigterm_while_waiting(tmp_path,
                                                                                          toy_tokenizer_dir):
    data = toy.write_data(toy.ToyConfig(sft_rows=1, rl_problems=16, eval_problems=1), str(tmp_path / "data"))
    worker_env = _child_env(1)

    def config(name):
        raw = {"run": {"dir": str(tmp_path / name), "seed": 0, "stages": ["grpo"], "mesh": "fsdp=8",
                       "deterministic": True},
               "model": {"preset": "tiny", "tokenizer": toy_tokenizer_dir},
               "engine": {"kind": "workers", "store": str(tmp_path / name / "weights"),
                          "queue": str(tmp_path / name / "queue")},
               "grpo": _grpo({"problems": {"path": data["rl"], "format": "rules"}})}
        return _write(tmp_path, name, raw), raw

    def start_worker(raw, tag, *extra):
        log = open(tmp_path / f"{tag}_worker.log", "w")
        return subprocess.Popen([sys.executable, "-m", "qedjax.rollout.worker", "--engine", "jax",
                                 "--store", raw["engine"]["store"], "--queue", raw["engine"]["queue"],
                                 "--tokenizer", toy_tokenizer_dir, "--poll-s", "0.05", "--worker-id", tag, *extra],
                                env=worker_env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    two_config, two_raw = config("two")
    one_config, one_raw = config("one")
    two, one = tmp_path / "two", tmp_path / "one"
    ckpt_dir = str(two / "grpo" / "checkpoints")

    # A worker that serves one step and exits: the trainer then waits for step 2's rollouts.
    worker = start_worker(two_raw, "first", "--max-items", "1")
    procs = _launch_two(two_config, str(two), str(tmp_path), "waiting")
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (worker.poll() is not None and os.path.isdir(os.path.join(ckpt_dir, "1"))
                   and Checkpointer(ckpt_dir).latest_step() == 1):
            assert time.monotonic() < deadline and all(p.poll() is None for p, _ in procs), _tails(procs)
            time.sleep(0.5)
        time.sleep(2)  # well into the wait
        sent = time.monotonic()
        procs[1][0].send_signal(signal.SIGTERM)
        codes = _wait_all(procs, timeout=STOP_S)
        took = time.monotonic() - sent
    finally:
        if worker.poll() is None:
            worker.kill()
    assert codes[0] == codes[1] != 0 and took < STOP_S, (codes, took, _tails(procs))
    assert {_preempted_step(log) for log in _logs(procs)} == {2}
    assert Checkpointer(ckpt_dir).latest_step() == 1

    for run_config, raw, run_dir, tag in ((two_config, two_raw, two, "two"), (one_config, one_raw, one, "one")):
        worker = start_worker(raw, tag)
        try:
            if tag == "two":
                procs = _launch_two(run_config, str(run_dir), str(tmp_path), "resumed")
                assert _wait_all(procs) == [0, 0], _tails(procs)
                assert "resuming from the checkpoint of step 1" in _logs(procs)[0]
            else:
                assert launch.main(["--config", run_config]) == 0  # this process: 8 devices
            assert worker.wait(timeout=TIMEOUT_S) == 0  # the finished stage closed the queue
        finally:
            if worker.poll() is None:
                worker.kill()
    _assert_parity(two, one)


# Each of the two processes (argv: model dir, coordinator, process id) loads the checkpoint into the
# fsdp=8 training layout, checks its own shards against the whole tensors, and prints what it read.
LOAD_SCRIPT = """
import json, sys
import jax
jax.distributed.initialize(sys.argv[2], 2, int(sys.argv[3]))
import numpy as np
from qedjax import convert, sharding
from qedjax.safetensors_io import SafetensorsFile
mesh = sharding.make_mesh("fsdp=8")
_, abstract = convert.abstract_model(convert.read_config(sys.argv[1]))
stats = {}
config, _, params = convert.load_params(sys.argv[1], shardings=sharding.state_shardings(abstract, mesh,
                                        sharding.TRAIN_RULES), stats=stats)
f = SafetensorsFile(sys.argv[1] + "/model.safetensors")
for key in convert.key_table(config):
    x = convert._get(params, key.path)
    whole = convert.to_ours(f.get(key.hf), key.layout, x.shape)
    for shard in x.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), whole[shard.index], err_msg=key.hf)
replicated = sum(f.get(k.hf).nbytes for k in convert.key_table(config)
                 if convert._get(params, k.path).sharding.is_fully_replicated)
print("LOADED " + json.dumps({**stats, "replicated": replicated}))
"""


@pytest.mark.slow
def test_two_processes_each_read_only_the_checkpoint_bytes_their_devices_hold(tmp_path):
    from flax import nnx

    from qedjax import convert
    from qedjax.models.qwen3 import Qwen3, Qwen3Config

    model = Qwen3(Qwen3Config.preset("tiny"), rngs=nnx.Rngs(0))
    convert.save_hf(model, tmp_path / "hf")
    port = _free_port()
    procs = []
    for i in range(2):
        log = str(tmp_path / f"load_p{i}.log")
        with open(log, "w") as f:
            procs.append((subprocess.Popen([sys.executable, "-c", LOAD_SCRIPT, str(tmp_path / "hf"),
                                            f"127.0.0.1:{port}", str(i)], env=_child_env(4), cwd=ROOT,
                                           stdout=f, stderr=subprocess.STDOUT), log))
    assert _wait_all(procs) == [0, 0], _tails(procs)
    read = [json.loads(re.search(r"LOADED (.*)", log).group(1)) for log in _logs(procs)]
    total, replicated = read[0]["bytes_total"], read[0]["replicated"]
    assert total == sum(np.asarray(x).nbytes for x in jax_leaves(model))
    # Sharded tensors: each process read its half; replicated ones (the q/k norms): both read all.
    assert read[0]["bytes_read"] + read[1]["bytes_read"] == total + replicated
    assert all(r["bytes_read"] == (total - replicated) // 2 + replicated for r in read), read
    assert replicated < 0.01 * total


def jax_leaves(model):
    import jax
    from flax import nnx

    return jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
