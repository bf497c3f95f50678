"""Hugging Face <-> qedjax conversion: one declarative key table, one loop each way.

The model keeps every weight in Hugging Face's layout, so each row of the table names a HF tensor,
the qedjax parameter path, and how the heads axis is split out (a reshape, never a copy):
  same       identical arrays (embeddings, norm scales, MLP matrices, lm_head)
  head_rows  HF [heads*H, D]  <-> qedjax [heads, H, D]    (q_proj, k_proj, v_proj)
  head_cols  HF [D, heads*H]  <-> qedjax [D, heads, H]    (o_proj)
Loading checks that every tensor of the checkpoint is consumed and every shape matches; tensors are
read one at a time from memory-mapped files and put straight into their shards.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from qedjax.models.qwen3 import Qwen3, Qwen3Config
from qedjax.safetensors_io import SafetensorsFile, read_index, shard_plan, write_safetensors

NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
READABLE = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float64)}
DEFAULT_SHARD_BYTES = 4 * 2**30


@dataclasses.dataclass(frozen=True)
class Key:
    hf: str  # Hugging Face tensor name
    path: tuple  # path into the qedjax params pure dict
    layout: str  # same | head_rows | head_cols


def key_table(config: Qwen3Config) -> list[Key]:
    """Every tensor of a Qwen3ForCausalLM checkpoint, in HF order."""
    keys = [Key("model.embed_tokens.weight", ("embed_tokens",), "same")]
    for i in range(config.num_hidden_layers):
        hf, ours = f"model.layers.{i}.", ("layers", i)
        keys += [
            Key(hf + "input_layernorm.weight", ours + ("input_layernorm", "scale"), "same"),
            Key(hf + "self_attn.q_proj.weight", ours + ("self_attn", "q_proj"), "head_rows"),
            Key(hf + "self_attn.k_proj.weight", ours + ("self_attn", "k_proj"), "head_rows"),
            Key(hf + "self_attn.v_proj.weight", ours + ("self_attn", "v_proj"), "head_rows"),
            Key(hf + "self_attn.o_proj.weight", ours + ("self_attn", "o_proj"), "head_cols"),
            Key(hf + "self_attn.q_norm.weight", ours + ("self_attn", "q_norm", "scale"), "same"),
            Key(hf + "self_attn.k_norm.weight", ours + ("self_attn", "k_norm", "scale"), "same"),
            Key(hf + "post_attention_layernorm.weight", ours + ("post_attention_layernorm", "scale"), "same"),
            Key(hf + "mlp.gate_proj.weight", ours + ("mlp", "gate_proj"), "same"),
            Key(hf + "mlp.up_proj.weight", ours + ("mlp", "up_proj"), "same"),
            Key(hf + "mlp.down_proj.weight", ours + ("mlp", "down_proj"), "same"),
        ]
    keys.append(Key("model.norm.weight", ("norm", "scale"), "same"))
    if not config.tie_word_embeddings:
        keys.append(Key("lm_head.weight", ("lm_head",), "same"))
    return keys


def hf_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The HF shape of a qedjax parameter of `shape`: its heads axis merged with head_dim."""
    if layout == "same":
        return tuple(shape)
    if layout == "head_rows":  # [heads, H, D] -> [heads*H, D]
        return (shape[0] * shape[1], shape[2])
    if layout == "head_cols":  # [D, heads, H] -> [D, heads*H]
        return (shape[0], shape[1] * shape[2])
    raise ValueError(f"unknown layout {layout!r}")


def to_ours(x, layout: str, shape: tuple[int, ...]):
    """HF array -> qedjax (`shape` is the qedjax shape): a reshape (a view of x)."""
    return x.reshape(shape)


def to_hf(x, layout: str):
    """qedjax array -> HF layout: a reshape (a view of x)."""
    return x.reshape(hf_shape(tuple(x.shape), layout))


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def read_config(path: str | os.PathLike, **overrides) -> Qwen3Config:
    """Qwen3Config from `path/config.json`."""
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path}: no config.json (is this a Hugging Face model directory?)")
    with open(file) as f:
        try:
            hf = json.load(f)
        except ValueError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
    return Qwen3Config.from_hf(hf, source=file, **overrides)


class _OneKey:
    """Stands in for nnx.Rngs when only shapes are wanted: every parameter draws from the same key.
    An nnx.Rngs counts its draws in a Variable, and each update under a trace asks the new value for
    its `sharding`, which makes JAX build an error message over the whole trace: quadratic, 5 s of a
    qwen3-0.6b load on 2 cores."""

    def params(self):
        return jax.random.key(0)


@functools.lru_cache(maxsize=8)
def abstract_model(config: Qwen3Config):
    """(graphdef, abstract state) of the model, no memory allocated. Cached per config: a launch asks
    for it several times (shardings, then the load). Read-only to its callers."""
    return nnx.split(nnx.eval_shape(lambda: Qwen3(config, rngs=_OneKey())))


def load_params(path: str | os.PathLike, *, dtype: str = "float32", compute_dtype: str | None = None,
                shardings: Any = None, config: Qwen3Config | None = None, stats: dict | None = None):
    """Reads a HF directory tensor by tensor into a params pure dict.

    Args:
      path: directory with config.json and model.safetensors or a sharded index.
      dtype: parameter dtype ("float32" or "bfloat16"); compute_dtype defaults to it.
      shardings: optional pure dict of NamedShardings (qedjax.sharding.state_shardings); each tensor is
        then placed straight into its shards (only the addressable shards touch this host's devices).
      config: optional config overriding `path/config.json` (e.g. to set remat).
      stats: if given, filled with `bytes_read` (the tensor bytes this process read: with shardings,
        only the slices its devices hold) and `bytes_total` (every tensor's bytes).
    Returns:
      (config, graphdef, params)
    """
    path = os.fspath(path)
    config = config or read_config(path)
    config = dataclasses.replace(config, param_dtype=dtype, dtype=compute_dtype or dtype)
    graphdef, abstract = abstract_model(config)
    shapes = nnx.to_pure_dict(abstract)
    files = read_index(path)
    table = key_table(config)
    expected = {k.hf for k in table}
    allowed_extra = {"lm_head.weight"} if config.tie_word_embeddings else set()
    extra = sorted(set(files) - expected - allowed_extra)
    missing = sorted(expected - set(files))
    if missing or extra:
        raise ValueError(f"{path}: checkpoint does not match the config: missing tensors {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected tensors {extra[:8]}"
                         f"{' ...' if len(extra) > 8 else ''}")
    opened: dict[str, SafetensorsFile] = {}
    params: dict = {}
    np_dtype = NP_DTYPES[dtype]
    total = 0
    try:
        for key in table:
            file = files[key.hf]
            if file not in opened:
                opened[file] = SafetensorsFile(file)
            f = opened[file]
            hf_arr = f.get(key.hf)
            total += hf_arr.nbytes
            if hf_arr.dtype not in READABLE:
                raise ValueError(f"{file}: tensor {key.hf} has dtype {hf_arr.dtype}; qedjax loads only "
                                 f"float checkpoints (float32/float16/bfloat16)")
            shape = tuple(_get(shapes, key.path).shape)
            if hf_arr.shape != hf_shape(shape, key.layout):
                raise ValueError(f"{file}: tensor {key.hf} has shape {hf_arr.shape}, expected "
                                 f"{hf_shape(shape, key.layout)} for the config in {path}")
            sharding = None if shardings is None else _get(shardings, key.path)
            _set(params, key.path, _load_tensor(f, key.hf, hf_arr, key.layout, shape, np_dtype, sharding))
    finally:
        for f in opened.values():
            f.close()
    if stats is not None:
        stats["bytes_read"] = sum(f.bytes_read for f in opened.values())
        stats["bytes_total"] = total
    return config, graphdef, params


def hf_slices(index: tuple[slice, ...], layout: str, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The slice of the HF tensor that holds `index` of our `shape` (a device's shard): the same
    rectangle, with a range of whole heads as the matching range of the merged heads*H axis. Heads
    are split whole (never inside a head's H entries)."""
    full = lambda sl, n: slice(sl.start or 0, n if sl.stop is None else sl.stop)  # noqa: E731
    index = tuple(full(sl, n) for sl, n in zip(index, shape))
    if layout == "same":
        return index
    if layout == "head_rows":  # ours [heads, H, D] <- HF [heads*H, D]
        (h, k, d), head = index, shape[1]
        assert (k.start, k.stop) == (0, head), f"a shard splits a head: {index}"
        return slice(h.start * head, h.stop * head), d
    (d, h, k), head = index, shape[2]  # head_cols: ours [D, heads, H] <- HF [D, heads*H]
    assert (k.start, k.stop) == (0, head), f"a shard splits a head: {index}"
    return d, slice(h.start * head, h.stop * head)


def _load_tensor(f: SafetensorsFile, name: str, hf_arr: np.ndarray, layout: str, shape: tuple[int, ...],
                 np_dtype: np.dtype, sharding) -> jax.Array:
    """One parameter into its shards. Only the parts of the file that this process's devices hold
    are read (`f.bytes_read` counts them), each distinct shard's slice once; a replica on another
    device is a device-to-device copy. The parameter has the file's layout, so a shard is a slice of
    the file reshaped (a view): whole rows are a view of the map (SafetensorsFile.load), which on CPU
    becomes the parameter itself without a copy; a slice in another dtype is cast on its device."""
    devices = ([(None, tuple(slice(None) for _ in shape))] if sharding is None
               else list(sharding.addressable_devices_indices_map(shape).items()))
    shards, done = [], {}
    for device, index in devices:
        key = tuple((sl.start, sl.stop) for sl in index)
        sub = tuple((sl.stop if sl.stop is not None else n) - (sl.start or 0) for sl, n in zip(index, shape))
        if key in done:  # a replica of a slice this process has read already
            shards.append(jax.device_put(done[key], device))
            continue
        x = jax.device_put(f.load(name, hf_slices(index, layout, shape)).reshape(sub), device)
        done[key] = x if hf_arr.dtype == np_dtype else _cast(x, jnp.dtype(np_dtype))
        shards.append(done[key])
    if sharding is None:
        return shards[0]
    return jax.make_array_from_single_device_arrays(shape, sharding, shards)


@functools.partial(jax.jit, static_argnums=1)
def _cast(x, dtype):
    return x.astype(dtype)


def load_hf(path: str | os.PathLike, dtype: str = "float32", **kwargs) -> Qwen3:
    """The model stored in a local HF directory (see load_params for the options)."""
    _, graphdef, params = load_params(path, dtype=dtype, **kwargs)
    return nnx.merge(graphdef, params)


def _to_host(x: jax.Array) -> np.ndarray:
    """One parameter on this host, gathered across processes if it is not fully addressable."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def hf_tensors(params: dict, config: Qwen3Config, dtype: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(hf_name, array) pairs in HF layout, one tensor at a time (gathered lazily)."""
    np_dtype = NP_DTYPES[dtype or config.param_dtype]
    for key in key_table(config):
        yield key.hf, to_hf(_to_host(_get(params, key.path)), key.layout).astype(np_dtype, copy=False)


def hf_specs(params: dict, config: Qwen3Config, dtype: str | None = None) -> dict[str, tuple]:
    """hf_name -> (HF shape, numpy dtype), from shapes only."""
    np_dtype = NP_DTYPES[dtype or config.param_dtype]
    return {k.hf: (hf_shape(tuple(_get(params, k.path).shape), k.layout), np_dtype) for k in key_table(config)}


def params_and_config(model_or_params, config: Qwen3Config | None, caller: str):
    """(config, params pure dict) from a Qwen3 module, or from a params dict given with its config."""
    if isinstance(model_or_params, Qwen3):
        return model_or_params.config, nnx.to_pure_dict(nnx.state(model_or_params, nnx.Param))
    if config is None:
        raise ValueError(f"{caller}: pass `config` with a params dict")
    return config, model_or_params


# Keys of Qwen3Config.to_hf() that transformers' Qwen3Config does not take as arguments (it sets the
# architecture itself, writes the dtype it is given, and reads RoPE from rope_parameters).
_NOT_HF_ARGS = ("architectures", "model_type", "torch_dtype", "dtype", "rope_theta", "rope_scaling")


def hf_config(config: Qwen3Config, dtype: str | None = None):
    """transformers' own Qwen3Config for `config`, with `dtype` (default: the parameters') as its dtype:
    what save_hf writes as config.json."""
    import transformers

    kwargs = {k: v for k, v in config.to_hf().items() if k not in _NOT_HF_ARGS}
    return transformers.Qwen3Config(**kwargs, dtype=dtype or config.param_dtype, architectures=["Qwen3ForCausalLM"])


def save_hf(model: Qwen3 | dict, out_dir: str | os.PathLike, *, config: Qwen3Config | None = None,
            dtype: str | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
            tokenizer_dir: str | os.PathLike | None = None, overwrite: bool = False) -> str:
    """Writes a HF directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Args:
      model: a Qwen3 module, or a params pure dict together with `config`.
      dtype: dtype of the saved tensors (default: the model's param dtype).
      max_shard_bytes: above this the weights are split into shards with an index.
      tokenizer_dir: if given, its tokenizer is loaded and saved alongside (transformers' save_pretrained).
      overwrite: replace an existing non-empty out_dir.
    The directory is written to a temporary sibling and renamed into place, so a failed save leaves
    nothing half-written. Only process 0 writes; every process must call it (gathers are collective).
    """
    config, params = params_and_config(model, config, "save_hf")
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True to replace it)")
    specs = hf_specs(params, config, dtype)
    plan = shard_plan(((n, int(np.prod(s)) * d.itemsize) for n, (s, d) in specs.items()), max_shard_bytes)
    writer = jax.process_index() == 0
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(out_dir)) if writer else None
    try:
        tensors = hf_tensors(params, config, dtype)
        names = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
        if len(plan) == 1:
            names = ["model.safetensors"]
        weight_map = {}
        for file, shard in zip(names, plan):
            shard_specs = {n: specs[n] for n in shard}
            if writer:
                write_safetensors(os.path.join(tmp, file), shard_specs, lambda n: _next_named(tensors, n))
            else:  # Other processes still take part in every gather.
                for n in shard:
                    _next_named(tensors, n)
            weight_map.update({n: file for n in shard})
        if not writer:
            return out_dir
        if len(plan) > 1:
            total = sum(int(np.prod(s)) * d.itemsize for s, d in specs.values())
            _write_json(os.path.join(tmp, "model.safetensors.index.json"),
                        {"metadata": {"total_size": total}, "weight_map": weight_map})
        import transformers

        hf_config(config, dtype).save_pretrained(tmp)
        transformers.GenerationConfig(bos_token_id=config.bos_token_id,
                                      eos_token_id=config.eos_token_id).save_pretrained(tmp)
        if tokenizer_dir is not None:
            transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _next_named(tensors: Iterator[tuple[str, np.ndarray]], name: str) -> np.ndarray:
    got, arr = next(tensors)
    assert got == name, (got, name)  # hf_tensors and the shard plan walk the same table in order
    return arr


def _write_json(path: str, obj: Any):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
