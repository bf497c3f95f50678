"""HF <-> qedjax conversion: bit-identical round trips, sharded files, clear errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from hf_utils import hf_logits, save_random_hf
from qedjax import convert
from qedjax.models.qwen3 import Qwen3, Qwen3Config
from qedjax.safetensors_io import SafetensorsFile, read_index

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-6)


def _tensors(directory):
    out = {}
    for name, file in read_index(str(directory)).items():
        out[name] = np.array(SafetensorsFile(file).get(name))
    return out


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_is_bit_identical_and_loads_in_transformers(tmp_path, tied):
    cfg = Qwen3Config(**TINY, tie_word_embeddings=tied)
    hf = save_random_hf(cfg, tmp_path / "in")
    model = convert.load_hf(tmp_path / "in")
    convert.save_hf(model, tmp_path / "out")
    before, after = _tensors(tmp_path / "in"), _tensors(tmp_path / "out")
    if tied:
        before.pop("lm_head.weight", None)  # transformers may write the tied head; qedjax does not
    assert sorted(before) == sorted(after)
    for name in before:
        assert before[name].dtype == after[name].dtype
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = np.arange(12).reshape(2, 6)
    np.testing.assert_allclose(hf_logits(reloaded, tokens), hf_logits(hf, tokens), atol=0, rtol=0)


def test_sharded_checkpoints_both_ways(tmp_path):
    cfg = Qwen3Config(**TINY, tie_word_embeddings=False)
    save_random_hf(cfg, tmp_path / "in", max_shard_size="20KB")
    assert os.path.exists(tmp_path / "in" / "model.safetensors.index.json")
    model = convert.load_hf(tmp_path / "in")
    convert.save_hf(model, tmp_path / "out", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == {k.hf for k in convert.key_table(cfg)}
    before, after = _tensors(tmp_path / "in"), _tensors(tmp_path / "out")
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ours = np.asarray(model(jnp.arange(8, dtype=jnp.int32)[None]))
    np.testing.assert_allclose(hf_logits(reloaded, np.arange(8)[None]), ours, atol=1e-4)


def test_bf16_export_keeps_dtype(tmp_path):
    model = Qwen3(Qwen3Config(**TINY, param_dtype="bfloat16", dtype="bfloat16"), rngs=nnx.Rngs(0))
    convert.save_hf(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    f = SafetensorsFile(tmp_path / "out" / "model.safetensors")
    assert {f.dtype_code(n) for n in f.names()} == {"BF16"}
    back = convert.load_hf(tmp_path / "out", dtype="bfloat16")
    np.testing.assert_array_equal(np.asarray(back.layers[1].mlp.up_proj[...]),
                                  np.asarray(model.layers[1].mlp.up_proj[...]))


def _mapped_ranges(file):
    """(start, end) of every mapping of `file` in this process (/proc/self/maps)."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == os.path.realpath(file):
                start, end = (int(a, 16) for a in fields[0].split("-"))
                out.append((start, end))
    return out


def test_load_keeps_the_files_pages_as_the_parameters(tmp_path):
    """The model has the file's layout and save_hf starts the tensor data 64-byte aligned, so every
    parameter loaded in the file's dtype is the memory-mapped file itself (jax.device_put aliases an
    aligned array on CPU): no copy into fresh memory. A cast is a copy, and donating an aliased
    parameter leaves the file as it was."""
    cfg = Qwen3Config(**dict(TINY, head_dim=16), tie_word_embeddings=False)  # every tensor 64-byte sized
    convert.save_hf(Qwen3(cfg, rngs=nnx.Rngs(0)), tmp_path)
    file = str(tmp_path / "model.safetensors")
    with open(file, "rb") as f:
        assert (8 + int.from_bytes(f.read(8), "little")) % 64 == 0
    saved = _tensors(tmp_path)
    model = convert.load_hf(tmp_path)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    mapped = _mapped_ranges(file)
    assert len(params) == len(convert.key_table(cfg)) and mapped
    for x in params:
        assert any(a <= x.unsafe_buffer_pointer() < b for a, b in mapped)
    jax.block_until_ready(jax.jit(lambda w: w + 1, donate_argnums=0)(model.layers[0].mlp.up_proj[...]))
    for name, value in _tensors(tmp_path).items():
        np.testing.assert_array_equal(value, saved[name], err_msg=name)
    cast = jax.tree.leaves(nnx.state(convert.load_hf(tmp_path, dtype="bfloat16"), nnx.Param))
    assert not any(a <= x.unsafe_buffer_pointer() < b for x in cast for a, b in _mapped_ranges(file))


def _edit_config(directory, **changes):
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_errors_name_the_file_and_key(tmp_path):
    cfg = Qwen3Config(**TINY, tie_word_embeddings=False)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        convert.load_hf(tmp_path)
    save_random_hf(cfg, tmp_path / "m")
    _edit_config(tmp_path / "m", architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(ValueError, match=r"config.json: unsupported model .*LlamaForCausalLM"):
        convert.load_hf(tmp_path / "m")
    _edit_config(tmp_path / "m", architectures=["Qwen3ForCausalLM"], model_type="qwen3",
                 num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.2"):
        convert.load_hf(tmp_path / "m")
    _edit_config(tmp_path / "m", num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"unexpected tensors \['model.layers.1"):
        convert.load_hf(tmp_path / "m")
    _edit_config(tmp_path / "m", num_hidden_layers=2, intermediate_size=48)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor model.layers.0.mlp.gate_proj.weight has shape"):
        convert.load_hf(tmp_path / "m")
    _edit_config(tmp_path / "m", intermediate_size=64, hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act"):
        convert.load_hf(tmp_path / "m")


def test_integer_checkpoint_is_refused(tmp_path):
    from safetensors.numpy import save_file

    cfg = Qwen3Config(**TINY, tie_word_embeddings=True)
    save_random_hf(cfg, tmp_path)
    tensors = {k: np.array(v) for k, v in _tensors(tmp_path).items()}
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int8)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="model.norm.weight has dtype int8"):
        convert.load_hf(tmp_path)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = Qwen3(Qwen3Config(**TINY), rngs=nnx.Rngs(0))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(convert, "write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        convert.save_hf(model, tmp_path / "out")
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    convert.save_hf(model, tmp_path / "out")
    with pytest.raises(FileExistsError):
        convert.save_hf(model, tmp_path / "out")
    convert.save_hf(model, tmp_path / "out", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_contract_load_hf_returns_model_with_config(tmp_path):
    cfg = Qwen3Config(**TINY, tie_word_embeddings=True)
    save_random_hf(cfg, tmp_path)
    model = convert.load_hf(tmp_path, dtype="float32")
    assert isinstance(model.config, Qwen3Config)
    assert model(jnp.zeros((2, 5), jnp.int32)).shape == (2, 5, cfg.vocab_size)
