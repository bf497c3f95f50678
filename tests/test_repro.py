"""Reproducibility of a run: the same seed gives byte-identical metrics in deterministic mode, a run
directory records how it was made, and tools/compare_runs.py tells identical runs from different ones."""

import json
import os
import sys

import pytest
import yaml

from qedjax import launch, toy
from qedjax.config import load_config
from qedjax.config_io import config_hash

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
import compare_runs  # noqa: E402


@pytest.fixture(scope="module")
def sft_yaml(tmp_path_factory, toy_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("repro")
    data = toy.write_data(toy.ToyConfig(sft_rows=64, rl_problems=1, eval_problems=1), str(tmp / "data"))
    raw = {"run": {"dir": str(tmp / "unused"), "seed": 0, "mesh": "data=2,fsdp=4", "deterministic": True},
           "model": {"preset": "tiny", "tokenizer": toy_tokenizer_dir},
           "sft": {"global_batch": 8, "steps": 4, "data": {"path": data["sft"], "seq_len": 96},
                   "optim": {"lr": 3e-3, "warmup_ratio": 0.25},
                   "checkpoint": {"every": 4, "keep": 1, "async_save": False}}}
    path = tmp / "sft.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path), tmp


def _launch(config, run_dir, *overrides):
    assert launch.main(["--config", config, f"run.dir={run_dir}", *overrides]) == 0
    return str(run_dir)


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), "rb") as f:
        return f.read()


def test_same_seed_same_bytes_and_run_info(sft_yaml, capsys):
    config, tmp = sft_yaml
    a = _launch(config, tmp / "a")
    b = _launch(config, tmp / "b")
    c = _launch(config, tmp / "c", "run.seed=1")

    assert _metrics(a) == _metrics(b)
    rows = [json.loads(line) for line in _metrics(a).splitlines()]
    assert [r["step"] for r in rows if r["stage"] == "sft" and "loss" in r] == [1, 2, 3, 4]
    assert not any(k.endswith("_s") or "time" in k for r in rows for k in r)  # timings stay out

    info = json.loads(open(os.path.join(a, "run_info.json")).read())
    assert info["config_hash"] == config_hash(load_config(config, [f"run.dir={a}"]))
    assert info["config_hash"] != json.loads(open(os.path.join(c, "run_info.json")).read())["config_hash"]
    assert {"commit", "dirty"} <= info["git"].keys() and info["packages"]["jax"]
    assert info["devices"]["count"] == 8 and info["devices"]["kind"] and info["devices"]["processes"] == 1
    assert info["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and info["seed"] == 0
    saved = yaml.safe_load(open(os.path.join(a, "config.yaml")))
    assert saved["run"]["seed"] == 0 and saved["sft"]["steps"] == 4  # the resolved config, defaults included
    assert saved["sft"]["data"]["seq_len"] == 96 and "lr" in saved["sft"]["optim"]

    capsys.readouterr()
    assert compare_runs.main([a, b]) == 0
    assert "identical on non-timing keys: yes" in capsys.readouterr().out
    assert compare_runs.main([a, c]) == 1  # another seed: another initialisation and data order
    out = capsys.readouterr().out
    assert "[sft] loss:" in out and "differs" in out and "seed" in out
    assert compare_runs.main([a, str(tmp / "nowhere")]) == 2


def test_compare_records_by_kind(capsys):
    a = {("sft", 1, None, 0): {"loss": 1.0, "hist": [1, 2], "note": "x", "step_time_s": 1.0},
         ("sft", 2, None, 0): {"loss": 0.5}}
    b = {("sft", 1, None, 0): {"loss": 1.25, "hist": [1, 3], "note": "x", "step_time_s": 2.0, "extra": 1}}
    got = {(r["step"], r["key"]): (r["status"], r["diff"]) for r in compare_runs.compare(a, b)}
    assert got[(1, "loss")] == ("differs", 0.25)
    assert got[(1, "hist")] == ("differs", 1.0)
    assert got[(1, "note")] == ("equal", 0.0)
    assert got[(1, "step_time_s")] == ("differs", 1.0)
    assert got[(1, "extra")] == ("missing in A", None)
    assert got[(2, None)] == ("missing in B", None)
    assert compare_runs.compare(a, b, atol=0.3)[2]["status"] == "equal"  # |1.0 - 1.25| <= 0.3
    # Timings (and rows of them missing in a deterministic run) are reported but never count.
    timed = {("sft", 1, None, 0): {"loss": 1.0, "step_time_s": 3.0, "tokens_per_s": 9.0}}
    assert compare_runs.report("A", "B", compare_runs.compare({("sft", 1, None, 0): {"loss": 1.0}}, timed))
    assert "tokens_per_s" in capsys.readouterr().out
    assert not compare_runs.report("A", "B", compare_runs.compare(a, b))
    assert compare_runs.difference("nan", "nan") == 0.0 and compare_runs.difference([1], [1, 2]) == float("inf")
