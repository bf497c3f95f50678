"""SFT data: rows from local files read on demand, their checks, and chat formatting with
assistant-only loss masks. The grain pipeline that tokenizes and packs them, a share per process,
is qedjax.loader.

A row is either a chat (`messages`: a list of {role, content[, reasoning_content]}) or
FineProofs-style columns (problem, reasoning, final proof), mapped by `DataConfig.columns`. The
tokenizer's chat template renders it; the loss covers the last assistant turn only (its thinking
block, its answer and the end-of-turn token).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from qedjax.rows import BadRowError

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


def render_chat(tokenizer, messages: Sequence[Mapping[str, str]], where: str = "row") -> tuple[str, str]:
    """(prompt, completion) text of a chat: the prompt is everything before the last turn plus the
    generation prompt, the completion is the last assistant turn as the template renders it.

    The prompt must render as a prefix of the whole chat: true of Qwen3 templates; anything else is
    an error naming the row (the assistant tokens could not be masked).
    """
    prompt = tokenizer.apply_chat_template(list(messages[:-1]), tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(list(messages), tokenize=False)
    if not full.startswith(prompt):
        raise BadRowError(f"{where}: the chat template does not render the prompt as a prefix of the "
                          f"conversation, so the assistant tokens cannot be masked")
    return prompt, full[len(prompt):]


def tokenize_chat(tokenizer, messages: Sequence[Mapping[str, str]], where: str = "row"):
    """(ids, loss_mask) of a chat; the mask is 1 on the last assistant turn's tokens."""
    prompt, completion = render_chat(tokenizer, messages, where)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return np.asarray(p + a, np.int32), np.asarray([0] * len(p) + [1] * len(a), np.int32)


def _is_jsonl(cfg: DataConfig) -> bool:
    return cfg.format == "jsonl" or (cfg.format == "auto" and cfg.path.lower().endswith(".jsonl"))


class JsonlRows:
    """Random access to the rows of a JSONL file without holding them: one pass over the bytes
    records where each non-blank line starts and ends; a row is read (os.pread: no shared file
    position, so threads may read at once) and parsed when asked for. A line that is not a JSON
    object raises BadRowError naming FILE:LINE (json.loads alone names neither)."""

    def __init__(self, path: str):
        self._fd: int | None = None
        if not os.path.exists(path):
            raise FileNotFoundError(f"data file {path!r} does not exist")
        spans, numbers, at = [], [], 0
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    spans.append((at, len(line)))
                    numbers.append(number)
                at += len(line)
        self.path = path
        self._spans = np.asarray(spans, np.int64).reshape(-1, 2)  # [rows, (offset, length)]
        self._lines = np.asarray(numbers, np.int64)

    def __len__(self) -> int:
        return len(self._spans)

    def place(self, i: int) -> str:
        return f"{self.path}:{self._lines[i]}"

    def __getitem__(self, i: int) -> dict:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        offset, length = (int(x) for x in self._spans[i])
        try:
            row = json.loads(os.pread(self._fd, length, offset))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRowError(f"{self.place(i)}: not valid JSON ({getattr(e, 'msg', e)} at column "
                              f"{getattr(e, 'colno', '?')})") from None
        if not isinstance(row, dict):
            raise BadRowError(f"{self.place(i)}: a JSON {type(row).__name__}, expected an object")
        return row

    def __del__(self):
        if self._fd is not None:
            os.close(self._fd)


class TableRows:
    """Random access to the rows of a `datasets.Dataset` (memory-mapped Arrow: not held in memory)."""

    def __init__(self, ds, path: str):
        self.ds, self.path = ds, path

    def __len__(self) -> int:
        return len(self.ds)

    def place(self, i: int) -> str:
        return f"{self.path}: row {i}"

    def __getitem__(self, i: int) -> dict:
        return self.ds[int(i)]


def open_rows(cfg: DataConfig):
    """The rows of `cfg.path` (JsonlRows or TableRows, cut to `max_rows`), nothing parsed yet."""
    if _is_jsonl(cfg):
        rows = JsonlRows(cfg.path)
    else:
        rows = TableRows(load_rows(cfg.path, cfg.format, cfg.split), cfg.path)
    if cfg.max_rows is not None and cfg.max_rows < len(rows):
        rows = _First(rows, cfg.max_rows)
    return rows


class _First:
    def __init__(self, rows, n: int):
        self.rows, self.n, self.path = rows, n, rows.path

    def __len__(self) -> int:
        return self.n

    def place(self, i: int) -> str:
        return self.rows.place(i)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def chat(cfg: DataConfig, rows, i: int) -> list[dict[str, str]]:
    """The chat of row i; BadRowError naming the row if it cannot be used."""
    return row_messages(rows[i], cfg.columns, rows.place(i), cfg.system_prompt)


def check_rows(cfg: DataConfig, tokenizer, rows, indices) -> tuple[list[int], list[tuple[int, str]]]:
    """(usable, bad): which of `indices` pass every check that needs no tokenizing (valid JSON,
    columns, types, the template's prompt prefix), and (index, message) per bad row. With
    `bad_rows=error` the scan stops at the first bad row; the caller raises (so that several
    processes can agree first)."""
    usable, bad = [], []
    for i in indices:
        try:
            render_chat(tokenizer, chat(cfg, rows, i), rows.place(i))
        except BadRowError as e:
            bad.append((int(i), str(e)))
            if cfg.bad_rows == "error":
                break
            continue
        usable.append(int(i))
    return usable, bad


def encode(cfg: DataConfig, tokenizer, rows, i: int) -> tuple[np.ndarray, np.ndarray, bool] | str:
    """(ids, loss_mask, cut) of row i, cut to seq_len + 1 tokens if `overlong=truncate`; or why it
    is dropped: "dropped_overlong" or "dropped_no_target" (no target token left)."""
    ids, mask = tokenize_chat(tokenizer, chat(cfg, rows, i), rows.place(i))
    cut = len(ids) > cfg.seq_len + 1
    if cut:
        if cfg.overlong == "drop":
            return "dropped_overlong"
        ids, mask = ids[: cfg.seq_len + 1], mask[: cfg.seq_len + 1]
    if not mask[1:].any():
        return "dropped_no_target"
    return ids, mask, cut


def report_bad(cfg: DataConfig, bad: Sequence[tuple[int, str]]) -> None:
    """Raises the first bad row's error (`bad_rows=error`) or prints how many were skipped."""
    if not bad:
        return
    first = min(bad)[1]
    if cfg.bad_rows == "error":
        raise BadRowError(first)
    print(f"[qedjax] {cfg.path}: skipped {len(bad)} bad row(s) (data.bad_rows=skip); first: {first}")


def build_examples(cfg: DataConfig, tokenizer):
    """Every tokenized (ids, mask) example of a data file in file order, and counts of what was
    dropped or cut: the whole file in one process, as the SFT stage's pipeline (qedjax.loader) reads
    it a share at a time. Bad rows follow `cfg.bad_rows`."""
    rows = open_rows(cfg)
    usable, bad = check_rows(cfg, tokenizer, rows, range(len(rows)))
    report_bad(cfg, bad)
    stats = {"rows": len(rows), "examples": 0, "bad_rows": len(bad), "truncated": 0,
             "dropped_overlong": 0, "dropped_no_target": 0}
    examples = []
    for i in usable:
        out = encode(cfg, tokenizer, rows, i)
        if isinstance(out, str):
            stats[out] += 1
            continue
        stats["truncated"] += out[2]
        examples.append(out[:2])
    stats["examples"] = len(examples)
    if not examples:
        raise ValueError(f"{cfg.path}: no usable examples ({stats})")
    return examples, stats
