"""SFT train step: equal results on every mesh, gradient accumulation, skipped non-finite steps,
exact resume through a SIGTERM, restore onto another mesh."""

import os
import signal

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

from qedjax import data as data_lib
from qedjax import sft, sharding, train
from qedjax.config import load_config
from qedjax.metrics import MetricsWriter
from qedjax.models.qwen3 import Qwen3, Qwen3Config
from qedjax.optim import OptimConfig, make_optimizer

import parity

# Blocks of 8 over 24-token rows: the steps run blockwise attention (and its skipped blocks) on every mesh.
CFG = Qwen3Config.preset("tiny", vocab_size=128, attention_block=8)


def _batches(n, rows=8, seq=24, seed=0):
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        seg = np.ones((rows, seq), np.int32)
        seg[:, seq // 2:] = 2
        seg[:, -3:] = 0
        tokens = rng.randint(1, CFG.vocab_size, (rows, seq)).astype(np.int32)
        out.append({"tokens": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": (seg > 0).astype(np.int32),
                    "segment_ids": seg, "positions": np.asarray(jax.device_get(
                        __import__("qedjax.models.qwen3", fromlist=["x"]).positions_from_segments(seg)))})
    return out


LR = 1e-3


def _train(mesh_spec, batches, micro_batches=1, devices=None, opt=None):
    """(losses, final params, final optimizer state) of SFT steps over `batches` on a mesh."""
    mesh = sharding.make_mesh(mesh_spec, devices=devices)
    rules = sharding.TRAIN_RULES
    graphdef, params = sharding.init_sharded(lambda: Qwen3(CFG, rngs=nnx.Rngs(0)), mesh, rules)
    opt = opt or make_optimizer(OptimConfig(lr=LR, schedule="constant", warmup_ratio=0.0, weight_decay=0.1), 10)
    state, shardings = train.init_state(params, opt, mesh)
    batch_sh = {k: train.micro_batch_sharding(mesh, rules, 3) for k in batches[0]}
    step = train.make_train_step(graphdef, sft.sft_loss, sft.target_tokens, opt, shardings, batch_sh, mesh, rules)
    losses = []
    for b in batches:
        m = micro_batches
        local = {k: v.reshape(m, v.shape[0] // m, *v.shape[1:]) for k, v in b.items()}
        state, metrics = step(state, train.put_batch(local, mesh, rules))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state["params"]), state["opt_state"]


@pytest.mark.slow
def test_same_gradients_losses_and_params_on_every_mesh():
    # One step's gradient, exactly as the step computes it, agrees tightly on every mesh.
    ref_grads = parity.captured(_train("", _batches(1), devices=jax.devices()[:1], opt=parity.capture_grads())[2])
    batches = _batches(1) * 3  # the same batch thrice: the loss must fall
    ref_losses, ref_params, _ = _train("", batches, devices=jax.devices()[:1])
    assert ref_losses[-1] < ref_losses[0]
    for spec in ("data=8", "fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2"):
        grads = parity.captured(_train(spec, _batches(1), opt=parity.capture_grads())[2])
        parity.assert_grads_close(grads, ref_grads, where=f"{spec}: ")
        losses, params, _ = _train(spec, batches)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=spec)
        parity.assert_params_within(params, ref_params, parity.adam_drift_bound([LR] * 3), where=f"{spec}: ")


def test_gradient_accumulation_equals_one_big_batch():
    batches = _batches(2)
    devices = jax.devices()[:2]
    for b in batches:  # each step's gradient: 4 micro-batches of 2 rows sum to the batch of 8
        one = parity.captured(_train("data=2", [b], micro_batches=1, devices=devices, opt=parity.capture_grads())[2])
        acc = parity.captured(_train("data=2", [b], micro_batches=4, devices=devices, opt=parity.capture_grads())[2])
        parity.assert_grads_close(acc, one)
    one_losses, one_params, _ = _train("data=2", batches, micro_batches=1, devices=devices)
    acc_losses, acc_params, _ = _train("data=2", batches, micro_batches=4, devices=devices)
    np.testing.assert_allclose(acc_losses, one_losses, rtol=1e-5)
    parity.assert_params_within(acc_params, one_params, parity.adam_drift_bound([LR] * 2))


def test_non_finite_step_is_skipped():
    mesh = sharding.make_mesh("", devices=jax.devices()[:1])
    graphdef, params = sharding.init_sharded(lambda: Qwen3(CFG, rngs=nnx.Rngs(0)), mesh, sharding.TRAIN_RULES)
    opt = make_optimizer(OptimConfig(lr=1e-2, warmup_ratio=0.0), 10)
    state, shardings = train.init_state(params, opt, mesh)
    before = jax.device_get(state["params"])

    def nan_loss(model, batch):
        loss, aux = sft.sft_loss(model, batch)
        return loss * np.nan, aux

    batch = {k: v[None] for k, v in _batches(1)[0].items()}
    batch_sh = {k: train.micro_batch_sharding(mesh, sharding.TRAIN_RULES, 3) for k in batch}
    step = train.make_train_step(graphdef, nan_loss, sft.target_tokens, opt, shardings, batch_sh, mesh,
                                 sharding.TRAIN_RULES)
    state, m = step(state, train.put_batch(batch, mesh, sharding.TRAIN_RULES))
    assert int(m["skipped"]) == 1 and int(state["step"]) == 0
    parity.assert_params_within(jax.device_get(state["params"]), before, 0)


def _sft_config(tmp_path, toy_tokenizer_dir, run_dir, mesh, **sft_overrides):
    from qedjax import toy

    data_path = toy.write_data(toy.ToyConfig(sft_rows=64, rl_problems=1, eval_problems=1), str(tmp_path / "toy"))["sft"]
    raw = {"run": {"dir": str(run_dir), "seed": 1, "mesh": mesh},
           "model": {"preset": "tiny", "tokenizer": toy_tokenizer_dir},
           "sft": {"global_batch": 8, "steps": 6, "data": {"path": data_path, "seq_len": 96},
                   "optim": {"lr": 3e-3, "warmup_ratio": 0.0},
                   "checkpoint": {"every": 3, "keep": 3, "async_save": False}, **sft_overrides}}
    path = tmp_path / f"{os.path.basename(str(run_dir))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(str(path))


def _run_sft(cfg, seen, kill_at=None):
    mesh = sharding.make_mesh(cfg.run.mesh)
    real_put = train.put_batch
    calls = []

    def spy(local, mesh_, rules):
        calls.append(1)
        seen.append(local["tokens"].copy())
        if kill_at is not None and len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step; the loop saves after it
        return real_put(local, mesh_, rules)

    train.put_batch = spy
    try:
        return sft.run(cfg, mesh, cfg.run.dir, MetricsWriter(cfg.run.dir, tensorboard=False),
                       tokenizer_path=cfg.model.tokenizer)
    finally:
        train.put_batch = real_put


@pytest.mark.slow
def test_exact_resume_after_sigterm_and_onto_another_mesh(tmp_path, toy_tokenizer_dir):
    straight_seen, resumed_seen = [], []
    straight = _sft_config(tmp_path, toy_tokenizer_dir, tmp_path / "straight", "data=8")
    _run_sft(straight, straight_seen)
    killed = _sft_config(tmp_path, toy_tokenizer_dir, tmp_path / "killed", "data=8")
    with pytest.raises(KeyboardInterrupt, match="stopped at step 3"):
        _run_sft(killed, resumed_seen, kill_at=3)
    _run_sft(killed, resumed_seen)  # same mesh: bit-identical
    assert len(resumed_seen) == len(straight_seen) == 6
    for a, b in zip(straight_seen, resumed_seen):
        np.testing.assert_array_equal(a, b)
    target = jax.tree.map(lambda x: x, _restore_target(straight))
    from qedjax.checkpoint import restore_params

    p_straight = jax.device_get(restore_params(str(tmp_path / "straight/sft/checkpoints"), target))
    p_killed = jax.device_get(restore_params(str(tmp_path / "killed/sft/checkpoints"), target))
    parity.assert_params_within(p_killed, p_straight, 0)
    # Interrupt again at step 3 of a fresh run, and resume on a different mesh.
    moved = _sft_config(tmp_path, toy_tokenizer_dir, tmp_path / "moved", "data=8")
    with pytest.raises(KeyboardInterrupt):
        _run_sft(moved, [], kill_at=3)
    moved = _sft_config(tmp_path, toy_tokenizer_dir, tmp_path / "moved", "data=2,fsdp=2,tensor=2")
    _run_sft(moved, [])
    p_moved = jax.device_get(restore_params(str(tmp_path / "moved/sft/checkpoints"), target))
    # Steps 4-6 ran on another mesh: another summation order, so AdamW may drift by its bound.
    parity.assert_params_within(p_moved, p_straight, parity.adam_drift_bound([3e-3] * 3))


def _restore_target(cfg):
    mesh = sharding.make_mesh("fsdp=8")
    cfg_model = Qwen3Config.preset("tiny")
    _, abstract = nnx.split(nnx.eval_shape(lambda: Qwen3(cfg_model, rngs=nnx.Rngs(0))))
    shardings = sharding.state_shardings(abstract, mesh, sharding.TRAIN_RULES)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nnx.to_pure_dict(abstract), shardings)


def test_repeated_non_finite_steps_stop_the_run_with_a_checkpoint(tmp_path, toy_tokenizer_dir, monkeypatch):
    cfg = _sft_config(tmp_path, toy_tokenizer_dir, tmp_path / "nan", "data=8", max_bad_steps=2)
    real = sft.sft_loss
    monkeypatch.setattr(sft, "sft_loss", lambda model, batch: (real(model, batch)[0] * np.inf, real(model, batch)[1]))
    with pytest.raises(sft.NonFiniteError, match=r"2 consecutive steps had a non-finite loss.*checkpoint at step 0"):
        _run_sft(cfg, [])
    from qedjax.checkpoint import Checkpointer

    assert Checkpointer(str(tmp_path / "nan/sft/checkpoints")).latest_step() == 0
