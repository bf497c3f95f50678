"""The SFT input pipeline: each process tokenizes and packs only the rows it feeds, inside grain.

A global batch is [micro_batches, rows, seq_len]; each of its `global_batch` positions is a
*stream* of its own. Every epoch the usable examples are shuffled (seeded by run.seed and the
epoch) and dealt round robin: the k-th example of an epoch goes to stream k % global_batch. A
stream reads its rows, tokenizes them and packs them first-fit into rows of `seq_len` next-token
pairs (grain's FirstFitPackIterDataset, PACKING_BINS rows at a time); each step takes one row from
every stream. A process runs only the streams of the batch positions its devices hold
(train.process_rows), so the batches, and the rows each process feeds, are the same on one process
and on several; every example is trained once per epoch.

The iterator state is one grain state per stream, keyed by stream: every process's streams are
gathered into the checkpoint, and each process takes its own back on resume.

Before anything compiles, every process checks its share of the rows (JSON, columns, types, the
chat template's prompt prefix: everything but tokenizing) and the processes exchange what they
found, so that a bad row is refused or skipped alike everywhere, named by file and line.
"""

from __future__ import annotations

import concurrent.futures
import json
from typing import Callable, Iterator, Mapping

import grain
import jax
import numpy as np

from qedjax import data as data_lib
from qedjax import multihost

# Rows a stream's packer fills at once: a new example goes into the first of them with room; one
# that fits none sends them all out. More bins pad less and hold more tokenized rows in memory.
PACKING_BINS = 8
FEATURES = ("tokens", "targets", "loss_mask")


def usable_rows(cfg: data_lib.DataConfig, tokenizer, rows) -> tuple[np.ndarray, dict]:
    """The indices of the usable rows of `rows` (the same on every process) and counts.

    Process p checks rows p, p + P, ...; the bad rows found are exchanged; `bad_rows=error` raises
    the first one (by file order) on every process, `skip` leaves them out everywhere.
    """
    p, n = jax.process_index(), jax.process_count()
    _, bad = data_lib.check_rows(cfg, tokenizer, rows, range(p, len(rows), n))
    bad = sorted(tuple(b) for share in multihost.allgather_json(bad) for b in share)
    data_lib.report_bad(cfg, bad)
    usable = np.setdiff1d(np.arange(len(rows)), np.asarray([i for i, _ in bad], np.int64))
    if not len(usable):
        raise ValueError(f"{cfg.path}: no usable rows ({len(rows)} rows, {len(bad)} bad)")
    return usable, {"rows": len(rows), "usable_rows": len(usable), "bad_rows": len(bad)}


def encoder(cfg: data_lib.DataConfig, tokenizer, rows, usable: np.ndarray) -> Callable[[int], dict | None]:
    """k (a position among the usable rows) -> the example's next-token pairs, or None if dropped.

    A stream that drops every example of an epoch (all too long with `overlong=drop`, or none with
    a target token) would never fill a row: the error says so instead of spinning.
    """
    dropped = [0]

    def one(k: int) -> dict | None:
        out = data_lib.encode(cfg, tokenizer, rows, int(usable[k]))
        if isinstance(out, str):
            dropped[0] += 1
            if dropped[0] > len(usable):
                raise ValueError(f"{cfg.path}: no usable examples: {dropped[0]} in a row were dropped "
                                 f"({out}; data.seq_len={cfg.seq_len}, data.overlong={cfg.overlong})")
            return None
        dropped[0] = 0
        ids, mask, _ = out
        return {"tokens": ids[:-1], "targets": ids[1:], "loss_mask": mask[1:]}

    return one


def pack(examples: grain.IterDataset, seq_len: int, packing: bool = True, pad_id: int = 0) -> grain.IterDataset:
    """Examples ({tokens, targets, loss_mask} of n pairs, n <= seq_len) -> rows of seq_len pairs:
    tokens, targets, loss_mask, segment_ids (1, 2, ... per example, 0 on padding) and positions
    (restarting at 0 per example). Without packing, one example per row."""
    if not packing:
        def pad(ex):
            n = len(ex["tokens"])
            out = {k: np.zeros(seq_len, np.int32) for k in data_lib.ARRAYS}
            for k in FEATURES:
                out[k][:n] = ex[k]
            out["tokens"][n:] = pad_id
            out["segment_ids"][:n] = 1
            out["positions"][:n] = np.arange(n)
            return out

        return examples.map(pad)
    packed = grain.experimental.FirstFitPackIterDataset(
        examples, length_struct={k: seq_len for k in FEATURES}, num_packing_bins=PACKING_BINS,
        shuffle_bins=False, padding_struct={"tokens": pad_id, "targets": 0, "loss_mask": 0})
    return packed.map(lambda r: {"tokens": r["tokens"], "targets": r["targets"], "loss_mask": r["loss_mask"],
                                 "segment_ids": r["tokens_segment_ids"], "positions": r["tokens_positions"]})


class Loader:
    """This process's part of each global batch, [micro_batches, len(rows), seq_len] per array.

    Args:
      examples: how many usable examples there are (one epoch).
      encode: k in [0, examples) -> next-token pairs or None (see `encoder`).
      rows: the rows of a micro-batch this process feeds (train.process_rows); all by default.
    """

    def __init__(self, examples: int, encode: Callable[[int], dict | None], *, global_batch: int,
                 seq_len: int, micro_batches: int = 1, seed: int = 0, shuffle: bool = True,
                 packing: bool = True, pad_id: int = 0, rows: slice | None = None):
        if global_batch % micro_batches:
            raise ValueError(f"global batch {global_batch} must divide by micro_batches ({micro_batches})")
        self.global_batch, self.micro_batches = global_batch, micro_batches
        per_micro = global_batch // micro_batches
        rows = rows or slice(0, per_micro)
        self._args = (examples, encode, seq_len, seed, shuffle, packing, pad_id)
        # micro-batch j, row r of the global batch is stream j * per_micro + r
        self.streams = [j * per_micro + r for j in range(micro_batches) for r in range(rows.start, rows.stop)]
        self._its = {s: iter(self._stream(s)) for s in self.streams}
        self._rows = rows.stop - rows.start
        # One batch is tokenized and packed ahead, in a thread, while the step runs (the tokenizer
        # releases the GIL); the state handed out is the one after the last batch taken.
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sft-input")
        self._ahead: concurrent.futures.Future | None = None
        self._state = self._states()

    def _stream(self, s: int, epochs: int | None = None) -> grain.IterDataset:
        examples, encode, seq_len, seed, shuffle, packing, pad_id = self._args
        ds = grain.MapDataset.range(examples)
        if shuffle:
            ds = ds.shuffle(seed=seed)  # a new order every epoch
        ds = ds.repeat(epochs)[s::self.global_batch].map(encode)
        # no read-ahead threads: grain's default (16 threads, 500 examples ahead) would hold
        # hundreds of tokenized long rows per stream and share one tokenizer between threads
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        return pack(ds.filter(lambda ex: ex is not None), seq_len, packing, pad_id)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def _produce(self) -> tuple[dict[str, np.ndarray], dict]:
        rows = [next(self._its[s]) for s in self.streams]
        batch = {k: np.stack([r[k] for r in rows]).reshape(self.micro_batches, self._rows, -1)
                 for k in data_lib.ARRAYS}
        return batch, self._states()

    def __next__(self) -> dict[str, np.ndarray]:
        batch, self._state = (self._ahead or self._pool.submit(self._produce)).result()
        self._ahead = self._pool.submit(self._produce)
        return batch

    def close(self) -> None:
        """Drops the batch read ahead (a read already running finishes in its thread)."""
        if self._ahead is not None:
            self._ahead.cancel()
            self._ahead = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    def first_epoch(self) -> Iterator[dict[str, np.ndarray]]:
        """The rows this process's streams pack the first epoch into, stream by stream, each holding
        a packing's rows in its order (the training batches hold the same rows, one per stream per
        step, until a stream's packer reaches the next epoch)."""
        for s in self.streams:
            yield from self._stream(s, epochs=1)

    def rows_in_first_epoch(self) -> int:
        """How many rows `first_epoch` has: tokenizes this process's share once, keeping nothing.
        For the step count of `sft.epochs`."""
        return sum(1 for _ in self.first_epoch())

    def _states(self) -> dict:
        return json.loads(json.dumps({"global_batch": self.global_batch, "examples": self._args[0],
                                      "streams": {str(s): it.get_state() for s, it in self._its.items()}}))

    def get_state(self) -> dict:
        """The streams' states after the last batch taken (not the one read ahead)."""
        return self._state

    def set_state(self, state: Mapping) -> None:
        """Takes this process's streams' states from `state` (every process's, see gather_state)."""
        saved, shape = state.get("streams", {}), (state.get("global_batch"), state.get("examples"))
        if shape != (self.global_batch, self._args[0]) or any(str(s) not in saved for s in self.streams):
            raise ValueError(f"the checkpoint's data state (global batch, usable rows: {shape}, {len(saved)} "
                             f"streams) does not match this run's ({self.global_batch}, {self._args[0]}): "
                             f"the data or sft.global_batch changed since it was written")
        if self._ahead is not None and not self._ahead.cancel():
            concurrent.futures.wait([self._ahead])  # a read already running finishes first
        self._ahead = None
        for s in self.streams:
            self._its[s].set_state(saved[str(s)])
        self._state = self._states()


def gather_state(loader: Loader) -> dict:
    """Every process's streams' states in one dict (a collective: all processes call it)."""
    parts = multihost.allgather_json(loader.get_state())
    return {**parts[0], "streams": {s: st for part in parts for s, st in part["streams"].items()}}
