"""Stage 4, export: an Orbax checkpoint -> a Hugging Face directory that transformers and vLLM load.

convert.save_hf walks the parameters in HF order, one tensor at a time: gather it to the hosts,
reshape it to the HF layout (the model keeps HF's), cast it, stream it into a safetensors shard, drop it. The parameters
it walks are restored from the checkpoint onto the mesh one group at a time (the embedding, one
decoder block, the final norm, the head), each process reading only its own shards, so no host ever
holds the whole model, not even on CPU where device memory is host memory: the peak is a few copies
of the largest tensor, the embedding (docs/BENCHMARKS.md, "Export memory"). Only process 0 writes;
every process takes part in the gathers. The directory gets the weights (several files with an
index above max_shard_bytes), config.json, generation_config.json, the tokenizer with its chat
template, and qedjax_export.json naming the checkpoint and step it came from: re-running the
pipeline skips an export that is already there, as the other stages skip themselves when finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp

from qedjax import convert, train
from qedjax.checkpoint import CheckpointConfig, Checkpointer
from qedjax.config_io import config_hash
from qedjax.models.qwen3 import DTYPES, Qwen3Config
from qedjax.sharding import TRAIN_RULES

# Stages whose checkpoints hold a finished model, most trained first: the default export source.
SOURCE_STAGES = ("grpo", "sft")
MARKER = "qedjax_export.json"


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    checkpoint: str | None = None  # an Orbax checkpoint dir (default: run_dir/grpo, then run_dir/sft)
    out: str | None = None  # the HF directory to write, a path or gs:// URL (default: run_dir/hf)
    dtype: str | None = None  # dtype of the saved tensors (default: model.param_dtype)
    max_shard_bytes: int = convert.DEFAULT_SHARD_BYTES  # weights above this go into several files
    copy_tokenizer: bool = True

    def __post_init__(self):
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"export.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.max_shard_bytes < 1:
            raise ValueError(f"export.max_shard_bytes must be positive, got {self.max_shard_bytes}")


def _exists(path: str) -> bool:
    if "://" in path:
        from etils import epath

        return epath.Path(path).exists()
    return os.path.isdir(path)


def _latest_step(directory: str) -> int | None:
    """The newest finished step under an Orbax checkpoint directory (None if there is none)."""
    ckpt = Checkpointer(directory, CheckpointConfig(async_save=False))
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def find_checkpoint(run_dir: str, checkpoint: str | None = None) -> tuple[str, int]:
    """(checkpoint directory, step) to export.

    `checkpoint` may be a CheckpointManager directory (its latest step is used) or one step's
    directory inside it (`.../checkpoints/150`). Without it, the latest step of the first of
    run_dir/grpo/checkpoints and run_dir/sft/checkpoints that holds one.
    """
    if checkpoint:
        checkpoint = checkpoint.rstrip("/")
        if not _exists(checkpoint):
            raise FileNotFoundError(f"export: checkpoint directory {checkpoint} does not exist")
        parent, name = os.path.split(checkpoint)
        if name.isdigit() and _exists(os.path.join(checkpoint, "params")):
            return parent, int(name)
        step = _latest_step(checkpoint)
        if step is None:
            raise FileNotFoundError(f"export: no checkpoint in {checkpoint} (expected an Orbax checkpoint "
                                    f"directory with numbered steps, e.g. RUN_DIR/sft/checkpoints)")
        return checkpoint, step
    tried = []
    for stage in SOURCE_STAGES:
        directory = os.path.join(run_dir, stage, "checkpoints")
        tried.append(directory)
        if _exists(directory):
            step = _latest_step(directory)
            if step is not None:
                return directory, step
    raise FileNotFoundError(f"export: no checkpoint to export: none of {tried} holds one "
                            f"(train first, or pass --checkpoint DIR)")


def _checkpoint_shapes(directory: str, step: int) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Path -> shape of every parameter saved at `step`, from the checkpoint's metadata alone."""
    from etils import epath

    meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(directory) / str(step) / "params").tree
    return {_path(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(meta)[0]}


def _keys(keypath) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in keypath)


def _path(keypath) -> tuple[str, ...]:  # checkpoint metadata names list indices as strings
    return tuple(map(str, _keys(keypath)))


def _check_matches(directory: str, step: int, target, model_cfg) -> None:
    """The checkpoint must hold exactly the target's parameters with the same shapes."""
    saved = _checkpoint_shapes(directory, step)
    wanted = {_path(p): tuple(s.shape) for p, s in jax.tree_util.tree_flatten_with_path(target)[0]}
    problems = [f"missing {'.'.join(k)}" for k in sorted(wanted.keys() - saved.keys())]
    problems += [f"unexpected {'.'.join(k)}" for k in sorted(saved.keys() - wanted.keys())]
    problems += [f"{'.'.join(k)} is {saved[k]}, the model needs {wanted[k]}"
                 for k in sorted(wanted.keys() & saved.keys()) if saved[k] != wanted[k]]
    if problems:
        raise ValueError(f"export: the checkpoint {directory} (step {step}) does not hold the model of the "
                         f"config (model.preset={model_cfg.preset!r}, model.hf_path={model_cfg.hf_path!r}): "
                         f"{'; '.join(problems[:6])}{' ...' if len(problems) > 6 else ''}")


class _GroupRestorer:
    """Restores the checkpoint's parameters a group at a time onto their shardings, keeping only the
    group asked for last. convert.save_hf asks in HF order, so every group is read once."""

    def __init__(self, ckpt: Checkpointer, step: int, target):
        self.ckpt, self.step, self.target = ckpt, step, target
        self.key, self.tree = None, None

    def get(self, path: tuple):
        key = tuple(path[:2]) if path[0] == "layers" else tuple(path[:1])
        if key != self.key:
            self.key, self.tree = None, None  # free the previous group before reading the next
            item = node = {}
            source = self.target
            for k in key[:-1]:
                node[k], source = {}, source[k]
                node = node[k]
            node[key[-1]] = source[key[-1]]
            restore = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                             partial_restore=True)
            self.tree = self.ckpt.manager.restore(self.step, args=ocp.args.Composite(params=restore))["params"]
            self.key = key
        node = self.tree
        for k in path:
            node = node[k]
        return node


class _Lazy:
    """One parameter as convert.save_hf sees it: the shape at once, the value (restored with its
    group, gathered to this host) when it is converted to a numpy array."""

    def __init__(self, groups: _GroupRestorer, path: tuple, struct: jax.ShapeDtypeStruct):
        self.groups, self.path, self.shape, self.dtype = groups, path, struct.shape, struct.dtype

    def __array__(self, dtype=None, copy=None):
        host = convert._to_host(self.groups.get(self.path))  # collective when sharded across processes
        return host if dtype is None else host.astype(dtype)


def streamed_params(ckpt: Checkpointer, step: int, target):
    """`target`'s tree with every leaf a _Lazy reading from the checkpoint (for convert.save_hf)."""
    groups = _GroupRestorer(ckpt, step, target)
    return jax.tree_util.tree_map_with_path(lambda p, s: _Lazy(groups, _keys(p), s), target)


def _with_special_tokens(config: Qwen3Config, tokenizer_path: str | None) -> Qwen3Config:
    """Fills bos/eos ids the preset leaves unset from the tokenizer, so generate() knows when to stop."""
    if tokenizer_path is None or (config.bos_token_id is not None and config.eos_token_id is not None):
        return config
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    return dataclasses.replace(
        config, bos_token_id=config.bos_token_id if config.bos_token_id is not None else tok.bos_token_id,
        eos_token_id=config.eos_token_id if config.eos_token_id is not None else tok.eos_token_id)


def _read_marker(out: str) -> dict | None:
    try:
        if "://" in out:
            from etils import epath

            return json.loads((epath.Path(out) / MARKER).read_text())
        with open(os.path.join(out, MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _holds_files(out: str) -> bool:
    if "://" in out:
        from etils import epath

        path = epath.Path(out)
        return path.exists() and any(path.iterdir())
    return os.path.isdir(out) and bool(os.listdir(out))


def _upload(local: str, url: str) -> None:
    """Copies the files of a local directory to a gs:// (or other fsspec) URL, streamed, the marker last."""
    from etils import epath

    target = epath.Path(url)
    target.mkdir(parents=True, exist_ok=True)
    names = sorted(os.listdir(local), key=lambda n: n == MARKER)
    for name in names:
        with open(os.path.join(local, name), "rb") as src, (target / name).open("wb") as dst:
            shutil.copyfileobj(src, dst, 64 * 2**20)


def _agree(code: int) -> int:
    """Process 0's decision on every process (only process 0 may see the output directory)."""
    if jax.process_count() == 1:
        return code
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(code)))


def run(cfg, mesh, run_dir: str, *, checkpoint: str | None = None, out: str | None = None,
        tokenizer_path: str | None = None, rules=TRAIN_RULES) -> str:
    """Exports a checkpoint of this run to a Hugging Face directory; returns the directory.

    Args:
      cfg: the run config; `cfg.model` describes the checkpoint's parameters, `cfg.export` (if the
        config has that section) the export options.
      checkpoint, out: override export.checkpoint and export.out (the launcher's --checkpoint/--out).
      tokenizer_path: the tokenizer directory copied alongside (model.tokenizer or model.hf_path).
    Every process must call it: the gathers are collective. Only process 0 writes.
    """
    ecfg = getattr(cfg, "export", None) or ExportConfig()
    directory, step = find_checkpoint(cfg.run.checkpoint_dir or run_dir, checkpoint or ecfg.checkpoint)
    out = out or ecfg.out or os.path.join(run_dir, "hf")
    remote = "://" in out  # gs://...: written to a local staging directory, then uploaded
    out = out.rstrip("/") if remote else os.path.abspath(out)
    config, _, target = train.abstract_params(cfg.model, mesh, rules)  # nothing allocated
    dtype = ecfg.dtype or config.param_dtype
    source = {"checkpoint": directory, "step": step, "dtype": dtype}
    lead = jax.process_index() == 0
    write, skip, blocked = 0, 1, 2
    decision = write
    if lead:
        previous = _read_marker(out)
        if previous is not None and all(previous.get(k) == v for k, v in source.items()):
            decision = skip
        elif previous is None and _holds_files(out):
            decision = blocked
    decision = _agree(decision)
    if decision == skip:
        if lead:
            print(f"[qedjax] export: {out} already holds step {step} of {directory}; skipping")
        return out
    if decision == blocked:
        raise FileExistsError(f"export: {out} exists, is not empty and was not written by a qedjax export; "
                              f"remove it or choose another --out")
    tokenizer_path = tokenizer_path if ecfg.copy_tokenizer else None
    if ecfg.copy_tokenizer and tokenizer_path is None and lead:
        print("[qedjax] export: no tokenizer directory (model.tokenizer / model.hf_path); writing weights only")
    if lead:  # only process 0 writes config.json; the others need the shapes alone
        config = _with_special_tokens(config, tokenizer_path)
        print(f"[qedjax] export: step {step} of {directory} -> {out} ({dtype})")
    _check_matches(directory, step, target, cfg.model)
    local = tempfile.mkdtemp(prefix="qedjax_export_") if remote else out
    ckpt = Checkpointer(directory, CheckpointConfig(async_save=False))
    try:
        convert.save_hf(streamed_params(ckpt, step, target), local, config=config, dtype=dtype,
                        max_shard_bytes=ecfg.max_shard_bytes, tokenizer_dir=tokenizer_path, overwrite=True)
    finally:
        ckpt.close()
    if lead:
        with open(os.path.join(local, MARKER), "w") as f:
            json.dump({**source, "config_hash": config_hash(cfg)}, f, indent=2)
            f.write("\n")
        if remote:
            _upload(local, out)
    if remote:
        shutil.rmtree(local, ignore_errors=True)
    return out
