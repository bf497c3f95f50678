"""The benchmark tools' own logic: FLOP counts, the A/B tool's checks of its arguments, and the SFT
benchmark's torch side in a child process."""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import ab_step  # noqa: E402
import bench_matmul  # noqa: E402
import bench_sft  # noqa: E402


def test_matmul_flops_and_shapes():
    assert bench_matmul.flops("md,df->mf", (4, 5), (5, 6)) == 2 * 4 * 5 * 6
    assert bench_matmul.flops("mv,md->vd", (3, 7), (3, 2)) == 2 * 3 * 7 * 2
    assert bench_matmul.shapes(("M", 640), 256) == (256, 640)
    names = [p[0] for p in bench_matmul.products(8, 16, 32)]
    assert len(names) == len(set(names))
    # every product's operands share exactly the axes its spec says they share
    for _, spec, _, a, b in bench_matmul.products(8, 16, 32):
        lhs, rhs = spec.split("->")[0].split(",")
        dims = {}
        for axes, shape in ((lhs, bench_matmul.shapes(a, 4)), (rhs, bench_matmul.shapes(b, 4))):
            for axis, n in zip(axes, shape):
                assert dims.setdefault(axis, n) == n, spec
        # the MKL column's transposes give the einsum's product
        ta, tb = bench_matmul.gemm_transposes(spec)
        x, y = np.ones(bench_matmul.shapes(a, 4)), np.ones(bench_matmul.shapes(b, 4))
        assert ((x.T if ta else x) @ (y.T if tb else y)).shape == np.einsum(spec, x, y).shape, spec
    assert bench_matmul.gemm_transposes("mv,md->vd") == (True, False)
    assert bench_matmul.gemm_transposes("md,vd->mv") == (False, True)
    with pytest.raises(ValueError, match="not a product"):
        bench_matmul.gemm_transposes("md,df->fm")


def test_ab_step_values_and_field():
    assert ([ab_step.parse_value(v) for v in ("true", "False", "none", "512", "mkl")]
            == [True, False, None, 512, "mkl"])
    with pytest.raises(SystemExit, match="gemm"):  # names the fields it knows
        ab_step.main(["--field", "hidden_size", "--values", "1", "2"])
    with pytest.raises(SystemExit, match="at least two"):
        ab_step.main(["--field", "gemm", "--values", "mkl"])
    with pytest.raises(SystemExit, match="pair up"):
        ab_step.main(["--field", "gemm", "--values", "xla", "mkl", "--batch", "1", "2", "--seq", "8"])


def test_bench_sft_torch_child_steps_like_torch_in_process(tmp_path):
    """The torch step in its spawned child gives the losses of the same step in this process (same
    checkpoint, batch and optimizer), with its own time and page faults; a child that fails reports
    its traceback and the benchmark stops."""
    import torch

    from qedjax.models.qwen3 import Qwen3Config
    from tests.hf_utils import random_hf_model

    cfg = Qwen3Config.preset("tiny")
    batch = bench_sft.sft_batch(cfg.vocab_size, 2, 16)
    hf = random_hf_model(cfg)
    hf.save_pretrained(tmp_path)
    threads = torch.get_num_threads()
    child = bench_sft.TorchChild(str(tmp_path), batch, "fused", 1, system_malloc=True)
    try:
        assert "1 threads" in child.describe and "attn=" in child.describe
        got = [child.step() for _ in range(2)]
    finally:
        child.close()
    assert not child.proc.is_alive()
    local = bench_sft.torch_trainer(hf, batch, "fused")
    want = [local() for _ in range(2)]
    assert torch.get_num_threads() == threads  # the child's pinning stayed in the child
    for (seconds, loss, faults), ref in zip(got, want):
        assert seconds > 0 and faults >= 0
        np.testing.assert_allclose(loss, ref, rtol=1e-5)
    assert want[1] < want[0]  # the optimizer stepped: the same batch's loss fell
    with pytest.raises(SystemExit, match="torch child process failed"):
        bench_sft.TorchChild(str(tmp_path / "missing"), batch, "fused", 1, system_malloc=True)
