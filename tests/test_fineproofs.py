"""Preparing FineProofs-SFT and FineProofs-RL: schema-exact rows written here (parquet, jsonl, a saved
dataset directory) become what the SFT stage and the RL problems read; schema errors name file, row
and column."""

import json

import pytest

from qedjax import fineproofs
from qedjax.benchmarks import BenchmarkConfig, load_benchmark
from qedjax.data import Columns, row_messages


def _sft_row(i, problem, grade):
    return {"problem": problem, "reasoning_content": f"thinking {i}", "proof": f"proof {i}", "category": "Algebra",
            "competition": "IMO", "gemini-3-pro-grade": grade, "qwen3-4b-thinking-reward@128": 0.25,
            "source": "olympiads", "messages": [{"role": "user", "content": problem},
                                                {"role": "assistant", "content": f"proof {i}"}]}


SFT_ROWS = [_sft_row(0, "Show A.", 5), _sft_row(1, "Show B.", 7), _sft_row(2, "Show  A.", 7),
            _sft_row(3, "Show A.", 7), _sft_row(4, "Show C.", 0)]


def _rl_row(i, mean):
    scores = [7 if k < round(128 * mean) else 0 for k in range(128)]
    return {"problem": f"Prove P{i}.", "source": "aops", "rubrics": f"Checkpoint {i}: 7 points.", "scores": scores,
            "rewards": [s / 7 for s in scores], "num_rewards": 128, "reward_mean": sum(scores) / 7 / 128,
            "reward_std": 0.1}


RL_ROWS = [_rl_row(0, 0.0), _rl_row(1, 0.5), _rl_row(2, 1.0), _rl_row(3, 0.25)]


def _write(rows, path, kind):
    import datasets

    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)
    ds = datasets.Dataset.from_list(rows)
    if kind == "parquet":
        ds.to_parquet(str(path))
    else:
        ds.save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("kind, name", [("parquet", "sft.parquet"), ("jsonl", "sft.jsonl"), ("hf", "sft_dir")])
def test_sft_rows_become_chats_the_sft_stage_reads(tmp_path, kind, name):
    src = _write(SFT_ROWS, tmp_path / name, kind)
    out = tmp_path / "out" / "sft.jsonl"
    stats = fineproofs.main(["sft", src, str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # Unique problems ("Show  A." is "Show A." up to spacing): the best-graded row of each, earliest first.
    assert stats == {"rows": 5, "written": 3} and [r["id"] for r in rows] == [
        "fineproofs-sft-1", "fineproofs-sft-2", "fineproofs-sft-4"]
    chat = row_messages(rows[0], Columns(), "row 0")  # exactly as qedjax.data reads a row
    assert chat == [{"role": "user", "content": "Show B."},
                    {"role": "assistant", "content": "proof 1", "reasoning_content": "thinking 1"}]
    assert fineproofs.main(["sft", src, str(out), "--all-rows"]) == {"rows": 5, "written": 5}


@pytest.mark.parametrize("kind, name", [("parquet", "rl.parquet"), ("jsonl", "rl.jsonl"), ("hf", "rl_dir")])
def test_rl_rows_become_problems_with_rubrics_and_a_difficulty_filter(tmp_path, kind, name):
    src = _write(RL_ROWS, tmp_path / name, kind)
    out = tmp_path / "problems.jsonl"
    assert fineproofs.main(["rl", src, str(out)]) == {"rows": 4, "written": 2}  # never / always solved dropped
    problems = load_benchmark(BenchmarkConfig(path=str(out), format="proofbench"))
    assert [p.id for p in problems] == ["fineproofs-rl-1", "fineproofs-rl-3"]
    assert problems[0].problem == "Prove P1." and problems[0].references["marking_scheme"] == "Checkpoint 1: 7 points."
    assert fineproofs.main(["rl", src, str(out), "--reward-mean-range", "0.3", "1.1"]) == {"rows": 4, "written": 2}
    assert [p.id for p in load_benchmark(BenchmarkConfig(path=str(out), format="proofbench"))] == [
        "fineproofs-rl-1", "fineproofs-rl-2"]


def test_missing_or_mistyped_columns_name_file_row_and_column(tmp_path):
    missing = [dict(r) for r in RL_ROWS]
    for r in missing:
        del r["rubrics"]
    src = _write(missing, tmp_path / "missing.parquet", "parquet")
    with pytest.raises(fineproofs.SchemaError, match=r"missing\.parquet: row 0: missing column 'rubrics'"):
        fineproofs.prepare_rl(src, str(tmp_path / "x.jsonl"))
    typed = [dict(r, reward_mean=str(r["reward_mean"])) for r in RL_ROWS]
    src = _write(typed, tmp_path / "typed.parquet", "parquet")
    with pytest.raises(fineproofs.SchemaError, match=r"typed\.parquet: row 0: column 'reward_mean' is str"):
        fineproofs.prepare_rl(src, str(tmp_path / "x.jsonl"))
    # One bad row in a jsonl file (arrow cannot even build the column): still named.
    rows = [dict(r) for r in SFT_ROWS]
    rows[3]["gemini-3-pro-grade"] = "seven"
    src = _write(rows, tmp_path / "bad.jsonl", "jsonl")
    with pytest.raises(fineproofs.SchemaError, match=r"bad\.jsonl: row 3: column 'gemini-3-pro-grade' is str"):
        fineproofs.prepare_sft(src, str(tmp_path / "x.jsonl"))
    rows[3]["gemini-3-pro-grade"] = 9
    src = _write(rows, tmp_path / "range.jsonl", "jsonl")
    with pytest.raises(fineproofs.SchemaError, match=r"row 3: column 'gemini-3-pro-grade' is int 9, expected an int"):
        fineproofs.prepare_sft(src, str(tmp_path / "x.jsonl"))
