"""JSONL rows that remember where they came from, so that a malformed line is reported by file and
line number (json.loads alone says `Expecting ',' delimiter: line 1 column 12`, naming neither).

Shared by the SFT data (data.py) and the problem sets (benchmarks.py); both apply their section's
`bad_rows` policy: "error" stops at the first bad row, "skip" drops it and counts it.
"""

from __future__ import annotations

import json
import os

BAD_ROWS = ("error", "skip")


class BadRowError(ValueError):
    """A row that cannot be used; the message names the file and the row or line."""


def read_jsonl(path: str | os.PathLike, *, skip_bad: bool = False) -> tuple[list[dict], list[str], list[str]]:
    """The JSON objects of a JSONL file, one per non-blank line.

    Args:
      path: the file.
      skip_bad: skip lines that are not valid JSON objects instead of raising.

    Returns:
      (rows, where, skipped): the rows, where each came from ("FILE:LINE"), and one message per
      skipped line.

    Raises:
      BadRowError: a line is not valid JSON or not an object (unless skip_bad).
    """
    path = os.fspath(path)
    rows, where, skipped = [], [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            at = f"{path}:{number}"
            try:
                row = json.loads(line)
                problem = None if isinstance(row, dict) else f"a JSON {type(row).__name__}, expected an object"
            except json.JSONDecodeError as e:
                problem = f"not valid JSON ({e.msg} at column {e.colno})"
            if problem is not None:
                if not skip_bad:
                    raise BadRowError(f"{at}: {problem}")
                skipped.append(f"{at}: {problem}")
                continue
            rows.append(row)
            where.append(at)
    return rows, where, skipped
