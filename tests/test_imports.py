"""The import layering of README.md ("Architecture"), as contracts in pyproject.toml checked by import-linter."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_imports_follow_the_layers():
    lint = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    assert os.path.exists(lint), "import-linter is missing: pip install -e '.[test]'"
    run = subprocess.run([lint, "--no-cache", "--no-logo", "pyproject.toml"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout
