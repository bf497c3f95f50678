"""Where the real IMO-Bench CSVs are, for the tests that grade or load real rows."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Named by the environment, inside the checkout, beside it (../shared, as in the workspace), or at
# the workspace's absolute path (a clone elsewhere, e.g. /tmp, still finds it).
CANDIDATES = [os.environ.get("QEDJAX_IMOBENCH", ""), REPO / "shared/data/imobench",
              REPO.parent / "shared/data/imobench", "/work/shared/data/imobench"]
IMOBENCH = next((Path(p) for p in CANDIDATES if p and (Path(p) / "proofbench_v2.csv").exists()), None)
needs_data = pytest.mark.skipif(IMOBENCH is None, reason="IMO-Bench CSVs not found (set QEDJAX_IMOBENCH)")

