"""What a run directory records about how it was made: the resolved config and its hash, the git
commit and dirty flag, package versions, devices, mesh and seeds (run_info.json)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys

import jax
import yaml

from qedjax.config import config_hash, to_dict

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorstore", "datasets",
            "transformers", "tokenizers", "numpy", "torch", "vllm", "math-verify", "qedjax")


def git_state(path: str = ".") -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return {"commit": None, "dirty": None}
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_run_info(run_dir: str, cfg, mesh) -> dict:
    """Writes config.yaml (resolved) and run_info.json; only process 0 writes."""
    info = {
        "config_hash": config_hash(cfg),
        "git": git_state(os.path.dirname(os.path.abspath(__file__))),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "devices": {"platform": jax.devices()[0].platform, "kind": jax.devices()[0].device_kind,
                    "count": jax.device_count(), "local_count": jax.local_device_count(),
                    "processes": jax.process_count()},
        "mesh": dict(mesh.shape),
        "seed": cfg.run.seed,
        "argv": sys.argv,
    }
    if jax.process_index() == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
        with open(os.path.join(run_dir, "run_info.json"), "w") as f:
            json.dump(info, f, indent=2)
    return info
