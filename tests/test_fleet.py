"""The rollout fleet across machines, rehearsed on one: a GRPO run whose weight store, work queue and
checkpoints are gs:// URLs on a Cloud Storage emulator (tests/gcs.py), the trainer a separate process
(`python -m qedjax.launch`, TRAINER_PROCESSES of them), and two rollout-worker processes given nothing
but the store's URL: one on vLLM's CPU build, one on the JAX sampler, which SIGKILLs itself while it
holds an item of a step; the trainer gives that item to the other and the run finishes every step."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from qedjax.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINER_PROCESSES = 2  # the trainer as this many jax.distributed processes (each with 8 / N CPU devices)
TIMEOUT_S = 1500  # a hang guard, not under test

pytestmark = [pytest.mark.vllm, pytest.mark.xdist_group("vllm"), pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(gcs, **extra) -> dict:
    env = {**os.environ, **gcs.env(), **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    env.pop("QEDJAX_FAULT", None)
    env.update(extra)
    return env


def _trainer(config: str, n: int, env: dict, logs: str) -> list[subprocess.Popen]:
    """The trainer: one process, or n jax.distributed processes on 8 / n CPU devices each."""
    command = [sys.executable, "-m", "qedjax.launch", "--config", config]
    if n == 1:
        return [subprocess.Popen(command, env=env, cwd=ROOT, stdout=open(f"{logs}/trainer0.log", "w"),
                                 stderr=subprocess.STDOUT)]
    port = _free_port()
    env = {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // n}"}
    return [subprocess.Popen(command + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
                                        "--process-id", str(i)], env=env, cwd=ROOT,
                             stdout=open(f"{logs}/trainer{i}.log", "w"), stderr=subprocess.STDOUT) for i in range(n)]


def test_grpo_on_gs_with_a_vllm_and_a_jax_worker_one_killed_mid_step(tmp_path, gcs):
    from test_vllm import need_vllm

    from qedjax.checkpoint import Checkpointer
    from qedjax.rollout.queue import WorkQueue
    from qedjax.rollout.weights import WeightStore

    need_vllm()
    bucket = f"{gcs.bucket()}/run"
    steps = 3
    raw = {
        "run": {"dir": str(tmp_path / "run"), "seed": 0, "stages": ["grpo"], "checkpoint_dir": f"{bucket}/ckpt"},
        "model": {"preset": "demo"},  # vLLM's CPU attention needs head_dim >= 32 (the demo model's)
        "toy": {"sft_rows": 8, "rl_problems": 16, "eval_problems": 2},
        "engine": {"kind": "workers", "store": f"{bucket}/weights", "queue": f"{bucket}/queue",
                   "summarizer_store": f"{bucket}/summarizer", "problems_per_item": 1, "max_model_len": 512,
                   "heartbeat_s": 0.5, "worker_timeout_s": 10},
        "grpo": {"init": "model", "steps": steps, "problems_per_step": 2, "group_size": 4, "mode": "sync",
                 "max_lag": 0, "skip_zero_variance": False,  # a random policy scores 0: train anyway, new versions
                 "rc": {"enabled": True, "turns": 1, "states_per_problem": 2, "summary_max_new_tokens": 8,
                        "summarizer": "frozen"},  # a second vLLM engine in the worker, on its own store
                 "sampling": {"max_new_tokens": 12, "temperature": 1.0, "seed": 0},
                 "loss": {"clip_low": 0.2, "clip_high": 0.28},
                 "optim": {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0},
                 "checkpoint": {"every": 1, "keep": 1, "async_save": False}},
    }
    config = tmp_path / "fleet.yaml"
    config.write_text(yaml.safe_dump(raw))
    worker = [sys.executable, "-m", "qedjax.rollout.worker", "--store", f"{bucket}/weights", "--poll-s", "0.2"]
    logs = {w: open(tmp_path / f"{w}.log", "w+") for w in ("vllm", "jax")}
    procs = {  # their own sessions: SIGKILL to the group takes vLLM's engine-core and worker processes too
        "vllm": subprocess.Popen(worker + ["--worker-id", "vllm", "--engine", "vllm", "--max-num-seqs", "16",
                                           "--vllm-arg", f"kv_cache_memory_bytes={64 * 2**20}",
                                           "--summarizer-vllm-arg", f"kv_cache_memory_bytes={32 * 2**20}"],
                                 env=_env(gcs), stdout=logs["vllm"], stderr=subprocess.STDOUT, start_new_session=True),
        # killed (by its own crash drill) when it holds its second item
        "jax": subprocess.Popen(worker + ["--worker-id", "jax", "--engine", "jax"], env=_env(gcs, QEDJAX_FAULT="worker:item:2"),
                                stdout=logs["jax"], stderr=subprocess.STDOUT, start_new_session=True),
    }
    trainers = _trainer(str(config), TRAINER_PROCESSES, _env(gcs), str(tmp_path))
    try:
        codes = [t.wait(TIMEOUT_S) for t in trainers]
        assert codes == [0] * TRAINER_PROCESSES, [open(tmp_path / f"trainer{i}.log").read()[-3000:]
                                                 for i in range(TRAINER_PROCESSES)]
        assert procs["jax"].wait(60) == -signal.SIGKILL  # it died holding an item
        assert procs["vllm"].wait(120) == 0  # the closed queue sent it home
    finally:
        for p in list(procs.values()) + trainers:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL) if p in procs.values() else p.kill()
                p.wait(30)
    text = {w: open(tmp_path / f"{w}.log").read() for w in logs}
    assert "rollouts at version" in text["jax"] and "rollouts at version" in text["vllm"]
    assert "built the RC summariser" in text["vllm"]
    rows = [r for r in read_metrics(str(tmp_path / "run"), "grpo") if "reward_mean" in r]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # no step lost, none made twice
    assert all(sum(r["score_hist"]) == 2 * 2 * 4 and r["lag_max"] == 0 for r in rows)
    shares = [{k[len("rollout_share/"):]: v for k, v in r.items() if k.startswith("rollout_share/")} for r in rows]
    assert all(abs(sum(s.values()) - 1) < 1e-9 and set(s) <= {"vllm", "jax"} for s in shares), shares
    assert shares[-1] == {"vllm": 1.0}  # after the kill, the vLLM worker made everything
    assert any("jax" in s for s in shares)  # and before it, the JAX worker made its first item
    # Behaviour logprobs from vLLM and the JAX sampler, trainer logprobs from the JAX model on the same
    # fp32 weights: they differ by rounding only (~1e-6 a token; the vLLM tests bound a token by 1e-4).
    assert all(r["logprob_gap"] < 1e-4 for r in rows), [r["logprob_gap"] for r in rows]
    # Everything the run kept is in the bucket: checkpoints, weight versions (in the engine dtype), the queue.
    assert Checkpointer(f"{bucket}/ckpt/grpo/checkpoints").latest_step() == steps
    store = WeightStore(f"{bucket}/weights")
    assert store.versions() and store.manifest(store.latest())["dtype"] == "float32"
    queue = WorkQueue(f"{bucket}/queue")
    assert queue.counts() == {"items": 0, "assigned": 0, "done": 0} and queue.closed
