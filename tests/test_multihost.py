"""Two processes of 4 CPU devices each, joined by jax.distributed (gloo collectives over 127.0.0.1),
train exactly like one process of 8 devices: same logged losses, and their checkpoints restore in a
single process to the same parameters. Only process 0 writes the logs; every process writes its
own checkpoint shards. The two processes then export the checkpoint together (each parameter is
gathered across them) into a directory transformers loads."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import transformers
import yaml

from qedjax import launch, sharding, toy, train
from qedjax.checkpoint import restore_params
from qedjax.config import load_config
from qedjax.metrics import read_metrics

import parity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 1200  # a hang guard, far above the ~1 min these runs take on a quiet machine
# Until the launcher has an export stage, the two export processes run this (argv: config, run dir,
# out dir, coordinator, process id).
EXPORT_SCRIPT = """
import sys
import jax
jax.distributed.initialize(sys.argv[4], 2, int(sys.argv[5]))
from qedjax import export, sharding
from qedjax.config import load_config
cfg = load_config(sys.argv[1], [f"run.dir={sys.argv[2]}"])
export.run(cfg, sharding.make_mesh(cfg.run.mesh), sys.argv[2], out=sys.argv[3], tokenizer_path=cfg.model.tokenizer)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(devices: int) -> dict:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",  # jax's default on CPU today; said for clarity
               JAX_DEFAULT_MATMUL_PRECISION="highest",  # as conftest sets it for the reference run
               JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")])))
    return env


def _run_processes(commands, env, logs_dir, timeout=TIMEOUT_S):
    """Starts every command at once; all must exit 0 before the deadline, else all are killed."""
    procs, logs = [], []
    try:
        for i, cmd in enumerate(commands):
            log = open(os.path.join(logs_dir, f"process_{i}.log"), "w")
            logs.append(log)
            procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for log in logs:
            log.close()
    codes = [p.returncode for p in procs]
    if codes != [0] * len(procs):
        tails = []
        for i in range(len(procs)):
            with open(os.path.join(logs_dir, f"process_{i}.log")) as f:
                tails.append(f"--- process {i} (exit {codes[i]}) ---\n" + f.read()[-3000:])
        pytest.fail("multi-process run failed or timed out:\n" + "\n".join(tails))


def _losses(run_dir):
    rows = [r for r in read_metrics(run_dir, "sft") if "loss" in r]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"steps logged more than once: {steps}"  # one writer only
    return steps, np.array([r["loss"] for r in rows])


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, toy_tokenizer_dir):
    data = toy.write_data(toy.ToyConfig(sft_rows=64, rl_problems=1, eval_problems=1), str(tmp_path / "data"))
    # a bad row at line 4: process 1 checks it (process p checks rows p, p + 2, ...), and both skip it
    lines = open(data["sft"]).read().splitlines(keepends=True)
    with open(data["sft"], "w") as f:
        f.writelines(lines[:3] + ['{"problem": "no proof"}\n'] + lines[3:])
    raw = {"run": {"dir": str(tmp_path / "unused"), "seed": 2, "mesh": "fsdp=8", "deterministic": True},
           "model": {"preset": "tiny", "tokenizer": toy_tokenizer_dir},
           "sft": {"global_batch": 8, "steps": 4, "data": {"path": data["sft"], "seq_len": 96, "bad_rows": "skip"},
                   "optim": {"lr": 3e-3, "warmup_ratio": 0.0},
                   "checkpoint": {"every": 2, "keep": 2}}}  # async saves, as in real runs
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump(raw))
    two, one = tmp_path / "two", tmp_path / "one"

    port = _free_port()
    _run_processes([[sys.executable, "-m", "qedjax.launch", "--config", str(config), f"run.dir={two}",
                     "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)]
                    for i in range(2)], _child_env(4), str(tmp_path))
    assert launch.main(["--config", str(config), f"run.dir={one}"]) == 0  # this process: 8 devices

    for i in range(2):  # each process reports the row only process 1 checked, by file and line
        log = (tmp_path / f"process_{i}.log").read_text()
        assert f"skipped 1 bad row(s) (data.bad_rows=skip); first: {data['sft']}:4: missing column 'proof'" in log
    steps_two, losses_two = _losses(two)
    steps_one, losses_one = _losses(one)
    assert steps_two == steps_one == [1, 2, 3, 4]
    np.testing.assert_allclose(losses_two, losses_one, rtol=1e-5, atol=0)
    info = json.loads((two / "run_info.json").read_text())
    assert info["devices"]["processes"] == 2 and info["devices"]["count"] == 8
    assert info["devices"]["local_count"] == 4

    # Each process wrote its own shards of the parameters (OCDBT keeps one store per process).
    params_dir = two / "sft" / "checkpoints" / "4" / "params"
    assert {p for p in os.listdir(params_dir) if p.startswith("ocdbt.process_")} >= {
        "ocdbt.process_0", "ocdbt.process_1"}
    cfg = load_config(str(config))
    _, _, target = train.abstract_params(cfg.model, sharding.make_mesh("fsdp=8"), sharding.TRAIN_RULES)
    got = jax.device_get(restore_params(str(two / "sft" / "checkpoints"), target))
    want = jax.device_get(restore_params(str(one / "sft" / "checkpoints"), target))
    # gloo's all-reduce sums in another order than one process does: AdamW may drift by its bound.
    parity.assert_params_within(got, want, parity.adam_drift_bound([3e-3] * 4))

    port = _free_port()
    _run_processes([[sys.executable, "-c", EXPORT_SCRIPT, str(config), str(two), str(tmp_path / "hf"),
                     f"127.0.0.1:{port}", str(i)] for i in range(2)], _child_env(4), str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    hf_params = {n: p.detach().numpy() for n, p in hf.named_parameters()}
    np.testing.assert_array_equal(hf_params["model.embed_tokens.weight"], got["embed_tokens"])
    np.testing.assert_array_equal(hf_params["model.layers.1.mlp.down_proj.weight"],
                                  got["layers"][1]["mlp"]["down_proj"])
