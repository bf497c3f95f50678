"""Accuracy of the IMO-AnswerBench grader (qedjax.answers.check_answer) on the 400 real gold answers.

1. Self-acceptance: each gold, boxed, graded against itself, as written and rewritten the way a model
   might box it (`\\dfrac`, no `$`, list items in reverse order inside set braces). The same figure
   for plain math-verify (`verify(parse(gold), parse(boxed gold))`) is printed next to it.
2. Cross-rejection: each gold, boxed, graded against every other gold whose text differs (all
   ordered pairs by default, `--pairs N` for a random sample). Every accepted pair is printed, so
   a reader can check whether the two answers are in fact equal.

    python tools/bench_answers.py                 # all pairs: about 1.5 minutes on 2 cores
    python tools/bench_answers.py --pairs 3000    # the sample the test suite uses
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import pathlib
import random
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from qedjax import answers  # noqa: E402
from qedjax.answers import check_answer, clean, split_items  # noqa: E402

DEFAULT_CSV = pathlib.Path(__file__).resolve().parents[1] / "qedjax/imobench/answerbench_v2.csv"


def rewrite(gold: str) -> str:
    items = split_items(clean(gold))
    text = ", ".join(reversed(items)).replace("\\frac", "\\dfrac")
    return f"\\{{{text}\\}}" if len(items) > 1 else text


def graded(pairs: list[tuple[str, str]]) -> list[bool]:
    """check_answer(boxed response, gold) for each pair, on as many threads as checker processes."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=answers.pool_size()) as pool:
        return list(pool.map(lambda p: check_answer(f"\\boxed{{{p[0]}}}", p[1]), pairs, chunksize=64))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", default=str(DEFAULT_CSV))
    p.add_argument("--pairs", type=int, default=0, help="random sample of cross pairs (0: all)")
    args = p.parse_args()
    with open(args.csv, newline="") as f:
        golds = [row["Short Answer"] for row in csv.DictReader(f)]
    print(f"# {len(golds)} gold answers from {args.csv}; {answers.pool_size()} checker processes")

    t = time.perf_counter()
    as_written = sum(graded([(g, g) for g in golds]))
    rewritten = sum(graded([(rewrite(g), g) for g in golds]))
    try:
        from math_verify import parse, verify
        plain = sum(bool(verify(parse(g), parse(f"\\boxed{{{g}}}"))) for g in golds)
        plain_text = f"{plain}/{len(golds)}"
    except ImportError:
        plain_text = "n/a (math-verify not installed)"
    print(f"self-acceptance: as written {as_written}/{len(golds)}, rewritten {rewritten}/{len(golds)}; "
          f"plain math-verify {plain_text}  ({time.perf_counter() - t:.1f} s)")

    squashed = ["".join(clean(g).split()) for g in golds]
    pairs = [(i, j) for i in range(len(golds)) for j in range(len(golds))
             if i != j and squashed[i] != squashed[j]]
    if args.pairs:
        pairs = sorted(random.Random(0).sample(pairs, args.pairs))
    t = time.perf_counter()
    accepted = [pair for pair, ok in zip(pairs, graded([(golds[i], golds[j]) for i, j in pairs])) if ok]
    print(f"cross-rejection: {len(pairs) - len(accepted)}/{len(pairs)} rejected "
          f"({100 * (1 - len(accepted) / len(pairs)):.3f}%)  ({time.perf_counter() - t:.1f} s)")
    for i, j in accepted:
        print(f"  accepted: response {golds[i]!r} (row {i}) for gold {golds[j]!r} (row {j})")


if __name__ == "__main__":
    main()
