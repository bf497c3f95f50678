"""Stage 1, SFT: masked next-token cross-entropy and the training loop.

The loss is the mean over the target tokens of the global batch (assistant tokens only): every
micro-batch contributes its sum, the step divides by the batch's target-token count.
"""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from qedjax import data as data_lib
from qedjax import loader as loader_lib
from qedjax import multihost, train
from qedjax.checkpoint import Checkpointer, StopRequest, fault_point
from qedjax.metrics import MetricsWriter
from qedjax.optim import learning_rate, make_optimizer
from qedjax.sharding import TRAIN_RULES


def sft_loss(model, batch):
    """Summed cross-entropy of one micro-batch; metrics are sums too."""
    logp, _ = train.token_logprobs(model, batch["tokens"], batch["targets"], positions=batch["positions"],
                                   segment_ids=batch["segment_ids"], with_entropy=False)
    mask = batch["loss_mask"].astype(jnp.float32)
    return -jnp.sum(logp * mask), {"target_tokens": jnp.sum(mask),
                                   "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)}


def target_tokens(batch):
    return jnp.sum(batch["loss_mask"].astype(jnp.float32))


def make_step(graphdef, optimizer, shardings, mesh, rules):
    """The jitted SFT step (train.make_train_step with the SFT loss) for [micro, rows, T] batches."""
    batch_sh = {k: train.micro_batch_sharding(mesh, rules, 3) for k in data_lib.ARRAYS}
    return train.make_train_step(graphdef, sft_loss, target_tokens, optimizer, shardings, batch_sh, mesh, rules)


def batch_shapes(sft, mesh, rules) -> dict[str, jax.ShapeDtypeStruct]:
    """The step's batch as ShapeDtypeStructs: [micro_batches, global_batch / micro_batches, seq_len] int32."""
    shape = (sft.micro_batches, sft.global_batch // sft.micro_batches, sft.data.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=train.micro_batch_sharding(mesh, rules, 3))
            for k in data_lib.ARRAYS}


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist (set model.tokenizer)")
    return AutoTokenizer.from_pretrained(path)


class NonFiniteError(RuntimeError):
    pass


def run(cfg, mesh, run_dir: str, writer: MetricsWriter, *, tokenizer_path: str, rules=TRAIN_RULES) -> str:
    """Runs (or resumes, or skips if finished) the SFT stage; returns its checkpoint directory."""
    sft = cfg.sft
    tokenizer = load_tokenizer(tokenizer_path)
    rows = data_lib.open_rows(sft.data)
    usable, stats = loader_lib.usable_rows(sft.data, tokenizer, rows)  # bad rows refused before compiling
    loader = loader_lib.Loader(
        len(usable), loader_lib.encoder(sft.data, tokenizer, rows, usable), global_batch=sft.global_batch,
        seq_len=sft.data.seq_len, micro_batches=sft.micro_batches, seed=cfg.run.seed, shuffle=sft.data.shuffle,
        packing=sft.data.packing, pad_id=tokenizer.pad_token_id or 0,
        rows=train.process_rows(mesh, rules, sft.global_batch // sft.micro_batches))
    total = sft.steps
    if not total:  # epochs: count the rows of one epoch (every process packs its share once)
        packed = sum(multihost.allgather_json(loader.rows_in_first_epoch()))
        stats["rows_packed"] = packed
        total = max(1, math.ceil(sft.epochs * (packed // sft.global_batch)))

    def data_state():  # every process's streams: a collective, run only on the steps that save
        return loader_lib.gather_state(loader)

    optimizer = make_optimizer(sft.optim, total)
    lr = learning_rate(sft.optim, total)
    config, graphdef, params = train.init_params(cfg.model, mesh, rules, seed=cfg.run.seed,
                                                 vocab_size=len(tokenizer))
    state, shardings = train.init_state(params, optimizer, mesh)
    ckpt_dir = os.path.join(cfg.run.checkpoint_dir or run_dir, "sft", "checkpoints")
    ckpt = Checkpointer(ckpt_dir, sft.checkpoint)
    start = ckpt.latest_step() or 0
    if start:
        state, saved_data = ckpt.restore(jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
        start = ckpt.restored_step
        loader.set_state(saved_data)
    if start >= total:
        ckpt.close()
        loader.close()
        return ckpt_dir
    writer.rewind("sft", start)  # rows a killed run logged past its last checkpoint are logged again
    if not start:
        writer.write("sft", start, {"event": "start", "total_steps": total,
                                    **{f"data_{k}": v for k, v in stats.items()}})
    elif jax.process_index() == 0:
        print(f"[qedjax] sft: resuming from the checkpoint of step {start} in {ckpt_dir}")
    step_fn = make_step(graphdef, optimizer, shardings, mesh, rules)
    bad = 0
    bar = tqdm(total=total, initial=start, desc="sft", disable=jax.process_index() != 0, dynamic_ncols=True,
               mininterval=2.0)
    stopping = False
    with StopRequest() as stop:
        step = start
        while step < total:
            t0 = time.perf_counter()
            batch = train.put_batch(next(loader), mesh, rules)
            state, m = step_fn(state, batch)
            fault_point(f"sft:step:{step + 1}")
            m = jax.device_get(m)
            dt = time.perf_counter() - t0
            bad = bad + 1 if m["skipped"] else 0
            step = int(state["step"]) if not m["skipped"] else step
            row = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "lr": float(lr(step - 1)),
                   "skipped": int(m["skipped"]), "target_tokens": float(m["target_tokens"]),
                   "tokens_per_s": float(m["tokens"]) / dt, "step_time_s": dt}
            if (step % sft.log_every == 0) or bad:
                writer.write("sft", step, row)
            bar.update(0 if m["skipped"] else 1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if bad >= sft.max_bad_steps:
                ckpt.save(step, state, data_state, force=True)
                ckpt.close()
                loader.close()
                raise NonFiniteError(f"sft: {bad} consecutive steps had a non-finite loss or gradient "
                                     f"(last loss {row['loss']}); stopped with a checkpoint at step {step} "
                                     f"in {ckpt_dir}. Lower optim.lr or check the data.")
            if not m["skipped"] and ckpt.save(step, state, data_state, force=step == total):
                fault_point(f"sft:save:{step}")
            stopping = stop.agreed()
            if stopping:
                ckpt.save(step, state, data_state, force=True)
                break
    bar.close()
    ckpt.close()
    loader.close()
    if stopping:
        raise KeyboardInterrupt(f"sft stopped at step {step}; checkpoint saved in {ckpt_dir}")
    return ckpt_dir
