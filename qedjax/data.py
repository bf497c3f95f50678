"""SFT data: rows from local files, chat formatting with assistant-only loss masks, packing, and a
grain pipeline whose iterator state is checkpointed.

A row is either a chat (`messages`: a list of {role, content[, reasoning_content]}) or
FineProofs-style columns (problem, reasoning, final proof), mapped by `DataConfig.columns`. The
tokenizer's chat template renders it; the loss covers the last assistant turn only (its thinking
block, its answer and the end-of-turn token). Examples are packed several to a row of `seq_len`
tokens with segment ids (1, 2, ... per example, 0 for padding) and restarting positions.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np

from qedjax.rows import BadRowError, read_jsonl

FORMATS = ("auto", "jsonl", "json", "parquet", "csv", "hf")
ARRAYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class Columns:
    """Which column holds what. A row with a non-empty `messages` column uses it; otherwise the
    problem / reasoning / answer columns build a user turn and an assistant turn."""

    messages: str = "messages"
    problem: str = "problem"
    reasoning: str = "reasoning_content"  # may be absent: no thinking block content
    answer: str = "proof"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str = ""
    format: str = "auto"  # auto | jsonl | json | parquet | csv | hf (a saved HF dataset dir)
    split: str = "train"  # for saved DatasetDicts
    columns: Columns = Columns()
    system_prompt: str | None = None
    seq_len: int = 1024
    packing: bool = True
    overlong: str = "truncate"  # truncate | drop: examples longer than seq_len + 1 tokens
    bad_rows: str = "error"  # error | skip: rows with a missing column, empty text or wrong type
    shuffle: bool = True
    max_rows: int | None = None

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"data.format must be one of {FORMATS}, got {self.format!r}")
        if self.overlong not in ("truncate", "drop"):
            raise ValueError(f"data.overlong must be 'truncate' or 'drop', got {self.overlong!r}")
        if self.bad_rows not in ("error", "skip"):
            raise ValueError(f"data.bad_rows must be 'error' or 'skip', got {self.bad_rows!r}")
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len must be >= 2, got {self.seq_len}")




def load_rows(path: str, format: str = "auto", split: str = "train"):
    """A `datasets.Dataset` from a local file or a saved HF dataset directory."""
    import datasets

    datasets.disable_progress_bars()
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    if format == "auto":
        if os.path.isdir(path):
            format = "hf"
        else:
            ext = os.path.splitext(path)[1].lower().lstrip(".")
            format = {"jsonl": "jsonl", "json": "json", "parquet": "parquet", "csv": "csv"}.get(ext)
            if format is None:
                raise ValueError(f"{path}: cannot tell the format from the extension; set data.format")
    if format == "hf":
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise KeyError(f"{path}: no split {split!r} (has {list(ds)})")
            ds = ds[split]
        return ds
    builder = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}[format]
    return datasets.load_dataset(builder, data_files=path, split="train")


def _text(row: Mapping[str, Any], column: str, where: str, required: bool = True) -> str | None:
    if column not in row or row[column] is None:
        if required:
            raise BadRowError(f"{where}: missing column {column!r}")
        return None
    value = row[column]
    if not isinstance(value, str):
        raise BadRowError(f"{where}: column {column!r} is {type(value).__name__}, expected a string")
    if required and not value.strip():
        raise BadRowError(f"{where}: column {column!r} is empty")
    return value


def row_messages(row: Mapping[str, Any], cols: Columns, where: str,
                 system_prompt: str | None = None) -> list[dict[str, str]]:
    """The chat of one row (the last message is the assistant turn to learn)."""
    messages = row.get(cols.messages)
    if messages:
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, Mapping) for m in messages):
            raise BadRowError(f"{where}: column {cols.messages!r} is not a list of messages")
        out = []
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if not isinstance(role, str) or not isinstance(content, str):
                raise BadRowError(f"{where}: message {i} needs string 'role' and 'content'")
            msg = {"role": role, "content": content}
            if isinstance(m.get("reasoning_content"), str) and m["reasoning_content"]:
                msg["reasoning_content"] = m["reasoning_content"]
            out.append(msg)
        if out[-1]["role"] != "assistant" or not (out[-1]["content"].strip() or out[-1].get("reasoning_content")):
            raise BadRowError(f"{where}: the last message must be a non-empty assistant turn")
    else:
        problem = _text(row, cols.problem, where)
        answer = _text(row, cols.answer, where)
        reasoning = _text(row, cols.reasoning, where, required=False)
        assistant = {"role": "assistant", "content": answer}
        if reasoning:
            assistant["reasoning_content"] = reasoning
        out = [{"role": "user", "content": problem}, assistant]
    if system_prompt and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


def tokenize_chat(tokenizer, messages: Sequence[Mapping[str, str]], where: str = "row"):
    """(ids, loss_mask) of a chat; the mask is 1 on the last assistant turn's tokens.

    The prompt (everything before the last turn, plus the generation prompt) must render as a prefix
    of the whole chat: true of Qwen3 templates; anything else is an error naming the row.
    """
    prompt = tokenizer.apply_chat_template(list(messages[:-1]), tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(list(messages), tokenize=False)
    if not full.startswith(prompt):
        raise BadRowError(f"{where}: the chat template does not render the prompt as a prefix of the "
                          f"conversation, so the assistant tokens cannot be masked")
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    return np.asarray(p + a, np.int32), np.asarray([0] * len(p) + [1] * len(a), np.int32)


def _is_jsonl(cfg: DataConfig) -> bool:
    return cfg.format == "jsonl" or (cfg.format == "auto" and cfg.path.lower().endswith(".jsonl"))


def build_examples(cfg: DataConfig, tokenizer):
    """Tokenized (ids, mask) examples of a data file and counts of what was dropped or cut.

    JSONL is read line by line (a syntax error or a wrongly typed value names its line; `datasets`
    would report neither); other formats through `datasets`. Bad rows follow `cfg.bad_rows`.
    """
    skipped: list[str] = []
    if _is_jsonl(cfg):
        if not os.path.exists(cfg.path):
            raise FileNotFoundError(f"data file {cfg.path!r} does not exist")
        ds, places, skipped = read_jsonl(cfg.path, skip_bad=cfg.bad_rows == "skip")
    else:
        ds = load_rows(cfg.path, cfg.format, cfg.split)
        places = [f"{cfg.path}: row {i}" for i in range(len(ds))]
    if cfg.max_rows is not None:
        ds = ds[: cfg.max_rows] if isinstance(ds, list) else ds.select(range(min(cfg.max_rows, len(ds))))
    stats = {"rows": len(ds) + len(skipped), "examples": 0, "bad_rows": len(skipped), "truncated": 0,
             "dropped_overlong": 0, "dropped_no_target": 0}
    examples = []
    for i, row in enumerate(ds):
        where = places[i]
        try:
            ids, mask = tokenize_chat(tokenizer, row_messages(row, cfg.columns, where, cfg.system_prompt), where)
        except BadRowError as e:
            if cfg.bad_rows == "error":
                raise
            stats["bad_rows"] += 1
            skipped.append(str(e))
            continue
        if len(ids) > cfg.seq_len + 1:
            if cfg.overlong == "drop":
                stats["dropped_overlong"] += 1
                continue
            ids, mask = ids[: cfg.seq_len + 1], mask[: cfg.seq_len + 1]
            stats["truncated"] += 1
        if not mask[1:].any():
            stats["dropped_no_target"] += 1
            continue
        examples.append((ids, mask))
    stats["examples"] = len(examples)
    if skipped:
        print(f"[qedjax] {cfg.path}: skipped {len(skipped)} bad row(s) (data.bad_rows=skip); first: {skipped[0]}")
    if not examples:
        raise ValueError(f"{cfg.path}: no usable examples ({stats})")
    return examples, stats


def pack(examples: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, packing: bool = True,
         pad_id: int = 0) -> dict[str, np.ndarray]:
    """Packs examples into rows of seq_len next-token pairs.

    An example of n tokens gives n - 1 (input, target) pairs; first fit puts it into the first row
    with room. Returns arrays [rows, seq_len]: tokens, targets, loss_mask, segment_ids, positions.
    """
    rows: list[list[int]] = []  # example indices per row
    free: list[int] = []
    for i, (ids, _) in enumerate(examples):
        n = len(ids) - 1
        if n > seq_len:
            raise ValueError(f"example {i} has {n} positions, more than seq_len={seq_len}")
        slot = next((r for r in range(max(0, len(rows) - 64), len(rows)) if free[r] >= n), None) if packing else None
        if slot is None:
            rows.append([])
            free.append(seq_len)
            slot = len(rows) - 1
        rows[slot].append(i)
        free[slot] -= n
    out = {k: np.zeros((len(rows), seq_len), np.int32) for k in ARRAYS}
    out["tokens"][:] = pad_id
    for r, members in enumerate(rows):
        at = 0
        for seg, i in enumerate(members, start=1):
            ids, mask = examples[i]
            n = len(ids) - 1
            out["tokens"][r, at:at + n] = ids[:-1]
            out["targets"][r, at:at + n] = ids[1:]
            out["loss_mask"][r, at:at + n] = mask[1:]
            out["segment_ids"][r, at:at + n] = seg
            out["positions"][r, at:at + n] = np.arange(n)
            at += n
    return out


class Loader:
    """Batches of packed rows from a seeded grain pipeline, shaped [micro, rows, seq_len].

    Each process reads its own rows (index process_index of every process_count); one global batch
    is `global_batch` rows. The iterator state (`get_state`/`set_state`) goes into checkpoints, so a
    resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], *, global_batch: int, micro_batches: int = 1,
                 seed: int = 0, shuffle: bool = True, process_index: int = 0, process_count: int = 1):
        if global_batch % (micro_batches * process_count):
            raise ValueError(f"global batch {global_batch} must divide by micro_batches ({micro_batches}) "
                             f"x processes ({process_count})")
        self.arrays = dict(arrays)
        self.micro_batches = micro_batches
        self.rows = len(next(iter(arrays.values())))
        if self.rows < global_batch:
            raise ValueError(f"only {self.rows} packed rows, fewer than one global batch of {global_batch}")
        local = global_batch // process_count
        ds = grain.MapDataset.range(self.rows)
        if shuffle:
            ds = ds.shuffle(seed=seed)
        ds = ds.repeat(None)  # epochs are counted by the caller in steps
        ds = ds[process_index::process_count].batch(local, drop_remainder=True)
        self.steps_per_epoch = self.rows // global_batch
        self._it = iter(ds.to_iter_dataset())

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        idx = np.sort(np.asarray(next(self._it)))  # sorted: a gather in file order is cheaper
        m = self.micro_batches
        return {k: v[idx].reshape(m, len(idx) // m, *v.shape[1:]) for k, v in self.arrays.items()}

    def get_state(self) -> dict:
        return json.loads(json.dumps(self._it.get_state()))

    def set_state(self, state: Mapping) -> None:
        self._it.set_state(dict(state))
