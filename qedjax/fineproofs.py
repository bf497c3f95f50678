"""Preparation of the released datasets, FineProofs-SFT and FineProofs-RL, into what the stages read.

    python -m qedjax.fineproofs sft FineProofs-SFT/ data/fineproofs-sft-unique.jsonl
    python -m qedjax.fineproofs sft FineProofs-SFT/ data/fineproofs-sft-all.jsonl --all-rows
    python -m qedjax.fineproofs rl FineProofs-RL/ data/rl-problems.jsonl [--reward-mean-range 0 1]

Inputs are local copies (a parquet or jsonl file, or a directory saved with `datasets`); nothing is
downloaded. Every row is checked against the release's schema first: a missing or mistyped column is
an error naming the file, the row and the column.

FineProofs-SFT (7,777 rows; columns problem, reasoning_content, proof, category, competition,
gemini-3-pro-grade (0-7), qwen3-4b-thinking-reward@128, source, messages) becomes chat rows for the SFT
stage (qedjax.data): a user turn with the problem and an assistant turn whose `reasoning_content` is the
teacher's thinking and whose `content` is the proof (the chat template puts the thinking in the think
block). By default only one row per problem is kept, the unique-problem subset (4,281 problems) that
trained better in the paper; which row the paper kept is not stated, so here it is the best-graded one
(gemini-3-pro-grade, then the earlier row).

FineProofs-RL (5,227 problems; columns problem, source, rubrics (a string), scores (128 ints),
rewards, num_rewards, reward_mean, reward_std) becomes RL problems in the `proofbench` format
(qedjax.benchmarks: id, problem, marking_scheme, category), the rubric as the marking scheme. The
difficulty filter keeps problems whose reward_mean lies strictly inside a range, by default (0, 1):
problems the reference policy never or always solved carry no GRPO signal (ALGORITHMS.md). The
release filters by these difficulty annotations, but its exact thresholds are not known.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable, Mapping, Sequence

from qedjax.data import load_rows


class SchemaError(ValueError):
    """A row that does not match the release's schema; the message names the file, row and column."""


def _is_str(v) -> bool:
    return isinstance(v, str)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _list_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (list, tuple)) and all(check(x) for x in v)


def _is_grade(v) -> bool:
    return _is_int(v) and 0 <= v <= 7


# column -> (check, what it must be, may be null)
SFT_SCHEMA: dict[str, tuple[Callable[[Any], bool], str, bool]] = {
    "problem": (_is_str, "a string", False),
    "reasoning_content": (_is_str, "a string", False),
    "proof": (_is_str, "a string", False),
    "category": (_is_str, "a string", True),
    "competition": (_is_str, "a string", True),
    "gemini-3-pro-grade": (_is_grade, "an integer 0..7", True),
    "qwen3-4b-thinking-reward@128": (_is_number, "a number", True),
    "source": (_is_str, "a string", True),
    "messages": (_list_of(lambda m: isinstance(m, Mapping)), "a list of messages", True),
}
RL_SCHEMA: dict[str, tuple[Callable[[Any], bool], str, bool]] = {
    "problem": (_is_str, "a string", False),
    "source": (_is_str, "a string", True),
    "rubrics": (_is_str, "a string", False),
    "scores": (_list_of(_is_int), "a list of integers", False),
    "rewards": (_list_of(_is_number), "a list of numbers", False),
    "num_rewards": (_is_int, "an integer", False),
    "reward_mean": (_is_number, "a number", False),
    "reward_std": (_is_number, "a number", False),
}


def check_row(row: Mapping[str, Any], schema, path: str, index: int) -> None:
    """Raises SchemaError naming file, row and column for a missing or mistyped column."""
    for column, (check, what, nullable) in schema.items():
        if column not in row:
            raise SchemaError(f"{path}: row {index}: missing column {column!r} (has {sorted(row)})")
        value = row[column]
        if value is None and nullable:
            continue
        if not check(value):
            raise SchemaError(f"{path}: row {index}: column {column!r} is {type(value).__name__} "
                              f"{_short(value)}, expected {what}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_checked(path: str, schema) -> list[dict]:
    """The rows of a parquet / jsonl file or a saved dataset directory, each checked against `schema`."""
    try:
        ds = load_rows(path)
    except (FileNotFoundError, KeyError):
        raise
    except Exception as e:  # arrow could not build one type per column: find the row that breaks it
        if path.endswith((".jsonl", ".json")):
            _locate_in_jsonl(path, schema)
        raise SchemaError(f"{path}: cannot be read as a table ({type(e).__name__}: {e})") from e
    rows = []
    for i, row in enumerate(ds):
        check_row(row, schema, path, i)
        rows.append(dict(row))
    return rows


def _locate_in_jsonl(path: str, schema) -> None:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(x for x in f if x.strip()):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SchemaError(f"{path}: row {i}: not JSON ({e})") from None
            check_row(row, schema, path, i)


def sft_rows(rows: Sequence[Mapping[str, Any]], *, unique: bool = True) -> list[dict]:
    """Chat rows for the SFT stage (module docstring); with `unique`, one per problem."""
    keep = range(len(rows))
    if unique:
        best: dict[str, int] = {}
        for i, row in enumerate(rows):
            key = " ".join(row["problem"].split())
            j = best.get(key)
            if j is None or _grade(rows[i]) > _grade(rows[j]):
                best[key] = i
        keep = sorted(best.values())
    out = []
    for i in keep:
        row = rows[i]
        assistant = {"role": "assistant", "content": row["proof"]}
        if row["reasoning_content"]:
            assistant["reasoning_content"] = row["reasoning_content"]
        out.append({"id": f"fineproofs-sft-{i}", "messages": [{"role": "user", "content": row["problem"]}, assistant],
                    "source": row.get("source"), "category": row.get("category"),
                    "competition": row.get("competition"), "grade": row.get("gemini-3-pro-grade")})
    return out


def _grade(row) -> int:
    grade = row.get("gemini-3-pro-grade")
    return -1 if grade is None else grade


def rl_problems(rows: Sequence[Mapping[str, Any]], *, reward_mean_range: tuple[float, float] = (0.0, 1.0)
                ) -> list[dict]:
    """RL problems in the proofbench format, those with low < reward_mean < high (module docstring)."""
    low, high = reward_mean_range
    return [{"id": f"fineproofs-rl-{i}", "problem": row["problem"], "marking_scheme": row["rubrics"],
             "category": row.get("source") or "", "reward_mean": float(row["reward_mean"])}
            for i, row in enumerate(rows) if low < row["reward_mean"] < high]


def write_jsonl(rows: Sequence[Mapping[str, Any]], out: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".part"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out)


def prepare_sft(path: str, out: str, *, unique: bool = True) -> dict:
    rows = read_checked(path, SFT_SCHEMA)
    chats = sft_rows(rows, unique=unique)
    write_jsonl(chats, out)
    return {"rows": len(rows), "written": len(chats)}


def prepare_rl(path: str, out: str, *, reward_mean_range: tuple[float, float] = (0.0, 1.0)) -> dict:
    rows = read_checked(path, RL_SCHEMA)
    problems = rl_problems(rows, reward_mean_range=reward_mean_range)
    write_jsonl(problems, out)
    return {"rows": len(rows), "written": len(problems)}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m qedjax.fineproofs", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="dataset", required=True)
    sft = sub.add_parser("sft", help="FineProofs-SFT -> SFT chat rows (jsonl)")
    sft.add_argument("input")
    sft.add_argument("output")
    sft.add_argument("--all-rows", action="store_true", help="keep every row, not one per problem")
    rl = sub.add_parser("rl", help="FineProofs-RL -> RL problems (jsonl, proofbench format)")
    rl.add_argument("input")
    rl.add_argument("output")
    rl.add_argument("--reward-mean-range", nargs=2, type=float, default=(0.0, 1.0), metavar=("LOW", "HIGH"),
                    help="keep problems with LOW < reward_mean < HIGH (default 0 1)")
    args = parser.parse_args(argv)
    if args.dataset == "sft":
        stats = prepare_sft(args.input, args.output, unique=not args.all_rows)
    else:
        stats = prepare_rl(args.input, args.output, reward_mean_range=tuple(args.reward_mean_range))
    print(f"{args.input}: {stats['rows']} rows -> {stats['written']} written to {args.output}")
    return stats


if __name__ == "__main__":
    main()
