"""What a run directory records about how it was made: the resolved config and its hash, the git
commit and dirty flag, package versions, devices, mesh and seeds (run_info.json)."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys

import jax
import yaml

from qedjax.config_io import config_hash, to_dict

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorstore", "datasets",
            "transformers", "tokenizers", "numpy", "torch", "vllm", "math-verify", "qedjax")
# Environment variables that change numerics, compilation or placement; names with these words are
# never recorded (API keys of judges and hubs live in the environment too).
ENV_PREFIXES = ("XLA_", "JAX_", "LIBTPU", "TPU_", "NCCL_", "CUDA_VISIBLE_DEVICES", "VLLM_", "QEDJAX_", "MKL_",
                "KMP_", "OMP_")
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")
JAX_OPTIONS = ("jax_default_matmul_precision", "jax_enable_x64", "jax_threefry_partitionable",
               "jax_default_prng_impl")


def git_state(path: str = ".") -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return {"commit": None, "dirty": None}
        # Untracked files count: a new module that is not committed yet changes the program too.
        changes = git("status", "--porcelain").stdout.splitlines()
        return {"commit": head.stdout.strip(), "dirty": bool(changes), "changes": changes[:100]}
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


def recorded_env() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith(ENV_PREFIXES) and not any(w in k.upper() for w in SECRET_WORDS)}


def write_run_info(run_dir: str, cfg, mesh, argv=None) -> dict:
    """Writes config.yaml (resolved) and run_info.json; only process 0 writes. A resumed run whose
    config differs from the one the directory was started with gets a warning."""
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
        "argv": list(sys.argv if argv is None else argv),
        "env": recorded_env(),
        "jax_config": {k: getattr(jax.config, k, None) for k in JAX_OPTIONS},
        "hostname": platform.node(),
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if jax.process_index() == 0:
        os.makedirs(run_dir, exist_ok=True)
        try:
            with open(os.path.join(run_dir, "run_info.json")) as f:
                previous = json.load(f).get("config_hash")
        except (OSError, ValueError):
            previous = None
        if previous not in (None, info["config_hash"]):
            print(f"[qedjax] warning: {run_dir} was last run with config {previous}; this run's config is "
                  f"{info['config_hash']} (config.yaml and run_info.json now describe this run)")
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
        with open(os.path.join(run_dir, "run_info.json"), "w") as f:
            json.dump(info, f, indent=2)
    return info
