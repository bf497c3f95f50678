"""GRPO with rubric rewards: advantages, the clipped policy loss, and the GRPO train-step loss.

Every algorithmic choice, and where it comes from:
- Groups: G rollouts of the same prompt (a problem, or an RC state of it); the paper uses G = 16.
- Advantage: A_i = r_i - mean(r_group) (Dr. GRPO, Liu et al. 2025, as in the QED-Nano release).
  Dividing by the group std (the original GRPO of DeepSeekMath, Shao et al. 2024) is an option,
  off by default; a group with equal rewards gets exactly 0 either way.
- Importance ratio r_t = exp(logp_policy - logp_behaviour), where the behaviour logprobs come from
  the rollout engine. This corrects for the engine lagging the trainer (asynchronous RL, at most
  `max_lag` optimizer steps behind; 5 in the paper) and for sampler/trainer numeric differences.
- Per-token objective: min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A) (PPO, Schulman et al.
  2017, with decoupled clip ranges as in DAPO, Yu et al. 2025). The release clips very wide (eps 4).
- Aggregation (how token terms become one loss), a config choice:
    "constant"   sum over all tokens of all sequences / a constant (the number of sequences per
                 optimizer step): Dr. GRPO's unbiased form, the release's choice; long and short
                 responses weigh per token alike.
    "token_mean" sum / number of response tokens in the batch (DAPO's token-level mean).
    "seq_mean"   mean over sequences of each sequence's token mean (the original GRPO); biases
                 towards short correct answers and long wrong ones.
- KL penalty to a frozen reference policy with the k3 estimator exp(d) - d - 1, d = logp_ref -
  logp (Schulman 2020); off in the release (coefficient 0).
- Entropy bonus: + coef x mean token entropy (1e-4 in the release), aggregated like the loss.
- Temperature: training logits are divided by the sampling temperature (0.8 in the release) before
  the log-softmax, so trainer and sampler logprobs describe the same distribution.
- Truncated responses (hit the length limit, or never closed the think block) get reward 0; there
  is no overlong filter (ALGORITHMS.md).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qedjax import train

AGGREGATIONS = ("constant", "token_mean", "seq_mean")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    aggregation: str = "constant"
    clip_low: float = 4.0  # eps_low: ratios below 1 - eps_low are clipped (4 = effectively never)
    clip_high: float = 4.0  # eps_high
    kl_coef: float = 0.0
    entropy_coef: float = 1e-4
    normalize_std: bool = False  # divide advantages by the group std

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"loss.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.clip_low < 0 or self.clip_high < 0:
            raise ValueError("loss.clip_low and loss.clip_high must be >= 0")


def group_advantages(rewards, group_size: int, normalize_std: bool = False, eps: float = 1e-6):
    """Reward minus its group's mean (optionally over the group's std).

    Args:
      rewards: [N] with N a multiple of group_size; consecutive entries form a group.
    Returns:
      [N] advantages; a group of equal rewards gives exactly 0 (never NaN).
    """
    r = jnp.asarray(rewards, jnp.float32)
    if r.shape[0] % group_size:
        raise ValueError(f"{r.shape[0]} rewards do not split into groups of {group_size}")
    g = r.reshape(-1, group_size)
    centred = g - g.mean(axis=1, keepdims=True)
    if normalize_std:
        std = g.std(axis=1, keepdims=True)
        centred = jnp.where(std > eps, centred / jnp.maximum(std, eps), 0.0)
    return centred.reshape(-1)


def token_terms(logp, behaviour_logp, advantages, *, clip_low: float, clip_high: float):
    """Per-token clipped surrogate loss (negated objective), and the clipping indicator.

    logp, behaviour_logp: [B, T]; advantages: [B] or [B, T].
    """
    adv = advantages if advantages.ndim == logp.ndim else advantages[:, None]
    ratio = jnp.exp(logp - behaviour_logp)
    clipped_ratio = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    objective = jnp.minimum(ratio * adv, clipped_ratio * adv)
    is_clipped = (ratio * adv) > (clipped_ratio * adv)  # the clipped branch is the binding one
    return -objective, ratio, is_clipped


def aggregate(values, mask, aggregation: str, num_sequences: float | None = None):
    """Token values [B, T] -> a scalar, per the aggregation (see the module docstring)."""
    mask = mask.astype(jnp.float32)
    total = jnp.sum(values * mask)
    if aggregation == "token_mean":
        return total / jnp.maximum(jnp.sum(mask), 1.0)
    if aggregation == "seq_mean":
        per_seq = jnp.sum(values * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
        has_tokens = jnp.sum(mask, axis=1) > 0
        return jnp.sum(jnp.where(has_tokens, per_seq, 0.0)) / jnp.maximum(jnp.sum(has_tokens), 1)
    if aggregation == "constant":
        n = values.shape[0] if num_sequences is None else num_sequences
        return total / n
    raise ValueError(f"unknown aggregation {aggregation!r}")


def policy_loss(logp, behaviour_logp, advantages, mask, *, clip_low: float, clip_high: float,
                aggregation: str, num_sequences: float | None = None):
    """The clipped policy-gradient loss of GRPO.

    Args:
      logp: [B, T] policy logprobs of the sampled tokens (differentiable).
      behaviour_logp: [B, T] logprobs under which they were sampled.
      advantages: [B] per sequence (or [B, T] per token).
      mask: [B, T] 1 on response tokens.
      aggregation: "constant" (sum / num_sequences, default B), "token_mean" or "seq_mean".
    Returns:
      (loss, metrics) with metrics clip_fraction, ratio_mean, ratio_max, approx_kl (k3 estimate of
      KL(behaviour || policy)), all over the masked tokens; rows without tokens give no NaN.
    """
    loss_t, ratio, clipped = token_terms(logp, behaviour_logp, advantages, clip_low=clip_low,
                                         clip_high=clip_high)
    m = mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m), 1.0)
    log_ratio = logp - behaviour_logp
    metrics = {
        "clip_fraction": jnp.sum(clipped * m) / n,
        "ratio_mean": jnp.sum(ratio * m) / n,
        "ratio_max": jnp.max(jnp.where(m > 0, ratio, 0.0)),
        "approx_kl": jnp.sum((ratio - 1.0 - log_ratio) * m) / n,  # k3 with samples from behaviour
    }
    return aggregate(loss_t, m, aggregation, num_sequences), metrics


# --- the train-step loss ------------------------------------------------------------------------------
# Batch rows are whole sequences (prompt + response) shifted for next-token prediction:
#   tokens, targets, loss_mask (1 on response targets), positions, segment_ids: [b, T] int32
#   behaviour_logp, ref_logp, weight: [b, T] float32;  advantage: [b] float32
# `weight` turns every aggregation into a plain weighted sum that micro-batches can add up:
#   constant: 1 (the normaliser is the constant), token_mean: 1 (normaliser: token count),
#   seq_mean: 1 / len(sequence) (normaliser: sequence count).

def token_weights(mask: np.ndarray, aggregation: str) -> np.ndarray:
    lengths = np.maximum(mask.sum(axis=-1, keepdims=True), 1)
    return (mask / lengths if aggregation == "seq_mean" else mask).astype(np.float32)


def normalizer(aggregation: str, num_sequences: float):
    """The scalar the step divides the summed loss by, for a batch dict."""
    def fn(batch):
        if aggregation == "constant":
            return jnp.asarray(num_sequences, jnp.float32)
        return jnp.sum(batch["weight"])  # token count, or sequence count for seq_mean

    return fn


def make_loss(cfg: LossConfig, temperature: float):
    """(model, micro_batch) -> (weighted loss sum, metric sums) for train.make_train_step."""
    def loss_fn(model, batch):
        logp, entropy = train.token_logprobs(model, batch["tokens"], batch["targets"],
                                             positions=batch["positions"], segment_ids=batch["segment_ids"],
                                             temperature=temperature)
        mask = batch["loss_mask"].astype(jnp.float32)
        w = batch["weight"]
        loss_t, ratio, clipped = token_terms(logp, batch["behaviour_logp"], batch["advantage"],
                                             clip_low=cfg.clip_low, clip_high=cfg.clip_high)
        total = loss_t - cfg.entropy_coef * entropy
        gap = logp - batch["behaviour_logp"]
        metrics = {
            "tokens": jnp.sum(mask),
            "sequences": jnp.sum(jnp.max(mask, axis=1)),
            "policy_loss_sum": jnp.sum(loss_t * w),
            "clipped_tokens": jnp.sum(clipped * mask),
            "ratio_sum": jnp.sum(ratio * mask),
            "ratio_max": jnp.max(jnp.where(mask > 0, ratio, 0.0)),
            "ratio_min": jnp.min(jnp.where(mask > 0, ratio, jnp.inf)),
            "entropy_sum": jnp.sum(entropy * mask),
            "approx_kl_sum": jnp.sum((ratio - 1.0 - gap) * mask),
            "logprob_gap_sum": jnp.sum(jnp.abs(gap) * mask),
        }
        if cfg.kl_coef:  # without KL the batch's ref_logp are zeros: no reference, nothing to report
            d = batch["ref_logp"] - logp
            kl_ref = jnp.exp(d) - d - 1.0
            total = total + cfg.kl_coef * kl_ref
            metrics["kl_ref_sum"] = jnp.sum(kl_ref * mask)
        return jnp.sum(total * w), metrics

    return loss_fn


def summarize_step(m: dict) -> dict:
    """Host-side per-token means of the step's metric sums."""
    n = max(float(m["tokens"]), 1.0)
    return {
        "loss": float(m["loss"]),
        "grad_norm": float(m["grad_norm"]),
        "skipped": int(m["skipped"]),
        "policy_loss": float(m["policy_loss_sum"]) / float(m["normalizer"]),
        "clip_fraction": float(m["clipped_tokens"]) / n,
        "ratio_mean": float(m["ratio_sum"]) / n,
        "ratio_max": float(m["ratio_max"]),
        "ratio_min": float(m["ratio_min"]) if np.isfinite(m["ratio_min"]) else 1.0,
        "entropy": float(m["entropy_sum"]) / n,
        **({"kl_ref": float(m["kl_ref_sum"]) / n} if "kl_ref_sum" in m else {}),
        "approx_kl": float(m["approx_kl_sum"]) / n,
        "logprob_gap": float(m["logprob_gap_sum"]) / n,
        "train_tokens": int(m["tokens"]),
        "train_sequences": int(m["sequences"]),  # rows the step trained on, counted on the devices
    }
