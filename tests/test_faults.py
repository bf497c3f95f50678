"""Crash drills: real `python -m qedjax.launch` processes SIGKILLed at chosen points (mid-step, mid
asynchronous save; qedjax.checkpoint.fault_point) and re-run with the same command must end exactly
where an uninterrupted run ends: the same parameters and the same metrics.jsonl, byte for byte.
A corrupt or truncated checkpoint is named and skipped, never restored."""

import os
import shutil
import signal
import sys

import jax
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


def _params(config, run_dir, stage):
    cfg = load_config(str(config))
    _, _, target = train.abstract_params(cfg.model, sharding.make_mesh(cfg.run.mesh), sharding.TRAIN_RULES)
    return jax.device_get(restore_params(os.path.join(run_dir, stage, "checkpoints"), target))


def _assert_same_params(a, b):
    jax.tree.map(lambda x, y: __import__("numpy").testing.assert_array_equal(x, y), a, b)


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
    steps = [r["step"] for r in map(__import__("json").loads, _metrics(killed).splitlines())]
    assert steps == [0, 1, 2]  # the start row and steps 1-2: step 3 died before its row
    assert fault_drill.run_launch(command, log, fault="sft:save:4", env=env, timeout=TIMEOUT_S) == KILLED
    ckpt_dir = killed / "sft" / "checkpoints"
    half = [p for p in os.listdir(ckpt_dir) if p.startswith("4") and p != "4"]
    assert half and not (ckpt_dir / "4").exists(), os.listdir(ckpt_dir)  # step 4 half written
    assert Checkpointer(str(ckpt_dir)).latest_step() == 2  # ... and not taken for a checkpoint
    assert fault_drill.run_launch(command, log, env=env, timeout=TIMEOUT_S) == 0
    assert _metrics(killed) == _metrics(straight)
    _assert_same_params(_params(config, killed, "sft"), _params(config, straight, "sft"))
