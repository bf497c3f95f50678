"""The benchmark tools' own logic: the SFT benchmark's torch side in a child process."""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import bench_sft  # noqa: E402


def test_bench_sft_torch_child_steps_like_torch_in_process(tmp_path):
    """The torch step in its spawned child gives the losses of the same step in this process (same
    checkpoint, batch and optimizer), with its own time; a child that fails reports
    its traceback and the benchmark stops."""
    import torch

    from qedjax.models.qwen3 import Qwen3Config
    from tests.hf_utils import random_hf_model

    cfg = Qwen3Config.preset("tiny")
    batch = bench_sft.sft_batch(cfg.vocab_size, 2, 16)
    hf = random_hf_model(cfg)
    hf.save_pretrained(tmp_path)
    threads = torch.get_num_threads()
    child = bench_sft.TorchChild(str(tmp_path), batch, "fused", 1)
    try:
        assert "1 threads" in child.describe and "attn=" in child.describe
        got = [child.step() for _ in range(2)]
    finally:
        child.close()
    assert not child.proc.is_alive()
    local = bench_sft.torch_trainer(hf, batch, "fused")
    want = [local() for _ in range(2)]
    assert torch.get_num_threads() == threads  # the child's pinning stayed in the child
    for (seconds, loss), ref in zip(got, want):
        assert seconds > 0
        np.testing.assert_allclose(loss, ref, rtol=1e-5)
    assert want[1] < want[0]  # the optimizer stepped: the same batch's loss fell
    with pytest.raises(SystemExit, match="torch child process failed"):
        bench_sft.TorchChild(str(tmp_path / "missing"), batch, "fused", 1)


def test_bench_input_writes_rows_of_the_asked_token_counts(tmp_path, toy_tokenizer_dir, toy_tokenizer):
    """The input benchmark's data: FineProofs-SFT's columns, each row's tokens within a few percent
    of a length drawn from [min, max], and rows the SFT checks accept."""
    import json

    import bench_input

    from qedjax import data

    args = bench_input.parse_args(["--rows", "6", "--min-tokens", "400", "--max-tokens", "900"])
    path = str(tmp_path / "d.jsonl")
    info = bench_input.write_data(args, toy_tokenizer_dir, path)
    assert info["rows"] == 6 and 400 <= info["tokens_target_mean"] <= 900
    rows = [json.loads(line) for line in open(path)]
    for row in rows:
        assert set(row) == {"problem", "reasoning_content", "proof"}
        n = len(toy_tokenizer(row["problem"] + row["reasoning_content"] + row["proof"],
                              add_special_tokens=False)["input_ids"])
        assert 400 * 0.9 <= n <= 900 * 1.1, n
    examples, stats = data.build_examples(data.DataConfig(path=path, seq_len=2048), toy_tokenizer)
    assert stats["examples"] == 6 and stats["bad_rows"] == 0
