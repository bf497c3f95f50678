"""Run configuration: frozen dataclasses per concern, loaded from YAML with dotted overrides.

Each concern's dataclass lives next to the code that reads it (DataConfig in data.py, OptimConfig
in optim.py, ...); `Config` composes them. Loading is strict: an unknown key, a wrong type or a bad
value is an error naming the dotted key, raised before anything compiles.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import yaml

from qedjax.checkpoint import CheckpointConfig
from qedjax.config_io import build
from qedjax.data import DataConfig
from qedjax.eval.run import EvalConfig
from qedjax.export import ExportConfig
from qedjax.judge import JudgeConfig
from qedjax.models.qwen3 import ATTENTION_KINDS, DTYPES, PRESETS
from qedjax.optim import OptimConfig
from qedjax.pipeline import TARGETS, EngineConfig
from qedjax.rollout.groups import GRPOConfig
from qedjax.toy import ToyConfig

STAGES = ("sft", "grpo", "eval", "export")

# Every config key that names a local file or directory. load_config makes them absolute, relative to
# the working directory at launch, so no later step sees a relative path (Orbax refuses them; rollout
# workers and child processes may run elsewhere). URLs (gs://, s3://) stay as written; the values in
# VERBATIM are keywords, not paths. tests/test_config.py checks that no path-like key is missing.
PATH_KEYS = ("run.dir", "run.checkpoint_dir", "model.hf_path", "model.tokenizer", "engine.store", "engine.queue",
             "engine.summarizer_store", "judge.cache_dir", "sft.data.path", "grpo.problems.path", "grpo.init",
             "eval.benchmark.path", "export.checkpoint", "export.out", "grpo.rc.summarizer", "eval.rc.summarizer")
VERBATIM = {"grpo.init": ("sft", "model"), "grpo.rc.summarizer": ("policy", "frozen", *PRESETS),
            "eval.rc.summarizer": ("policy", "frozen", *PRESETS)}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"  # logs, metrics, config: a local or shared-filesystem path
    checkpoint_dir: str | None = None  # stage checkpoints go under here (gs:// works); default: run.dir
    seed: int = 0
    stages: tuple[str, ...] = ("sft",)  # run in this order by `python -m qedjax.launch`
    mesh: str = ""  # "data=D,fsdp=F,tensor=T"; empty: all devices on data (--mesh overrides)
    deterministic: bool = False  # keep timings out of metrics.jsonl (identical files for a seed)
    eval_targets: tuple[str, ...] = ("final",)  # what the eval stage evaluates: base | sft | grpo | final

    def __post_init__(self):
        if "://" in self.dir:
            raise ValueError(f"run.dir {self.dir!r} must be a local or shared-filesystem path (metrics, logs and "
                             f"TensorBoard are written with local file APIs); put checkpoints on GCS with "
                             f"run.checkpoint_dir=gs://...")
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ValueError(f"run.stages: unknown stage(s) {bad}; known: {STAGES}")
        bad = [t for t in self.eval_targets if t not in TARGETS]
        if bad:
            raise ValueError(f"run.eval_targets: unknown target(s) {bad}; known: {TARGETS}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    preset: str | None = "tiny"  # a qedjax.models.qwen3 preset, used when hf_path is not set
    hf_path: str | None = None  # a local Hugging Face checkpoint to start from
    tokenizer: str | None = None  # a HF tokenizer dir (default: hf_path; the toy builds its own)
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: bool = False
    # rows longer than this many tokens take the blockwise (flash) attention, in query/key blocks of
    # up to this size; shorter rows attend densely; 0: dense attention only
    attention_block: int = 512
    # auto: the platform's kernel (splash on TPU, cuDNN on GPU, the XLA path on CPU); or xla | splash | cudnn
    attention: str = "auto"

    def __post_init__(self):
        if self.attention_block < 0:
            raise ValueError(f"model.attention_block must be >= 0, got {self.attention_block}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"model.attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.hf_path is None and self.preset not in PRESETS:
            raise ValueError(f"model.preset {self.preset!r} is not a preset ({sorted(PRESETS)}); "
                             f"set model.hf_path to load a checkpoint instead")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"model.{name} must be one of {DTYPES}, got {getattr(self, name)!r}")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    epochs: float = 1.0
    steps: int | None = None  # default: epochs x (packed rows / global_batch)
    global_batch: int = 8  # packed rows per optimizer step
    micro_batches: int = 1  # gradient accumulation inside the step
    max_bad_steps: int = 3  # consecutive non-finite steps before the run stops (with a checkpoint)
    log_every: int = 1

    def __post_init__(self):
        if self.global_batch < 1 or self.micro_batches < 1 or self.global_batch % self.micro_batches:
            raise ValueError(f"sft.global_batch ({self.global_batch}) must be a positive multiple of "
                             f"sft.micro_batches ({self.micro_batches})")


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole run. A stage's section must be present for the stage to run."""

    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    engine: EngineConfig = EngineConfig()  # the rollout engine of the grpo and eval stages
    judge: JudgeConfig | None = None  # the judge endpoint, for stages whose grader is "judge"
    toy: ToyConfig | None = None  # generate the demo's tokenizer and data into the run dir
    sft: SFTConfig | None = None
    grpo: GRPOConfig | None = None
    eval: EvalConfig | None = None
    export: ExportConfig = ExportConfig()  # export needs no section: every option has a default


def apply_override(raw: dict, override: str) -> None:
    """`a.b.c=value` (value parsed as YAML) into the raw config dict."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ValueError(f"override {override!r} is not KEY=VALUE")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ValueError(f"override {override!r}: {part} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""


def load_config(path: str | None, overrides: Sequence[str] = ()) -> Any:
    """The run config from a YAML file plus `key=value` overrides."""
    raw: dict = {}
    if path:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {path!r} does not exist") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the top level must be a mapping")
    for o in overrides:
        apply_override(raw, o)
    try:
        return resolve_paths(build(Config, raw))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path or 'config'}: {e}") from None


def absolute(path: str) -> str:
    """A local path made absolute (against the working directory); a URL or "" unchanged."""
    if not path or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def resolve_paths(cfg, keys: Sequence[str] = PATH_KEYS):
    """cfg with every local path of `keys` absolute (sections that are absent are skipped)."""
    def replace(node, parts, key):
        if node is None:
            return None
        if len(parts) == 1:
            value = getattr(node, parts[0])
            if value is None or value in VERBATIM.get(key, ()):
                return node
            return dataclasses.replace(node, **{parts[0]: absolute(value)})
        child = replace(getattr(node, parts[0]), parts[1:], key)
        return dataclasses.replace(node, **{parts[0]: child})

    for key in keys:
        cfg = replace(cfg, key.split("."), key)
    return cfg

