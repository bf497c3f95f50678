"""Weight store: sharded publish -> HF-named read -> transformers parity; atomicity under concurrent
readers and killed writers; versions, garbage collection and errors that name the version."""

import json
import multiprocessing
import os
import signal
import time

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from qedjax import convert
from qedjax.models.qwen3 import Qwen3, Qwen3Config
from qedjax.rollout import weights
from qedjax.rollout.weight_shards import hf_region
from qedjax.rollout.weights import WeightStore, WeightStoreError
from qedjax.sharding import TRAIN_RULES, make_mesh, state_shardings

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-6)
TOKENS = np.array([[1, 5, 9, 2, 77, 31, 8, 60], [4, 4, 90, 13, 0, 25, 50, 7]], np.int32)


def _model(cfg: Qwen3Config, seed: int = 0):
    """(graphdef, host params) of a model whose norm scales are random too (so a misplaced norm shows)."""
    graphdef, state = nnx.split(Qwen3(cfg, rngs=nnx.Rngs(seed)))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: (np.asarray(x, np.float32) + 0.1 * rng.standard_normal(x.shape))
                          .astype(x.dtype), nnx.to_pure_dict(state))
    return graphdef, params


def _shard(graphdef, params, mesh_spec, rules=TRAIN_RULES):
    state = nnx.state(nnx.merge(graphdef, params))
    return jax.device_put(params, state_shardings(state, make_mesh(mesh_spec), rules))


def _logits(graphdef, params) -> np.ndarray:
    return np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, TOKENS))


def _hf_logits_from_store(cfg, pairs):
    import torch
    from hf_utils import hf_config, hf_logits
    import transformers

    hf = transformers.Qwen3ForCausalLM(hf_config(cfg)).eval().to(torch.float32)
    state = {name: torch.from_numpy(np.asarray(a, np.float32)) for name, a in pairs}
    result = hf.load_state_dict(state, strict=not cfg.tie_word_embeddings)
    if cfg.tie_word_embeddings:  # the head is the embedding; only it may be missing
        assert set(result.missing_keys) <= {"lm_head.weight"} and not result.unexpected_keys
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return hf_logits(hf, TOKENS)


@pytest.mark.parametrize("mesh_spec", ["fsdp=4,tensor=2", "data=2,fsdp=4"])
@pytest.mark.parametrize("tied", [True, False])
def test_sharded_publish_loads_into_transformers(tmp_path, mesh_spec, tied):
    cfg = Qwen3Config(**TINY, tie_word_embeddings=tied)
    graphdef, host = _model(cfg)
    sharded = _shard(graphdef, host, mesh_spec)
    store = WeightStore(tmp_path / "store")
    store.publish(sharded, 7, config=cfg)
    pairs = list(store.read(7))
    assert [n for n, _ in pairs] == [k.hf for k in convert.key_table(cfg)]
    expected = dict(convert.hf_tensors(host, cfg))
    for name, array in pairs:  # bit-identical, in HF layout
        assert array.dtype == np.float32
        np.testing.assert_array_equal(array, expected[name], err_msg=name)
    np.testing.assert_allclose(_hf_logits_from_store(cfg, pairs), _logits(graphdef, host), atol=1e-4, rtol=0)
    if mesh_spec.startswith("fsdp"):  # shards became chunks: q_proj [N*H, D] cut over tensor x fsdp
        q = next(t for t in store.manifest(7)["tensors"] if t["name"].endswith("0.self_attn.q_proj.weight"))
        assert q["chunk_shape"] == [16, 8] and len(q["checksums"]) == 8
    assert store.config(7) == Qwen3Config(**TINY, tie_word_embeddings=tied)


def test_bf16_publish_keeps_bf16(tmp_path):
    cfg = Qwen3Config(**TINY, param_dtype="bfloat16", dtype="bfloat16")
    graphdef, host = _model(cfg)
    store = WeightStore(tmp_path)
    store.publish(_shard(graphdef, host, "fsdp=4,tensor=2"), 1, config=cfg)
    f32 = Qwen3Config(**TINY)
    store.publish(nnx.merge(*_model(f32)), 2, dtype="bfloat16")  # a module, cast on publish
    for version, source, c in [(1, host, cfg), (2, _model(f32)[1], f32)]:
        manifest = store.manifest(version)
        assert manifest["dtype"] == "bfloat16" and manifest["config"]["torch_dtype"] == "bfloat16"
        assert store.config(version).param_dtype == "bfloat16"
        expected = dict(convert.hf_tensors(source, c, "bfloat16"))
        for name, array in store.read(version):
            assert array.dtype == ml_dtypes.bfloat16, name
            np.testing.assert_array_equal(array.view(np.uint16), expected[name].view(np.uint16), err_msg=name)


def test_head_dim_sharding_falls_back_to_a_gathered_write(tmp_path):
    cfg = Qwen3Config(**TINY, tie_word_embeddings=False)
    graphdef, host = _model(cfg)
    rules = {**TRAIN_RULES, "head_dim": "tensor", "q_heads": None, "kv_heads": None}
    store = WeightStore(tmp_path)
    store.publish(_shard(graphdef, host, "fsdp=4,tensor=2", rules), 1, config=cfg)
    expected = dict(convert.hf_tensors(host, cfg))
    for name, array in store.read(1):
        np.testing.assert_array_equal(array, expected[name], err_msg=name)
    chunks = {t["name"]: t["chunk_shape"] for t in store.manifest(1)["tensors"]}
    assert chunks["model.layers.0.self_attn.q_proj.weight"] == [32, 32]  # one writer, the whole tensor


@pytest.mark.parametrize("layout,shape", [("head_rows", (6, 2, 4)), ("head_cols", (4, 6, 2)), ("same", (6, 4))])
def test_hf_region_matches_the_layout_transform(layout, shape):
    x = np.arange(np.prod(shape)).reshape(shape)
    full = convert.to_hf(x, layout)
    splits = [[(0, n)] + [(i * n // k, (i + 1) * n // k) for k in (2, n) if n % k == 0 and k > 1
                          for i in range(k)] for n in shape]
    rectangles = 0
    for block in np.array(np.meshgrid(*[np.arange(len(s)) for s in splits], indexing="ij")).reshape(len(shape), -1).T:
        index = tuple(splits[d][b] for d, b in enumerate(block))
        region = hf_region(index, shape, layout)
        part = convert.to_hf(x[tuple(slice(a, b) for a, b in index)], layout)
        if region is None:  # head_dim split across several heads: not a rectangle
            assert layout.startswith("head_")
            continue
        rectangles += 1
        np.testing.assert_array_equal(full[tuple(slice(a, b) for a, b in region)], part)
    assert rectangles > 4


def test_versions_latest_and_garbage_collection(tmp_path):
    cfg = Qwen3Config(**TINY)
    store = WeightStore(tmp_path, keep=2)
    assert store.latest() is None and store.versions() == []
    with pytest.raises(WeightStoreError, match="version 0 is not committed"):
        store.manifest(0)
    for v in (1, 2, 3, 5):
        store.publish(_constant_params(cfg, v), v, config=cfg)
    assert store.versions() == [3, 5] and store.latest() == 5
    left = {k.decode().split("/")[0] for k in store._kv.list().result()}
    assert left == {"manifests", "v00000003", "v00000005"}
    store.publish(_constant_params(cfg, 30), 3, config=cfg)  # re-publishing replaces a version
    assert store.versions() == [3, 5]
    assert all((a == 30).all() for _, a in store.read(3))
    assert WeightStore(tmp_path).latest() == 5  # another handle sees the same store
    store.uncommit(5)  # what a resumed trainer does to the versions past its checkpoint
    assert store.versions() == [3] and store.latest() == 3
    with pytest.raises(WeightStoreError, match="version 5 is not committed"):
        list(store.read(5))
    store.publish(_constant_params(cfg, 50), 5, config=cfg)
    assert store.versions() == [3, 5] and all((a == 50).all() for _, a in store.read(5))


def test_errors_name_the_version(tmp_path):
    cfg = Qwen3Config(**TINY)
    store = WeightStore(tmp_path)
    store.publish(_constant_params(cfg, 1), 1, config=cfg)
    name = "model.layers.0.mlp.up_proj.weight"
    chunk = tmp_path / "v00000001" / name / "c" / "0" / "0"
    with pytest.raises(WeightStoreError, match="version 4 is not committed"):
        list(store.read(4))

    original = chunk.read_bytes()
    chunk.write_bytes(original[:10] + bytes([original[10] ^ 0xFF]) + original[11:])
    with pytest.raises(WeightStoreError, match=f"version 1: tensor {name}: checksum mismatch"):
        list(store.read(1))
    chunk.unlink()
    with pytest.raises(WeightStoreError, match=f"version 1: tensor {name}: read failed.*missing"):
        list(store.read(1))
    chunk.write_bytes(original)
    assert len(list(store.read(1))) == len(convert.key_table(cfg))

    (tmp_path / "v00000001" / name / "zarr.json").rename(tmp_path / "zarr.json")
    with pytest.raises(WeightStoreError, match=f"version 1: tensor {name}: array missing"):
        list(store.read(1))
    (tmp_path / "zarr.json").rename(tmp_path / "v00000001" / name / "zarr.json")

    manifest_file = tmp_path / "manifests" / "v00000001.json"
    good = manifest_file.read_text()
    for edit, message in [(lambda t: t.update(shape=[64, 33]), "shape/dtype"),
                          (lambda t: t.update(dtype="bfloat16"), "shape/dtype"),
                          (lambda t: t.update(checksums=t["checksums"][:0]), "checksums for"),
                          (lambda t: t.update(name="model.layers.0.mlp.bogus.weight"), "key table")]:
        manifest = json.loads(good)
        edit(next(t for t in manifest["tensors"] if t["name"] == name))
        manifest_file.write_text(json.dumps(manifest))
        with pytest.raises(WeightStoreError, match=f"version 1: .*{message}"):
            list(store.read(1))
    manifest_file.write_text("{not json")
    with pytest.raises(WeightStoreError, match="version 1: unreadable manifest"):
        list(store.read(1))


# --- atomicity: concurrent readers, killed writers -------------------------------------------------------

def _constant_params(cfg: Qwen3Config, value: float) -> dict:
    """Host params with every element equal to `value` (a reader can check a version by its values)."""
    shapes = nnx.to_pure_dict(convert.abstract_model(cfg)[1])
    return jax.tree.map(lambda s: np.full(s.shape, value, np.float32), shapes)


def _poll_reader(path, last: int, ready, progress, out):
    """Reads whatever is latest until `last` has been read; reports (version, outcome) per read and
    the newest version read so far in `progress`."""
    store, seen, deadline = WeightStore(path), [], time.time() + 600  # a hang guard, not under test
    n_tensors = len(convert.key_table(Qwen3Config(**TINY)))
    ready.set()
    while time.time() < deadline:
        v = store.latest()
        if v is None:
            continue
        try:  # every element of version v equals v: a mixed or partial read would show
            pairs = list(store.read(v))
            values = {float(x) for _, a in pairs for x in np.unique(a)}
            seen.append((v, "ok" if values == {float(v)} and len(pairs) == n_tensors else f"bad {values}"))
        except WeightStoreError as e:  # a version collected while being read: an error, never data
            seen.append((v, "error" if f"version {v}" in str(e) else f"unnamed error {e}"))
        progress.value = max(progress.value, v)
        if v == last and seen[-1][1] == "ok":
            break
    out.put(seen)


def test_concurrent_reader_sees_only_whole_versions(tmp_path):
    cfg = Qwen3Config(**TINY)
    ctx = multiprocessing.get_context("spawn")
    ready, progress, out = ctx.Event(), ctx.Value("i", 0), ctx.Queue()
    reader = ctx.Process(target=_poll_reader, args=(str(tmp_path), 20, ready, progress, out))
    reader.start()
    assert ready.wait(timeout=600)
    store = WeightStore(tmp_path, keep=3)
    for v in range(1, 21):
        store.publish(_constant_params(cfg, v), v, config=cfg)
        # The reader keeps reading version v while v + 1 is written and v - 2 collected: waiting for
        # it to have read v makes the reads overlap the publishing however loaded the machine is.
        deadline = time.monotonic() + 600  # a hang guard, not under test
        while progress.value < v and reader.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
    seen = out.get(timeout=600)
    reader.join(timeout=60)
    assert {o for _, o in seen} <= {"ok", "error"}, seen
    assert seen[-1] == (20, "ok")
    assert {v for v, o in seen} == set(range(1, 21)), seen  # every version was read while the next was written


def _publish_then_hang(path, started):
    """Publishes version 1, then starts version 2 and stops for good after its first writes landed."""
    cfg = Qwen3Config(**TINY)
    store = WeightStore(path)
    store.publish(_constant_params(cfg, 1), 1, config=cfg)
    finish = WeightStore._finish_write

    def slow_finish(self, version, write):
        n = finish(self, version, write)
        if write[2].startswith("model.layers.1"):
            started.set()
            time.sleep(600)
        return n

    WeightStore._finish_write = slow_finish
    store.publish(_constant_params(cfg, 2), 2, config=cfg)


def test_killed_writer_leaves_no_visible_version(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    started = ctx.Event()
    writer = ctx.Process(target=_publish_then_hang, args=(str(tmp_path), started))
    writer.start()
    assert started.wait(timeout=600)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join(timeout=30)
    store = WeightStore(tmp_path)
    partial = [k for k in store._kv.list().result() if k.startswith(b"v00000002/")]
    assert partial, "the writer should have been killed with version 2 half written"
    assert store.versions() == [1] and store.latest() == 1
    with pytest.raises(WeightStoreError, match="version 2 is not committed"):
        list(store.read(2))
    cfg = Qwen3Config(**TINY)
    store.publish(_constant_params(cfg, 3), 3, config=cfg)
    assert store.versions() == [1, 3]
    assert all((a == 3).all() for _, a in store.read(3))
    assert not [k for k in store._kv.list().result() if k.startswith(b"v00000002/")]  # collected


def _random_params(state):  # also run by the processes below, from its source
    import jax
    import numpy as np
    from flax import nnx

    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), nnx.to_pure_dict(state))


_MULTIHOST = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[1]))
import numpy as np
from qedjax.convert import abstract_model
from qedjax.models.qwen3 import Qwen3Config
from qedjax.rollout.weights import WeightStore
from qedjax.sharding import TRAIN_RULES, make_mesh, state_shardings
cfg = Qwen3Config(**TINY, tie_word_embeddings=False)
state = abstract_model(cfg)[1]
host = _random_params(state)  # eager jax ops would be slow here: every one is a 2-process program
head_dim_split = {**TRAIN_RULES, "head_dim": "tensor", "q_heads": None, "kv_heads": None}
for version, rules in [(1, TRAIN_RULES), (2, head_dim_split)]:
    shardings = state_shardings(state, make_mesh("fsdp=4,tensor=2"), rules)
    params = jax.tree.map(lambda h, s: jax.make_array_from_callback(h.shape, s, lambda i: h[i]), host, shardings)
    WeightStore(sys.argv[3]).publish(params, version, config=cfg)
"""


@pytest.mark.slow
def test_two_processes_each_write_their_own_shards(tmp_path):
    import inspect
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    code = f"TINY = {TINY!r}\n{inspect.getsource(_random_params)}{_MULTIHOST}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i), str(port), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    logs = [p.communicate(timeout=1200)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    cfg = Qwen3Config(**TINY, tie_word_embeddings=False)
    expected = dict(convert.hf_tensors(_random_params(convert.abstract_model(cfg)[1]), cfg))
    store = WeightStore(tmp_path)
    assert store.versions() == [1, 2]
    for version in (1, 2):
        for name, array in store.read(version):
            np.testing.assert_array_equal(array, expected[name], err_msg=f"{version} {name}")
    parts = [k for k in store._kv.list().result() if b"/parts/" in k]
    assert len(parts) == 4  # one checksum file per process and version
    writer = store.manifest(1)["writer"]
    assert writer["process_count"] == 2


def test_publish_checks_shapes_against_the_config(tmp_path):
    cfg = Qwen3Config(**TINY)
    params = _constant_params(cfg, 1)
    params["layers"][0]["mlp"]["up_proj"] = np.zeros((32, 65), np.float32)
    with pytest.raises(ValueError, match="up_proj.weight has HF shape"):
        WeightStore(tmp_path).publish(params, 1, config=cfg)
    assert weights.DEFAULT_CHECKSUM in ("xxh3_64", "crc32")
