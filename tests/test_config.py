"""Config loading: every shipped config parses; mistakes fail early with the key named."""

import glob
import os

import pytest

from qedjax import launch
from qedjax.config import load_config
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
    with pytest.raises(FileNotFoundError, match="model.hf_path: 'nowhere' is not a directory"):
        launch.main(["--config", tiny, "model.hf_path=nowhere", f"run.dir={tmp_path}"])
    with pytest.raises(ValueError, match="stage 'grpo' is selected but the config has no 'grpo' section"):
        launch.main(["--config", os.path.join(ROOT, "configs/qwen3-0.6b-sft.yaml"), "--stage", "grpo",
                     f"run.dir={tmp_path}"])
