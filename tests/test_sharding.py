"""Mesh specs and the logical-axis rules table."""

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from qedjax import sharding
from qedjax.models.qwen3 import Qwen3, Qwen3Config


def test_parse_mesh_spec():
    assert sharding.parse_mesh_spec("data=2,fsdp=4") == {"data": 2, "fsdp": 4, "tensor": 1}
    assert sharding.parse_mesh_spec(" tensor=8 ") == {"data": 1, "fsdp": 1, "tensor": 8}
    for bad, msg in [("data=2,pipe=4", "pipe=4"), ("data=x", "not an integer"), ("data=0", ">= 1"),
                     ("data=2,data=4", "given twice"), ("fsdp", "AXIS=SIZE")]:
        with pytest.raises(ValueError, match=msg):
            sharding.parse_mesh_spec(bad)


def test_mesh_must_use_every_device():
    assert dict(sharding.make_mesh("fsdp=4,tensor=2").shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert dict(sharding.make_mesh("").shape)["data"] == jax.device_count()
    with pytest.raises(ValueError, match="needs 6 devices, but 8 are available"):
        sharding.make_mesh("data=3,tensor=2")


def test_rules_shard_params_and_name_bad_dimensions():
    cfg = Qwen3Config.preset("tiny")  # 4 q heads, 2 kv heads
    _, abstract = nnx.split(nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0))))
    mesh = sharding.make_mesh("fsdp=4,tensor=2")
    train = sharding.state_shardings(abstract, mesh, sharding.TRAIN_RULES)
    assert train["layers"][0]["self_attn"]["q_proj"].spec == P("tensor", None, "fsdp")
    assert train["layers"][0]["mlp"]["down_proj"].spec == P("fsdp", "tensor")
    assert train["embed_tokens"].spec == P("tensor", "fsdp")
    rollout = sharding.state_shardings(abstract, mesh, sharding.ROLLOUT_RULES)
    assert rollout["layers"][0]["self_attn"]["q_proj"].spec == P("tensor", None, None)
    with pytest.raises(ValueError, match=r"layers.0.self_attn.k_proj: dimension 0 \(kv_heads=2\) is not "
                                         r"divisible by mesh axes tensor of size 4"):
        sharding.state_shardings(abstract, sharding.make_mesh("fsdp=2,tensor=4"), sharding.TRAIN_RULES)


def test_init_sharded_places_each_parameter_in_its_shards():
    cfg = Qwen3Config.preset("tiny")
    mesh = sharding.make_mesh("fsdp=4,tensor=2")
    _, params = sharding.init_sharded(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)), mesh, sharding.TRAIN_RULES)
    w = params["layers"][1]["mlp"]["gate_proj"]  # [128, 64] over (tensor, fsdp)
    assert {s.data.shape for s in w.addressable_shards} == {(64, 16)}
    one = sharding.make_mesh("", devices=jax.devices()[:1])
    _, alone = sharding.init_sharded(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)), one, sharding.TRAIN_RULES)
    assert (jax.device_get(w) == jax.device_get(alone["layers"][1]["mlp"]["gate_proj"])).all()


def test_unknown_logical_axis_is_an_error():
    with pytest.raises(KeyError, match="no sharding rule"):
        sharding.logical_to_spec(("embedd",), sharding.TRAIN_RULES)
