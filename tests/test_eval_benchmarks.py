"""Benchmark loaders on the real IMO-Bench CSVs, plus other sources, column maps and filters."""

import dataclasses
import json

import pytest

from qedjax.benchmarks import IMOBENCH_DIR as IMOBENCH
from qedjax.benchmarks import BenchmarkConfig, load_benchmark, read_rows, select, to_problems


def proofbench(**kwargs) -> BenchmarkConfig:
    return BenchmarkConfig(path=str(IMOBENCH / "proofbench_v2.csv"), format="imo-proofbench", **kwargs)


def answerbench(**kwargs) -> BenchmarkConfig:
    return BenchmarkConfig(path=str(IMOBENCH / "answerbench_v2.csv"), format="imo-answerbench", **kwargs)


def test_imo_proofbench_loads_all_rows_with_their_fields():
    problems = load_benchmark(proofbench())
    assert len(problems) == 60
    first = problems[0]
    assert first.id == "PB-Basic-001"
    assert first.problem.startswith("Determine all functions $f: \\mathbb{Z}")
    assert set(first.references) == {"solution", "guidelines"}
    assert first.references["solution"].startswith("By taking $x = 0$")
    assert first.references["guidelines"].startswith("(Partial)")
    assert (first.category, first.level) == ("Algebra", "IMO-easy")
    assert {p.category for p in problems} == {"Algebra", "Combinatorics", "Geometry", "Number theory"}
    assert {p.level for p in problems} == {"pre-IMO", "IMO-easy", "IMO-medium", "IMO-hard"}
    assert all(p.problem and p.references["solution"] and p.references["guidelines"] for p in problems)


def test_imo_answerbench_loads_all_rows_with_their_fields():
    problems = load_benchmark(answerbench())
    assert len(problems) == 400
    assert problems[0].id == "imo-bench-algebra-001"
    assert problems[0].references == {"answer": "3"}
    assert problems[1].references["answer"] == "$\\left\\lfloor \\log_{2}a\\right\\rfloor +1$."
    assert problems[0].category == "Algebra" and problems[0].level == ""
    assert sum(p.category == "Geometry" for p in problems) == 100
    assert len({p.id for p in problems}) == 400


def test_filters_and_fixed_subset():
    easy_algebra = load_benchmark(proofbench(categories=("Algebra",), levels=("IMO-easy",)))
    assert easy_algebra and all(p.category == "Algebra" and p.level == "IMO-easy" for p in easy_algebra)
    assert len(load_benchmark(proofbench(levels=("IMO-hard",)))) == 10

    subset = load_benchmark(answerbench(subset=8, subset_seed=3))
    again = load_benchmark(answerbench(subset=8, subset_seed=3))
    other = load_benchmark(answerbench(subset=8, subset_seed=4))
    assert [p.id for p in subset] == [p.id for p in again]  # a fixed subset
    assert [p.id for p in subset] != [p.id for p in other]
    assert [p.id for p in subset] == sorted(p.id for p in subset)  # kept in file order


def test_subcategory_can_be_mapped_as_level():
    problems = load_benchmark(answerbench(columns={"level": "Subcategory"}))
    assert problems[0].level == "Operation"


def test_proofbench_style_jsonl_and_saved_dataset_dir(tmp_path):
    rows = [
        {"problem_id": "a", "statement": "Show P.", "scheme": "2 pts: X; 5 pts: Y", "topic": "Algebra"},
        {"problem_id": "b", "statement": "Show Q.", "scheme": "7 pts: Z", "topic": "Geometry"},
    ]
    columns = {"id": "problem_id", "problem": "statement", "marking_scheme": "scheme", "category": "topic"}
    path = tmp_path / "pb.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = BenchmarkConfig(path=str(path), format="proofbench", columns=columns)
    problems = load_benchmark(cfg)
    assert [(p.id, p.problem, p.category, p.level) for p in problems] == [
        ("a", "Show P.", "Algebra", ""),
        ("b", "Show Q.", "Geometry", ""),
    ]
    assert problems[1].references == {"marking_scheme": "7 pts: Z"}

    import datasets

    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "hf"))
    saved = BenchmarkConfig(path=str(tmp_path / "hf"), format="proofbench", columns=columns)
    from_dir = load_benchmark(saved)
    assert from_dir == problems
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "pb.parquet"))
    assert read_rows(tmp_path / "pb.parquet") == rows


def test_missing_or_empty_reference_fails_at_load():
    with pytest.raises(KeyError, match="marking_scheme"):
        to_problems([{"problem": "Show P."}], "proofbench")
    with pytest.raises(ValueError, match="empty"):
        to_problems([{"problem": "Show P.", "marking_scheme": "  "}], "proofbench")
    # Optional fields fall back: the id to the row number, groups to "".
    (problem,) = to_problems([{"problem": "Show P.", "marking_scheme": "7 pts"}], "proofbench")
    assert (problem.id, problem.category, problem.level) == ("0", "", "")


def test_config_validation():
    with pytest.raises(ValueError, match="format"):
        BenchmarkConfig(format="minif2f")
    with pytest.raises(ValueError, match="unknown fields"):
        BenchmarkConfig(format="imo-answerbench", columns={"solution": "Solution"})
    problems = to_problems([{"problem": f"p{i}", "marking_scheme": "m"} for i in range(5)], "proofbench")
    assert len(select(problems, subset=10)) == 5  # a subset larger than the benchmark keeps everything


def test_malformed_rows_name_file_and_line_or_are_skipped_and_reported(tmp_path, capsys):
    good = {"id": "a", "problem": "Show P.", "marking_scheme": "7 pts"}
    lines = [json.dumps(good), '{"id": "b", "problem": "Show Q.",', json.dumps({"id": "c", "problem": "Show R."}),
             json.dumps({"id": "d", "problem": ["Show S."], "marking_scheme": "m"}),
             json.dumps({"id": "e", "problem": "  ", "marking_scheme": "m"}), json.dumps({**good, "id": "f"})]
    path = tmp_path / "pb.jsonl"
    cfg = BenchmarkConfig(path=str(path), format="proofbench")
    expected = [(1, r"pb.jsonl:2: not valid JSON \(Expecting"), (2, r"pb.jsonl:3: no column 'marking_scheme'"),
                (3, r"pb.jsonl:4: 'problem' \(column 'problem'\) is list, expected text"),
                (4, r"pb.jsonl:5: 'problem' \(column 'problem'\) is empty")]
    for bad, message in expected:  # each bad line alone among good ones fails the load, naming the line
        path.write_text("\n".join(lines[:1] + [lines[bad] if i == bad else "" for i in range(1, 5)] + lines[5:]))
        with pytest.raises(ValueError, match=message):
            load_benchmark(cfg)
    path.write_text("\n".join(lines))
    kept = load_benchmark(dataclasses.replace(cfg, bad_rows="skip"))
    assert [p.id for p in kept] == ["a", "f"]
    assert "pb.jsonl: skipped 4 bad row(s), kept 2 (bad_rows=skip); first: " in capsys.readouterr().out
    with pytest.raises(ValueError, match="bad_rows"):
        BenchmarkConfig(bad_rows="ignore")
