"""GRPO's pure functions against hand-computed examples, and the GRPO step on several meshes."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qedjax import grpo, sharding, train
from qedjax.models.qwen3 import Qwen3, Qwen3Config
from qedjax.optim import OptimConfig, make_optimizer

import parity


def test_group_advantages():
    r = [1.0, 0.0, 0.5, 0.5, 0.25, 0.75]
    np.testing.assert_allclose(grpo.group_advantages(r, 2), [0.5, -0.5, 0, 0, -0.25, 0.25])
    np.testing.assert_allclose(grpo.group_advantages(r, 2, normalize_std=True), [1, -1, 0, 0, -1, 1])
    np.testing.assert_allclose(grpo.group_advantages(r, 3), [0.5, -0.5, 0, 0, -0.25, 0.25])
    same = grpo.group_advantages([0.3] * 4, 4, normalize_std=True)
    assert np.all(np.asarray(same) == 0.0)
    with pytest.raises(ValueError, match="groups of 4"):
        grpo.group_advantages(r, 4)


# Two sequences: ratios [1, 1.5, 0.5] with advantage +1, ratios [2, 1, (masked)] with advantage -1.
RATIOS = np.array([[1.0, 1.5, 0.5], [2.0, 1.0, 3.0]])
BEHAVIOUR = np.log(np.array([[0.2, 0.2, 0.4], [0.1, 0.3, 0.1]]))
LOGP = BEHAVIOUR + np.log(RATIOS)
ADV = np.array([1.0, -1.0])
MASK = np.array([[1, 1, 1], [1, 1, 0]])


@pytest.mark.parametrize("aggregation, num_sequences, expected", [
    # clip 0.2: per-token losses [-1, -1.2, -0.5] and [2, 1]; sum 0.3 over 5 tokens
    ("token_mean", None, 0.3 / 5),
    ("seq_mean", None, (-2.7 / 3 + 3 / 2) / 2),
    ("constant", None, 0.3 / 2),
    ("constant", 4, 0.3 / 4),
])
def test_policy_loss_aggregations(aggregation, num_sequences, expected):
    loss, m = grpo.policy_loss(LOGP, BEHAVIOUR, ADV, MASK, clip_low=0.2, clip_high=0.2,
                               aggregation=aggregation, num_sequences=num_sequences)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(m["clip_fraction"], 1 / 5)  # only ratio 1.5 with A > 0 is clipped
    np.testing.assert_allclose(m["ratio_mean"], (1 + 1.5 + 0.5 + 2 + 1) / 5, rtol=1e-6)
    np.testing.assert_allclose(m["ratio_max"], 2.0, rtol=1e-6)
    k3 = np.array([r - 1 - np.log(r) for r in (1, 1.5, 0.5, 2, 1)]).mean()
    np.testing.assert_allclose(m["approx_kl"], k3, rtol=1e-5)


def test_wide_clip_is_the_plain_policy_gradient_and_asymmetric_clips():
    loss, m = grpo.policy_loss(LOGP, BEHAVIOUR, ADV, MASK, clip_low=4.0, clip_high=4.0, aggregation="token_mean")
    np.testing.assert_allclose(loss, (-1 - 1.5 - 0.5 + 2 + 1) / 5, atol=1e-7)
    assert float(m["clip_fraction"]) == 0.0
    # clip_high 0.6 keeps 1.5 unclipped; clip_low 0.4 makes 0.5 irrelevant for A > 0 (min keeps 0.5)
    loss, m = grpo.policy_loss(LOGP, BEHAVIOUR, ADV, MASK, clip_low=0.4, clip_high=0.6, aggregation="token_mean")
    # row 1: A=-1, ratio 2 -> min(-2, -1.6) = -2 (unclipped branch binds)
    np.testing.assert_allclose(loss, (-1 - 1.5 - 0.5 + 2 + 1) / 5, atol=1e-7)
    assert float(m["clip_fraction"]) == 0.0


def test_gradient_sign_and_scale():
    grad = jax.grad(lambda lp: grpo.policy_loss(lp, BEHAVIOUR, ADV, MASK, clip_low=0.2, clip_high=0.2,
                                                aggregation="token_mean")[0])(jnp.asarray(LOGP))
    # d/dlogp of -min(r A, clip(r) A) = -A r where the unclipped branch binds, 0 where clipped.
    expected = np.array([[-1.0, 0.0, -0.5], [2.0, 1.0, 0.0]]) / 5
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-7)


def test_empty_rows_give_no_nan():
    mask = np.zeros((2, 3))
    for aggregation in grpo.AGGREGATIONS:
        loss, m = grpo.policy_loss(LOGP, BEHAVIOUR, ADV, mask, clip_low=0.2, clip_high=0.2, aggregation=aggregation)
        assert float(loss) == 0.0 and all(np.isfinite(float(v)) for v in m.values())
    half = np.array([[1, 1, 1], [0, 0, 0]])
    loss, _ = grpo.policy_loss(LOGP, BEHAVIOUR, ADV, half, clip_low=0.2, clip_high=0.2, aggregation="seq_mean")
    np.testing.assert_allclose(loss, -2.7 / 3, rtol=1e-6)


def test_train_step_loss_matches_policy_loss():
    """The weighted-sum form used inside the train step equals policy_loss for each aggregation."""
    for aggregation in grpo.AGGREGATIONS:
        w = grpo.token_weights(MASK.astype(np.float32), aggregation)
        loss_t, _, _ = grpo.token_terms(jnp.asarray(LOGP), jnp.asarray(BEHAVIOUR), jnp.asarray(ADV),
                                        clip_low=0.2, clip_high=0.2)
        denom = grpo.normalizer(aggregation, 2)({"weight": jnp.asarray(w)})
        ref, _ = grpo.policy_loss(LOGP, BEHAVIOUR, ADV, MASK, clip_low=0.2, clip_high=0.2, aggregation=aggregation)
        np.testing.assert_allclose(jnp.sum(loss_t * w) / denom, ref, rtol=1e-6)


CFG = Qwen3Config.preset("tiny", vocab_size=128)


def _grpo_batch(rows=8, seq=20, seed=0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(1, CFG.vocab_size, (rows, seq)).astype(np.int32)
    mask = np.zeros((rows, seq), np.int32)
    mask[:, seq // 2:] = 1
    batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": mask,
             "positions": np.tile(np.arange(seq, dtype=np.int32), (rows, 1)),
             "segment_ids": np.ones((rows, seq), np.int32),
             "behaviour_logp": (-5.0 + 0.1 * rng.randn(rows, seq)).astype(np.float32),
             "ref_logp": (-5.0 + 0.1 * rng.randn(rows, seq)).astype(np.float32),
             "weight": grpo.token_weights(mask.astype(np.float32), "constant"),
             "advantage": rng.randn(rows).astype(np.float32)}
    return {k: v[None] for k, v in batch.items()}


LR = 1e-3


def _grpo_train(spec, steps=2, devices=None, opt=None):
    """(losses, final params, final optimizer state) of GRPO steps on one batch."""
    mesh = sharding.make_mesh(spec, devices=devices)
    rules = sharding.TRAIN_RULES
    graphdef, params = sharding.init_sharded(lambda: Qwen3(CFG, rngs=nnx.Rngs(0)), mesh, rules)
    opt = opt or make_optimizer(OptimConfig(lr=LR, schedule="constant", warmup_ratio=0.0, clip_norm=1.0), 10)
    state, shardings = train.init_state(params, opt, mesh)
    batch = _grpo_batch()
    sh = {k: train.micro_batch_sharding(mesh, rules, v.ndim) for k, v in batch.items()}
    loss_cfg = grpo.LossConfig(clip_low=0.2, clip_high=0.28, kl_coef=0.01, entropy_coef=1e-3)
    step = train.make_train_step(graphdef, grpo.make_loss(loss_cfg, 0.8), grpo.normalizer("constant", 8), opt,
                                 shardings, sh, mesh, rules)
    losses = []
    for _ in range(steps):
        state, m = step(state, train.put_batch(batch, mesh, rules))
        losses.append(float(m["loss"]))
    return losses, jax.device_get(state["params"]), state["opt_state"]


@pytest.mark.slow
def test_grpo_step_is_the_same_on_every_mesh():
    ref_grads = parity.captured(_grpo_train("", steps=1, devices=jax.devices()[:1], opt=parity.capture_grads())[2])
    ref_losses, ref_params, _ = _grpo_train("", devices=jax.devices()[:1])
    for spec in ("data=8", "fsdp=4,tensor=2"):
        grads = parity.captured(_grpo_train(spec, steps=1, opt=parity.capture_grads())[2])
        parity.assert_grads_close(grads, ref_grads, where=f"{spec}: ")
        losses, params, _ = _grpo_train(spec)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6, err_msg=spec)
        parity.assert_params_within(params, ref_params, parity.adam_drift_bound([LR] * 2), where=f"{spec}: ")


def test_kl_ref_is_computed_and_logged_only_with_kl_on():
    """With kl_coef 0 the batch's ref_logp are zeros (no reference model runs): exp(0 - logp) would be
    huge, so kl_ref must be neither in the loss nor in the metrics."""
    model = Qwen3(CFG, rngs=nnx.Rngs(0))
    batch = {k: v[0] for k, v in _grpo_batch().items()}
    batch["ref_logp"] = np.zeros_like(batch["ref_logp"])
    off = grpo.LossConfig(kl_coef=0.0, entropy_coef=0.0)
    total_off, m_off = grpo.make_loss(off, 0.8)(model, batch)
    assert "kl_ref_sum" not in m_off
    on = dataclasses.replace(off, kl_coef=0.5)
    total_on, m_on = grpo.make_loss(on, 0.8)(model, batch)
    assert np.isfinite(float(m_on["kl_ref_sum"])) and float(m_on["kl_ref_sum"]) > 0
    # The loss difference is the KL term (same weights); two fp32 sums of 80 tokens: 80 * 1.2e-7 ~ 1e-5.
    np.testing.assert_allclose(float(total_on) - float(total_off), 0.5 * float(m_on["kl_ref_sum"]), rtol=1e-5)
    common = {"loss": 0.0, "grad_norm": 0.0, "skipped": 0, "normalizer": 1.0}
    assert "kl_ref" not in grpo.summarize_step({**common, **jax.device_get(m_off)})
    assert grpo.summarize_step({**common, **jax.device_get(m_on)})["kl_ref"] > 0


def test_logp_and_entropy_and_their_gradients():
    """The fused log-prob + entropy (one exponential each way, a written-out backward pass) against
    logsumexp / softmax under autodiff: values and the gradient of a mix of both outputs. Logits of
    size ~5 over 50 entries: fp32 rounding of sums of 50 terms, far below 1e-5."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(5 * rng.standard_normal((6, 50)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, 6), jnp.int32)
    w_logp, w_ent = (jnp.asarray(rng.standard_normal(6), jnp.float32) for _ in range(2))

    def reference(z):
        lse = jax.nn.logsumexp(z, axis=-1)
        logp = jnp.take_along_axis(z, targets[:, None], axis=-1)[:, 0] - lse
        return logp, lse - jnp.sum(jax.nn.softmax(z, axis=-1) * z, axis=-1)

    got, want = train.logp_and_entropy(logits, targets), reference(logits)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-5)

    def mixed(fn):
        return lambda z: jnp.sum(w_logp * fn(z)[0] + w_ent * fn(z)[1])

    np.testing.assert_allclose(jax.grad(mixed(lambda z: train.logp_and_entropy(z, targets)))(logits),
                               jax.grad(mixed(reference))(logits), atol=1e-5)


def test_token_logprobs_chunked_and_recomputed_equals_one_piece():
    """Large batches take the vocabulary projection in rematerialised chunks (the 4B path); small ones
    in one piece. Both give the same log-probs, entropies and parameter gradients (37 tokens: the
    last chunk of 8 is padded)."""
    cfg = Qwen3Config.preset("tiny", vocab_size=128)
    model = Qwen3(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 128, (2, 38)), jnp.int32)

    def run(**kw):
        def loss(m):
            logp, ent = train.token_logprobs(m, tokens[:, :-1], tokens[:, 1:], temperature=0.7, **kw)
            return jnp.sum(logp) + 0.3 * jnp.sum(ent), (logp, ent)
        return nnx.jit(nnx.grad(loss, has_aux=True))(model)

    (g_piece, (logp_piece, ent_piece)) = run()
    (g_chunk, (logp_chunk, ent_chunk)) = run(chunk=8, save_logits_bytes=0)
    np.testing.assert_allclose(logp_chunk, logp_piece, atol=1e-5)
    np.testing.assert_allclose(ent_chunk, ent_piece, atol=1e-5)
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(g_chunk)), jax.tree.leaves(nnx.to_pure_dict(g_piece))):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # Without the entropy (the SFT loss): the same log-probs, zero entropies, and the gradient of the
    # log-probs alone, against the fused function's gradient with the entropy's weight at zero.
    def logp_only(m, **kw):
        return jnp.sum(train.token_logprobs(m, tokens[:, :-1], tokens[:, 1:], temperature=0.7, **kw)[0])

    (logp_plain, ent_plain) = train.token_logprobs(model, tokens[:, :-1], tokens[:, 1:], temperature=0.7,
                                                   with_entropy=False)
    np.testing.assert_allclose(logp_plain, logp_piece, atol=1e-5)
    assert not np.any(np.asarray(ent_plain))
    g_plain = nnx.jit(nnx.grad(functools.partial(logp_only, with_entropy=False)))(model)
    g_fused = nnx.jit(nnx.grad(logp_only))(model)
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(g_plain)), jax.tree.leaves(nnx.to_pure_dict(g_fused))):
        np.testing.assert_allclose(a, b, atol=1e-5)
