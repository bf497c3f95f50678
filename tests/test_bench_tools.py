"""The benchmark tools' own logic: FLOP counts, and the A/B tool's checks of its arguments."""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import ab_step  # noqa: E402
import bench_matmul  # noqa: E402


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
