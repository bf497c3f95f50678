"""Config loading: every shipped config parses; mistakes fail early with the key named."""

import dataclasses
import glob
import os
import re
import sys
import types
import typing

import pytest

from qedjax import launch
from qedjax.config import PATH_KEYS, Config, load_config
from qedjax.config_io import config_hash

ROOT = os.path.dirname(os.path.dirname(__file__))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.run.dir


def test_overrides_and_types(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs/tiny.yaml"),
                      ["sft.steps=4", "sft.optim.lr=3e-3", "run.dir=/tmp/x", "grpo.rc.turns=1"])
    assert (cfg.sft.steps, cfg.sft.optim.lr, cfg.run.dir, cfg.grpo.rc.turns) == (4, 3e-3, "/tmp/x", 1)
    assert config_hash(cfg) != config_hash(load_config(os.path.join(ROOT, "configs/tiny.yaml")))
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['sft.optim.learning_rate'\]"):
        load_config(os.path.join(ROOT, "configs/tiny.yaml"), ["sft.optim.learning_rate=1"])
    with pytest.raises(ValueError, match=r"config key sft.steps: expected an integer, got 'many'"):
        load_config(os.path.join(ROOT, "configs/tiny.yaml"), ["sft.steps=many"])
    with pytest.raises(ValueError, match="optim.schedule must be one of"):
        load_config(os.path.join(ROOT, "configs/tiny.yaml"), ["sft.optim.schedule=linear"])
    with pytest.raises(ValueError, match="run.stages: unknown stage"):
        load_config(None, ["run.stages=[pretrain]"])
    with pytest.raises(ValueError, match="model.attention_block must be >= 0, got -1"):
        load_config(None, ["model.attention_block=-1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [1, 2\n")
    with pytest.raises(ValueError, match="invalid YAML"):
        load_config(str(bad))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_launch_fails_before_compiling(tmp_path, monkeypatch):
    def no_compile(*args, **kwargs):
        raise AssertionError("compiled something before the config was checked")

    monkeypatch.setattr("qedjax.train.make_train_step", no_compile)
    tiny = os.path.join(ROOT, "configs/tiny.yaml")
    with pytest.raises(ValueError, match="needs 3 devices, but 8 are available"):
        launch.main(["--config", tiny, "--mesh", "data=3", f"run.dir={tmp_path}"])
    with pytest.raises(ValueError, match="not divisible by the 8 batch shards"):
        launch.main(["--config", tiny, "--mesh", "data=8", "sft.global_batch=12", "sft.micro_batches=3",
                     f"run.dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="model.hf_path: '/.*/nowhere' is not a directory"):
        launch.main(["--config", tiny, "model.hf_path=nowhere", f"run.dir={tmp_path}"])
    with pytest.raises(ValueError, match="stage 'grpo' is selected but the config has no 'grpo' section"):
        launch.main(["--config", os.path.join(ROOT, "configs/qwen3-0.6b-sft.yaml"), "--stage", "grpo",
                     f"run.dir={tmp_path}"])


def test_eval_configs_select_their_stage_and_a_missing_file_ends_the_command_cleanly(tmp_path, monkeypatch, capsys):
    """The shipped eval configs run the eval stage alone; a benchmark file that is not there stops the
    command line with one message naming the key, before any model or engine loads."""
    for name in ("eval-imo-proofbench.yaml", "eval-imo-answerbench.yaml"):
        assert load_config(os.path.join(ROOT, "configs", name)).run.stages == ("eval",)
    monkeypatch.setattr("qedjax.sft.load_tokenizer", lambda *a: (_ for _ in ()).throw(AssertionError("loaded")))
    monkeypatch.setattr(sys, "argv", ["qedjax.launch", "--config", os.path.join(ROOT, "configs/eval-imo-answerbench.yaml"),
                                      f"model.hf_path={tmp_path}", f"eval.benchmark.path={tmp_path}/gone.csv",
                                      f"run.dir={tmp_path}/run"])
    with pytest.raises(SystemExit, match=r"^qedjax.launch: eval.benchmark.path: benchmark file '.*gone.csv' does not exist$"):
        launch.cli()


def test_local_paths_become_absolute_and_urls_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(os.path.join(ROOT, "configs/tiny.yaml"),
                      ["engine.store=gs://bucket/weights", "export.out=~/hf", "grpo.init=sft",
                       "judge.cache_dir=cache", "sft.data.path=data/sft.jsonl"])
    assert cfg.run.dir == str(tmp_path / "runs" / "tiny")  # the shipped relative default
    assert cfg.sft.data.path == str(tmp_path / "data" / "sft.jsonl")
    assert cfg.judge.cache_dir == str(tmp_path / "cache")
    assert cfg.export.out == os.path.expanduser("~/hf")
    assert cfg.engine.store == "gs://bucket/weights" and cfg.grpo.init == "sft"
    assert cfg.run.checkpoint_dir is None  # unset stays unset (defaults follow run.dir)
    assert load_config(None, ["grpo.init=ckpt/sft"]).grpo.init == str(tmp_path / "ckpt" / "sft")


def _fields(cls, prefix=""):
    """(dotted key, type) of every leaf field under a config dataclass."""
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        inner = [a for a in args if dataclasses.is_dataclass(a)]
        if inner:
            yield from _fields(inner[0], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp


def test_every_path_like_key_is_resolved():
    looks_like_a_path = re.compile(r"(^|_)(path|dir|store|queue|out|checkpoint|tokenizer|init|summarizer)$")
    keys = {key for key, tp in _fields(Config) if str in (typing.get_args(tp) or (tp,))
            and looks_like_a_path.search(key.rsplit(".", 1)[-1])}
    assert keys == set(PATH_KEYS)


def test_logging_names_the_process_and_is_quiet_beyond_process_0(monkeypatch, capsys):
    """The launcher's logging: qedjax's INFO lines shown on process 0 with the process in the prefix,
    other libraries' INFO dropped; on another process only warnings and errors."""
    import logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("qedjax").level
    try:
        for index, shown in ((0, {"info", "warning"}), (1, {"warning"})):
            monkeypatch.setattr("jax.process_index", lambda: index)
            launch.setup_logging("INFO")
            logging.getLogger("qedjax.eval.run").info("info")
            logging.getLogger("qedjax.judge").warning("warning")
            logging.getLogger("orbax").info("orbax")
            lines = capsys.readouterr().err.splitlines()
            assert {line.rsplit(" ", 1)[-1] for line in lines} == shown
            assert all(f"[qedjax p{index}]" in line for line in lines)
    finally:
        root.handlers[:], _, _ = saved
        root.setLevel(saved[1])
        logging.getLogger("qedjax").setLevel(saved[2])
