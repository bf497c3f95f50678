"""Benchmark loaders: IMO-ProofBench, IMO-AnswerBench and ProofBench-style (problem + marking scheme).

A benchmark is a list of `Problem`s. Each carries the references its grader needs, under the keys of
`qedjax.rewards.GradeItem.references`:

| format          | grader                    | references              | groups            |
|-----------------|---------------------------|-------------------------|-------------------|
| imo-proofbench  | judge, ProofBench style   | solution, guidelines    | category, level   |
| imo-answerbench | answer check (+ judge)    | answer                  | category          |
| proofbench      | judge, rubric style       | marking_scheme          | category, level   |
| rules           | rule grader               | rubric (JSON)           | category, level   |

Rows come from a CSV, JSONL/JSON or Parquet file, or a dataset directory saved with the `datasets`
library (`save_to_disk`). Column names default to those of the IMO-Bench CSVs and can be remapped
per field in the config. IMO-Bench v2 itself ships in qedjax/imobench/ (with its source and licence,
CC-BY 4.0): an imo-proofbench or imo-answerbench section without a `path` reads it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from qedjax.rows import BAD_ROWS, BadRowError, read_jsonl

# Per format: field -> default column. Fields other than id/problem/category/level are references.
FORMATS: dict[str, dict[str, str]] = {
    "imo-proofbench": {
        "id": "Problem ID",
        "problem": "Problem",
        "solution": "Solution",
        "guidelines": "Grading guidelines",
        "category": "Category",
        "level": "Level",
    },
    "imo-answerbench": {
        "id": "Problem ID",
        "problem": "Problem",
        "answer": "Short Answer",
        "category": "Category",
    },
    "proofbench": {
        "id": "id",
        "problem": "problem",
        "marking_scheme": "marking_scheme",
        "category": "category",
        "level": "level",
    },
    # Regex-checkpoint rubrics (JSON) for RuleGrader: the embedded demo's eval.jsonl.
    "rules": {
        "id": "id",
        "problem": "problem",
        "rubric": "rubric",
        "category": "category",
        "level": "level",
    },
}
# Fields a row may lack: the id falls back to the row number, groups to "".
OPTIONAL_FIELDS = ("id", "category", "level")
JUDGE_STYLES = {"imo-proofbench": "proofbench", "proofbench": "rubric"}
# The IMO-Bench v2 CSVs shipped with the package: the default file of their formats.
IMOBENCH_DIR = Path(__file__).resolve().parent / "imobench"
SHIPPED = {"imo-proofbench": "proofbench_v2.csv", "imo-answerbench": "answerbench_v2.csv"}


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    """Which benchmark file to read and which of its problems to keep."""

    path: str = ""  # the rows' file or directory; "" for imo-* formats: the shipped IMO-Bench v2 CSV
    format: str = "imo-proofbench"  # a key of FORMATS
    name: str = ""  # label in reports; defaults to the format
    split: str = ""  # for a saved DatasetDict: which split ("" = the only one)
    columns: Mapping[str, str] = dataclasses.field(default_factory=dict)  # field -> column overrides
    categories: tuple[str, ...] = ()  # keep only these categories (empty: all)
    levels: tuple[str, ...] = ()  # keep only these levels (empty: all)
    subset: int = 0  # keep this many problems, a fixed seeded choice (0: all); for smoke runs
    subset_seed: int = 0
    bad_rows: str = "error"  # error | skip: rows that are not JSON, lack a column, or hold an empty/wrong value

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"benchmark format must be one of {sorted(FORMATS)}, got {self.format!r}")
        if not self.path and self.format in SHIPPED:
            object.__setattr__(self, "path", str(IMOBENCH_DIR / SHIPPED[self.format]))
        unknown = set(self.columns) - set(FORMATS[self.format]) - set(OPTIONAL_FIELDS)
        if unknown:
            raise ValueError(f"unknown fields in benchmark columns for {self.format}: {sorted(unknown)}")
        if self.bad_rows not in BAD_ROWS:
            raise ValueError(f"benchmark bad_rows must be one of {BAD_ROWS}, got {self.bad_rows!r}")
        if self.subset < 0:
            raise ValueError(f"benchmark subset must be >= 0, got {self.subset}")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One benchmark problem with what grading it needs."""

    id: str
    problem: str
    references: Mapping[str, str]  # GradeItem.references for this benchmark's grader
    category: str = ""
    level: str = ""


def is_answer_format(fmt: str) -> bool:
    """Whether problems of this format are graded by their final answer."""
    return fmt == "imo-answerbench"


def judge_style(fmt: str) -> str | None:
    """The JudgeConfig.style that grades proofs of this format (None for answer benchmarks)."""
    return JUDGE_STYLES.get(fmt)


def read_rows(path: str | os.PathLike, *, split: str = "") -> list[dict]:
    """Rows of a CSV, JSONL, JSON or Parquet file, or of a `datasets` directory (`save_to_disk`).

    Args:
        path: the file or directory.
        split: which split of a saved DatasetDict ("" when the directory holds a single split).

    Returns:
        One dict per row, column name -> value.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        import datasets  # only saved HF datasets need it

        data = datasets.load_from_disk(path)
        if isinstance(data, datasets.DatasetDict):
            if not split and len(data) != 1:
                raise ValueError(f"{path} holds splits {sorted(data)}; set benchmark.split")
            data = data[split] if split else next(iter(data.values()))
        return [dict(row) for row in data]
    if path.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if path.endswith(".jsonl"):
        return read_jsonl(path)[0]  # a syntax error names the file and line
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq  # comes with `datasets`

        return pq.read_table(path).to_pylist()
    raise ValueError(f"cannot read {path}: expected .csv, .jsonl, .json, .parquet or a dataset directory")


class MissingColumnError(BadRowError, KeyError):
    """A row lacks a required column (a KeyError too, as before rows named their file)."""

    def __str__(self):
        return str(self.args[0])


def to_problems(
    rows: Iterable[Mapping], fmt: str, columns: Mapping[str, str] | None = None, *,
    where: Sequence[str] | None = None, skipped: list[str] | None = None,
) -> list[Problem]:
    """Maps raw rows onto Problems.

    Args:
        rows: raw rows.
        fmt: a key of FORMATS.
        columns: field -> column overrides of the format's defaults.
        where: where each row came from ("FILE:LINE", "FILE: row N"), for error messages.
        skipped: when given, bad rows are skipped and their messages appended here.

    Returns:
        One Problem per good row, in order.

    Raises:
        KeyError (MissingColumnError): a row lacks a required column (the problem or a reference).
        ValueError (BadRowError): a required field is empty, or a value is not text.
    """
    mapping = {**FORMATS[fmt], **(columns or {})}
    problems = []
    for index, row in enumerate(rows):
        at = where[index] if where is not None else f"row {index}"
        try:
            problems.append(_problem(row, index, at, mapping))
        except BadRowError as e:
            if skipped is None:
                raise
            skipped.append(str(e))
    return problems


def _problem(row: Mapping, index: int, at: str, mapping: Mapping[str, str]) -> Problem:
    if not isinstance(row, Mapping):
        raise BadRowError(f"{at}: a {type(row).__name__}, expected a row of columns")
    values = {"category": "", "level": ""}
    for field, column in mapping.items():
        value = row.get(column)
        if value is None and field in OPTIONAL_FIELDS:
            value = str(index) if field == "id" else ""
        elif value is None:
            raise MissingColumnError(f"{at}: no column {column!r} for {field!r}; has {sorted(row)}")
        elif isinstance(value, (bool, list, dict)) or (field not in OPTIONAL_FIELDS and not isinstance(value, str)):
            raise BadRowError(f"{at}: {field!r} (column {column!r}) is {type(value).__name__}, expected text")
        elif not str(value).strip() and field not in OPTIONAL_FIELDS:
            # Graders refuse empty references; failing here beats failing mid-run.
            raise BadRowError(f"{at}: {field!r} (column {column!r}) is empty")
        values[field] = str(value).strip()
    references = {k: v for k, v in values.items() if k not in ("problem", *OPTIONAL_FIELDS)}
    return Problem(values["id"], values["problem"], references, values["category"], values["level"])


def select(
    problems: Sequence[Problem],
    *,
    categories: Sequence[str] = (),
    levels: Sequence[str] = (),
    subset: int = 0,
    seed: int = 0,
) -> list[Problem]:
    """Filters by category and level, then keeps a fixed seeded subset (in the original order).

    Args:
        problems: all problems.
        categories: keep only these categories (empty: all).
        levels: keep only these levels (empty: all).
        subset: how many to keep (0: all).
        seed: which subset; the same seed always picks the same problems.

    Returns:
        The kept problems, in their original order.
    """
    kept = [
        p
        for p in problems
        if (not categories or p.category in categories) and (not levels or p.level in levels)
    ]
    if subset and subset < len(kept):
        chosen = sorted(random.Random(seed).sample(range(len(kept)), subset))
        kept = [kept[i] for i in chosen]
    return kept


def load_benchmark(cfg: BenchmarkConfig) -> list[Problem]:
    """Reads, maps and filters a benchmark as its config says.

    Args:
        cfg: the benchmark config.

    Returns:
        The selected problems. Problem ids are unique (resuming relies on them).
    """
    if not cfg.path:
        raise FileNotFoundError(f"no benchmark file is set (format {cfg.format!r}; only {sorted(SHIPPED)} ship "
                                f"with qedjax)")
    if not os.path.exists(cfg.path):
        raise FileNotFoundError(f"benchmark file {cfg.path!r} does not exist")
    skipped: list[str] | None = [] if cfg.bad_rows == "skip" else None
    if os.fspath(cfg.path).endswith(".jsonl"):
        rows, where, bad = read_jsonl(cfg.path, skip_bad=skipped is not None)
        skipped = None if skipped is None else skipped + bad
    else:
        rows = read_rows(cfg.path, split=cfg.split)
        where = [f"{cfg.path}: row {i}" for i in range(len(rows))]
    problems = to_problems(rows, cfg.format, cfg.columns, where=where, skipped=skipped)
    if skipped:
        print(f"[qedjax] {cfg.path}: skipped {len(skipped)} bad row(s), kept {len(problems)} (bad_rows=skip); "
              f"first: {skipped[0]}")
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{cfg.path}: problem ids are not unique; map `id` to a unique column")
    return select(
        problems, categories=cfg.categories, levels=cfg.levels, subset=cfg.subset, seed=cfg.subset_seed
    )
