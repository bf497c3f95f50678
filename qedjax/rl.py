"""The RL loop (stages 2 and 3 of the recipe): GRPO with rubric rewards, over reasoning-cache states.

One optimizer step:
  1. take the next `problems_per_step` problems (seeded order; optional difficulty filter);
  2. states: with RC, each problem's states come from an RC rollout (reason -> summarise, `turns`
     times) of the current policy with the summariser of grpo.rc.summarizer (a frozen model of its
     own, with its own sampling, in the release), and `states_per_problem` of its
     `turns + 1` states are drawn; without RC the only state is the bare problem (plain GRPO);
  3. a group of `group_size` rollouts per state from the rollout engine;
  4. every rollout graded alone against the plain problem (truncated ones get 0 without a call);
  5. advantages per group, a GRPO train step, and the new weights published to the engine.
Synchronous mode does these in order (lag 0). Asynchronous mode produces the rollouts of the next
batches in a background thread while the trainer trains; a batch generated more than `max_lag`
policy versions before the trainer reaches it is dropped and counted. With rollout workers
(engine.kind=workers) steps 2-3 run on other machines (qedjax.rollout.worker): the trainer queues
each step's problems there, `max_lag + 1` steps ahead (one in sync mode), and grades what comes back.
What the trainer and the workers share (the grpo section, the problem order, the Rollouts record,
steps 2-3 and the grading of step 4) is in qedjax.rollout.groups; this file is the trainer's loop.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import queue
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from qedjax import grpo, preempt, train
from qedjax.benchmarks import Problem, load_benchmark
from qedjax.checkpoint import Checkpointer, StopRequest, fault_point, restore_params
from qedjax.metrics import MetricsWriter
from qedjax.optim import learning_rate, make_optimizer
from qedjax.rewards import MAX_SCORE, Grader
from qedjax.rollout.engine import RolloutEngine
from qedjax.rollout.groups import GRPOConfig, ProblemSampler, Rollouts, grade_rollouts, sample_groups
from qedjax.rollout.sampler import bucket
from qedjax.sharding import TRAIN_RULES, batch_divisor

BATCH_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids", "behaviour_logp", "ref_logp", "weight")
FLOAT_KEYS = ("behaviour_logp", "ref_logp", "weight")


def collect(cfg: GRPOConfig, engine: RolloutEngine, summarizer: RolloutEngine, grader: Grader,
            problems: list[Problem], step: int, seed: int) -> Rollouts:
    """Steps 2-4 in this process."""
    return grade_rollouts(sample_groups(cfg, engine, summarizer, problems, step, seed), grader)


def train_rows(g: GRPOConfig, mesh, rules) -> int:
    """Rows of a train batch: the step's sequences, padded to micro-batches that split over the batch shards."""
    unit = g.micro_batches * batch_divisor(mesh, rules)
    return -(-g.sequences_per_step // unit) * unit


def train_seq_len(longest: int) -> int:
    """The padded length of a train batch whose longest sequence (prompt + response - 1) is `longest`."""
    return bucket(longest, minimum=16, step=512)


def make_step(g: GRPOConfig, graphdef, optimizer, shardings, mesh, rules):
    """The jitted GRPO step (train.make_train_step with the GRPO loss) for build_batch's batches."""
    batch_sh = {k: train.micro_batch_sharding(mesh, rules, 3) for k in BATCH_KEYS}
    batch_sh["advantage"] = train.micro_batch_sharding(mesh, rules, 2)
    return train.make_train_step(graphdef, grpo.make_loss(g.loss, g.sampling.temperature),
                                 grpo.normalizer(g.loss.aggregation, g.sequences_per_step), optimizer,
                                 shardings, batch_sh, mesh, rules)


def batch_shapes(g: GRPOConfig, mesh, rules, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """build_batch's output as ShapeDtypeStructs: [micro, rows / micro, T] (advantage [micro, rows / micro])."""
    rows = train_rows(g, mesh, rules)
    m = g.micro_batches
    out = {k: jax.ShapeDtypeStruct((m, rows // m, seq_len), jnp.float32 if k in FLOAT_KEYS else jnp.int32,
                                   sharding=train.micro_batch_sharding(mesh, rules, 3)) for k in BATCH_KEYS}
    out["advantage"] = jax.ShapeDtypeStruct((m, rows // m), jnp.float32,
                                            sharding=train.micro_batch_sharding(mesh, rules, 2))
    return out


def build_batch(ro: Rollouts, cfg: GRPOConfig, rows: int, pad_id: int, local: slice | None = None):
    """Host arrays [micro, rows/micro, T] of every sequence with signal, plus row statistics.

    `local`: the rows along the second axis that this process's devices hold (train.process_rows);
    only those are built (the others are never materialised on this host), so the result is
    [micro, local rows, T], this process's share for train.put_batch. Every process sees every
    rollout (the advantages and the padded length need them all) and picks the same sequences.
    """
    seqs, advantages = [], []
    zero_var = 0
    for comps, grades in zip(ro.completions, ro.grades):
        rewards = np.asarray([g.reward for g in grades], np.float32)
        adv = np.asarray(grpo.group_advantages(rewards, len(rewards), cfg.loss.normalize_std))
        if np.all(rewards == rewards[0]):
            zero_var += 1
            if cfg.skip_zero_variance:
                continue
        for c, a in zip(comps, adv):
            seqs.append(c)
            advantages.append(a)
    longest = max([len(c.prompt_tokens) + len(c.tokens) - 1 for c in seqs], default=1)
    t = train_seq_len(longest)
    m = cfg.micro_batches
    per_micro = rows // m
    local = slice(0, per_micro) if local is None else local
    width = local.stop - local.start
    out = {k: np.zeros((m, width, t), np.float32 if k in FLOAT_KEYS else np.int32) for k in BATCH_KEYS}
    out["tokens"][:] = pad_id
    out["advantage"] = np.zeros((m, width), np.float32)
    tokens = 0
    for r, (c, a) in enumerate(zip(seqs, advantages)):
        full = list(c.prompt_tokens) + list(c.tokens)
        n, p = len(full) - 1, len(c.prompt_tokens)
        tokens += n - (p - 1)
        micro, j = divmod(r, per_micro)
        if not local.start <= j < local.stop:
            continue  # another process's row
        at = (micro, j - local.start)
        out["tokens"][at][:n] = full[:-1]
        out["targets"][at][:n] = full[1:]
        out["positions"][at][:n] = np.arange(n)
        out["segment_ids"][at][:n] = 1
        out["loss_mask"][at][p - 1:n] = 1
        out["behaviour_logp"][at][p - 1:n] = c.logprobs
        out["advantage"][at] = a
    out["weight"] = grpo.token_weights(out["loss_mask"], cfg.loss.aggregation)
    return out, {"sequences_trained": len(seqs), "tokens_expected": tokens, "zero_variance_groups": zero_var}


def rollout_metrics(ro: Rollouts, version: int) -> dict:
    """Rewards, lengths, grader outcomes, lag and timings of one batch of rollouts."""
    flat_c = [c for group in ro.completions for c in group]
    flat_g = [g for group in ro.grades for g in group]
    rewards = np.asarray([g.reward for g in flat_g])
    lengths = np.asarray([len(c.tokens) for c in flat_c])
    scores = np.clip(np.rint([g.score for g in flat_g]), 0, MAX_SCORE).astype(int)
    reasons: dict[str, int] = {}
    for g in flat_g:
        reasons[g.reason] = reasons.get(g.reason, 0) + 1
    lags = np.asarray([version - c.policy_version for c in flat_c])
    gen_tokens = int(lengths.sum())
    out = {
        "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
        "score_hist": np.bincount(scores, minlength=MAX_SCORE + 1).tolist(),
        "response_len_mean": float(lengths.mean()), "response_len_p90": float(np.percentile(lengths, 90)),
        "truncation_rate": float(np.mean([g.reason == "truncated" for g in flat_g])),
        "lag_min": int(lags.min()), "lag_mean": float(lags.mean()), "lag_max": int(lags.max()),
        "rollout_tokens": gen_tokens,
        "rollout_tokens_per_s": gen_tokens / max(ro.times["generate_s"], 1e-9),
        **ro.times,
        **{f"grader_{k}": v for k, v in sorted(reasons.items()) if k != "ok"},
    }
    if ro.summary_tokens:
        out["summary_len_mean"] = float(np.mean(ro.summary_tokens))
        out["states_with_summary"] = float(np.mean([bool(s.summary) for s in ro.states]))
    out.update(ro.summary_stats)  # summary calls: attempted, ok, empty, failed by reason, mean length
    if ro.workers:  # rollout workers: how many made this step's groups, and each one's share
        out["rollout_workers"] = len(ro.workers)
        out.update({f"rollout_share/{w}": n / len(ro.completions) for w, n in sorted(ro.workers.items())})
    return out


GRADER_FAILURES = ("judge_error", "timeout")  # the grader was asked and gave nothing (not the response's fault)


class GradingDownError(RuntimeError):
    """grpo.max_failed_grading_steps consecutive steps in which every grader call failed."""


def grading_failed(ro: Rollouts) -> tuple[int, int, str]:
    """(failed, asked, a failure's detail): grader calls of a batch that failed, of those made at all
    (truncated or answerless responses are scored 0 without asking)."""
    flat = [g for group in ro.grades for g in group if g.reason not in ("truncated", "no_answer")]
    failed = [g for g in flat if g.reason in GRADER_FAILURES]
    return len(failed), len(flat), (failed[-1].raw if failed else "")


def update_difficulty(sampler: ProblemSampler, ro: Rollouts, cfg: GRPOConfig) -> None:
    for problem, grades in zip(ro.problems, ro.grades):
        rewards = [g.reward for g in grades]
        if cfg.filter_solved and min(rewards) >= 1.0:
            sampler.removed.add(problem.id)
        if cfg.filter_unsolved and max(rewards) <= 0.0:
            sampler.removed.add(problem.id)


class Producer(threading.Thread):
    """Asynchronous rollouts: generates the next batches in a thread while the trainer trains.

    It starts a batch only when the trainer will reach it within `max_lag` policy versions: one
    permit per batch, `max_lag + 1` at first, and one more each time the trainer comes back for a
    batch (it has then trained and published the previous one). So batch j starts once the trainer
    has finished batch j - max_lag - 1, and is trained at most max_lag versions after its weights:
    none is made only to be dropped as stale. (A plain queue of `max_lag` batches plus the one
    blocked in `put` ran max_lag + 1 batches ahead, and some were dropped.)
    """

    def __init__(self, make_batch, max_lag: int):
        super().__init__(daemon=True)
        self.make_batch = make_batch
        self.queue: queue.Queue = queue.Queue()  # at most max_lag + 1 batches: the permits bound it
        self.permits = threading.Semaphore(max_lag + 1)
        self.gets = 0
        self.stopped = threading.Event()
        self.error: BaseException | None = None

    def run(self):
        try:
            while not self.stopped.is_set():
                if self.permits.acquire(timeout=0.1):
                    self.queue.put(self.make_batch())
        except BaseException as e:  # surfaced in the trainer thread by get()
            self.error = e

    def get(self) -> Rollouts:
        if self.gets:  # the trainer is done with the batch it took last: one more may start
            self.permits.release()
        self.gets += 1
        while True:
            if isinstance(self.error, preempt.Preempted):
                raise preempt.Preempted(str(self.error))
            if self.error is not None:
                raise RuntimeError("rollout producer failed") from self.error
            try:
                return self.queue.get(timeout=0.1)
            except queue.Empty:
                continue

    def stop(self):
        self.stopped.set()
        self.join(timeout=60)


def initial_params(cfg, mesh, run_dir: str, rules, vocab_size: int):
    """(config, graphdef, params) the RL stage starts from: SFT's result, the model, or a checkpoint."""
    init = cfg.grpo.init
    if init == "model":
        return train.init_params(cfg.model, mesh, rules, seed=cfg.run.seed, vocab_size=vocab_size)
    directory = os.path.join(cfg.run.checkpoint_dir or run_dir, "sft", "checkpoints") if init == "sft" else init
    config, graphdef, target = train.abstract_params(cfg.model, mesh, rules)
    return config, graphdef, restore_params(directory, target)


def run(cfg, mesh, run_dir: str, writer: MetricsWriter, *, tokenizer, grader: Grader, make_engine,
        make_summarizer=None, rules=TRAIN_RULES) -> str:
    """Runs (or resumes, or skips if finished) the GRPO stage; returns its checkpoint directory.

    Args:
      make_engine: (model, version) -> RolloutEngine (the launcher's choice of engine).
      make_summarizer: (starting policy, version) -> the RC summariser's engine, unless
        grpo.rc.summarizer is "policy" (default: make_engine, a frozen copy of the start).
    """
    g = cfg.grpo
    problems = load_benchmark(g.problems)
    config, graphdef, params = initial_params(cfg, mesh, run_dir, rules, len(tokenizer))
    optimizer = make_optimizer(g.optim, g.steps)
    lr = learning_rate(g.optim, g.steps)
    state, shardings = train.init_state(params, optimizer, mesh)
    ckpt_dir = os.path.join(cfg.run.checkpoint_dir or run_dir, "grpo", "checkpoints")
    ckpt = Checkpointer(ckpt_dir, g.checkpoint)
    sampler = ProblemSampler(problems, cfg.run.seed)
    start = ckpt.latest_step() or 0
    if start >= g.steps:
        ckpt.close()
        return ckpt_dir
    # A summariser of its own is built before a checkpoint replaces the parameters: "frozen" is a copy of
    # the stage's starting policy, in a resumed run too.
    own_summarizer = g.rc.enabled and g.rc.summarizer != "policy"
    summarizer = (make_summarizer or make_engine)(nnx.merge(graphdef, params), 0) if own_summarizer else None
    # The KL penalty's reference is the stage's starting policy too, in a resumed run as well.
    ref_logp = make_ref_logprobs(graphdef, params, g, mesh, rules) if g.loss.kl_coef else None
    del params
    if start:
        state, data_state = ckpt.restore(jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
        start = ckpt.restored_step
        sampler.restore(data_state)
    version = int(state["step"])  # the policy version: optimizer steps (RL iterations may train nothing)
    remote = cfg.engine.kind == "workers"  # rollouts come from rollout workers (qedjax.rollout.worker)
    engine = make_engine(nnx.merge(graphdef, state["params"]), version)
    summarizer = summarizer if own_summarizer else engine
    rows = train_rows(g, mesh, rules)
    local_rows = train.process_rows(mesh, rules, rows // g.micro_batches)  # this process's rows of a micro-batch
    step_fn = make_step(g, graphdef, optimizer, shardings, mesh, rules)
    pad_id = tokenizer.pad_token_id or 0

    def next_rollouts():
        picked = sampler.take(g.problems_per_step)
        return collect(g, engine, summarizer, grader, picked, sampler.cursor, cfg.run.seed)

    if remote:  # depth max_lag + 1 keeps lag <= max_lag; depth 1 is sync mode (lag 0)
        from qedjax.rollout.dispatch import Dispatcher

        producer = Dispatcher(engine.queue_dir, g, sampler, cfg.run.seed, grader, version=lambda: int(state["step"]),
                              depth=g.max_lag + 1 if g.mode == "async" else 1,
                              summarizer=summarizer if own_summarizer else None, **engine.dispatch)
    else:
        producer = Producer(next_rollouts, g.max_lag) if g.mode == "async" else None
    if producer is not None:
        producer.start()
    writer.rewind("grpo", start)  # rows a killed run logged past its last checkpoint are logged again
    if not start:
        writer.write("grpo", start, {"event": "start", "total_steps": g.steps, "problems": len(problems)})
    elif jax.process_index() == 0:
        print(f"[qedjax] grpo: resuming from the checkpoint of step {start} in {ckpt_dir}")
    bar = tqdm(total=g.steps, initial=start, desc="grpo", disable=jax.process_index() != 0,
               dynamic_ncols=True, mininterval=2.0)
    dropped = 0
    down = 0  # consecutive steps where every grader call failed
    step = start  # RL iterations; the policy version is the optimizer's step count
    stopping = False
    try:
        with StopRequest() as stop:
            while step < g.steps and not stopping:
                try:  # a stop requested mid-generation or mid-wait is agreed there (qedjax/preempt.py)
                    ro = producer.get() if producer is not None else next_rollouts()
                except preempt.Preempted as e:
                    print(f"[qedjax] grpo: preempted during the rollouts of step {step + 1} ({e})", flush=True)
                    if step:  # the last finished step, with the data position before this step's problems
                        ckpt.save(step, state, sampler.state(), force=True)
                    break
                sampler.consumed()
                version = int(state["step"])
                ro, stale = drop_stale(ro, version, g.max_lag)
                dropped += stale
                if not ro.completions:
                    continue
                update_difficulty(sampler, ro, g)
                batch, stats = build_batch(ro, g, rows, pad_id, local_rows)
                row = {**rollout_metrics(ro, version), **stats, "dropped_stale": dropped,
                       "zero_variance_frac": stats["zero_variance_groups"] / len(ro.grades),
                       "problems_removed": len(sampler.removed), "lr": float(lr(version))}
                t0 = time.perf_counter()
                if stats["sequences_trained"]:  # no group with signal: no update (Adam would still move)
                    batch = train.put_batch(batch, mesh, rules)
                    if ref_logp is not None:
                        batch["ref_logp"] = ref_logp(batch)
                    state, m = step_fn(state, batch)
                    fault_point(f"grpo:step:{step + 1}")
                    row.update(grpo.summarize_step(jax.device_get(m)))
                    engine.load_weights(int(state["step"]), state["params"])
                row["train_s"] = time.perf_counter() - t0
                row["train_tokens_per_s"] = row.get("train_tokens", 0) / max(row["train_s"], 1e-9)
                step += 1
                failed, asked, detail = grading_failed(ro)
                down = down + 1 if asked and failed == asked else 0 if failed < asked else down
                if down:
                    row["grading_down_steps"] = down
                    if jax.process_index() == 0:
                        print(f"\n[qedjax] grpo step {step}: WARNING every grader call failed ({failed} of {asked}; "
                              f"{down} step(s) in a row, the run stops at {g.max_failed_grading_steps or 'never'}); "
                              f"last: {detail[:300]}")
                if step % g.log_every == 0:
                    writer.write("grpo", step, row)
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward_mean']:.3f}", lag=row["lag_max"])
                grading_down = (bool(g.max_failed_grading_steps) and down >= g.max_failed_grading_steps
                                and step < g.steps)
                stopping = stop.agreed() or grading_down
                if ckpt.save(step, state, sampler.state(), force=step == g.steps or stopping):
                    fault_point(f"grpo:save:{step}")
                if grading_down:
                    raise GradingDownError(
                        f"grpo: every grader call failed in {down} consecutive steps (grpo.max_failed_grading_steps="
                        f"{g.max_failed_grading_steps}); stopped with a checkpoint at step {step} in {ckpt_dir}; "
                        f"the last failure: {detail[:300]}. Fix the judge, then re-run the same command to resume.")
    finally:
        if producer is not None:
            producer.stop()
        bar.close()
        ckpt.close()
        for e in {id(engine): engine, id(summarizer): summarizer}.values():
            close = getattr(e, "close", None)  # a vLLM engine goes back to the launcher's factory
            if close is not None:
                close()
    if step < g.steps:
        raise KeyboardInterrupt(f"grpo stopped at step {step}; checkpoint saved in {ckpt_dir}")
    if remote:
        producer.close()  # the stage is done: the workers exit
    return ckpt_dir


def drop_stale(ro: Rollouts, version: int, max_lag: int) -> tuple[Rollouts, int]:
    """Removes groups sampled more than max_lag policy versions ago; returns them counted."""
    keep = [i for i, group in enumerate(ro.completions) if version - min(c.policy_version for c in group) <= max_lag]
    if len(keep) == len(ro.completions):
        return ro, 0
    stale = sum(len(ro.completions[i]) for i in range(len(ro.completions)) if i not in keep)
    pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
    summaries = pick(ro.summary_tokens) if ro.summary_tokens else []
    return dataclasses.replace(ro, states=pick(ro.states), completions=pick(ro.completions), grades=pick(ro.grades),
                               problems=pick(ro.problems), summary_tokens=summaries), stale


def make_ref_logprobs(graphdef, params, g: GRPOConfig, mesh, rules):
    """Logprobs of the frozen reference policy (the starting point) for the KL penalty: device batch
    (train.put_batch's) -> ref_logp [micro, rows, T], sharded like the batch. It never leaves the
    devices (on several processes no host holds the whole batch)."""
    ref = jax.tree.map(lambda x: x.copy(), params)

    @functools.partial(jax.jit, out_shardings=train.micro_batch_sharding(mesh, rules, 3))
    def fn(ref_params, batch):
        model = nnx.merge(graphdef, ref_params)

        def one(micro):
            logp, _ = train.token_logprobs(model, micro["tokens"], micro["targets"], positions=micro["positions"],
                                           segment_ids=micro["segment_ids"], temperature=g.sampling.temperature,
                                           with_entropy=False)
            return logp

        return jax.lax.map(one, batch)

    keys = ("tokens", "targets", "positions", "segment_ids")
    return lambda batch: fn(ref, {k: batch[k] for k in keys})
