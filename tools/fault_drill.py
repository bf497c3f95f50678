"""Rehearse a crash and resume with your own config, on your own machines, before a long run.

    python tools/fault_drill.py --config C [--kill STAGE:step:K] [--kill STAGE:save:K] [key=value ...]

Runs `python -m qedjax.launch --config C [key=value ...]` twice under the config's run.dir: once
straight through (run.dir/drill/straight), and once (run.dir/drill/killed) SIGKILLed at each --kill
point in turn and re-run, the same command, after each kill until it finishes. The kill points are
qedjax.checkpoint.fault_point's (environment variable QEDJAX_FAULT): `sft:step:3` kills while SFT
step 3 is computing, `grpo:save:4` just after the asynchronous save of GRPO step 4 started.
Without --kill: mid-step at the first stage's step 2, then during its first checkpoint save.

Then it compares the two runs: metrics.jsonl key by key (tools/compare_runs.py) and the last
checkpoint's parameters of each trained stage. Exit 0 when both agree exactly. Exactness needs
run.deterministic=true and a deterministic platform (CPU; see the README on GPU/TPU
nondeterminism); elsewhere read the differences compare_runs lists. Use a few steps and a frequent
checkpoint (`sft.steps=6 sft.checkpoint.every=2`): the drill runs the stages twice.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

TRAINED = ("sft", "grpo")


def launch_command(config: str, run_dir: str, overrides=()) -> list[str]:
    return [sys.executable, "-m", "qedjax.launch", "--config", config, *overrides, f"run.dir={run_dir}"]


def run_launch(command: list[str], log_path: str, *, fault: str | None = None, env=None,
               timeout: float = 3600) -> int:
    """Runs one launcher process to its end (or its kill); returns its exit code (-9: SIGKILLed)."""
    env = dict(os.environ if env is None else env)
    env.pop("QEDJAX_FAULT", None)
    if fault:
        env["QEDJAX_FAULT"] = fault
    with open(log_path, "a") as log:
        log.write(f"\n=== {' '.join(command)}  (QEDJAX_FAULT={fault})\n")
        log.flush()
        return subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode


def kill_and_resume(command: list[str], faults, log_path: str, *, env=None, timeout: float = 3600) -> None:
    """Runs `command` once per fault (each must be SIGKILLed at its point), then once to the end."""
    for fault in faults:
        code = run_launch(command, log_path, fault=fault, env=env, timeout=timeout)
        if code != -signal.SIGKILL:
            raise RuntimeError(f"the run under QEDJAX_FAULT={fault} exited with {code} instead of being killed "
                               f"there (a point the run never reaches?); see {log_path}")
    code = run_launch(command, log_path, env=env, timeout=timeout)
    if code != 0:
        raise RuntimeError(f"the resumed run exited with {code}; see {log_path}")


def default_faults(cfg) -> list[str]:
    stage = next(s for s in cfg.run.stages if s in TRAINED)
    every = getattr(cfg, stage).checkpoint.every
    return [f"{stage}:step:2", f"{stage}:save:{every}"]


def params_equal(cfg, stage: str, dir_a: str, dir_b: str) -> bool:
    """Whether the last checkpoints of `stage` in two run directories hold identical parameters."""
    import jax
    import numpy as np

    from qedjax import sharding, train
    from qedjax.checkpoint import restore_params

    mesh = sharding.make_mesh(cfg.run.mesh)
    _, _, target = train.abstract_params(cfg.model, mesh, sharding.TRAIN_RULES)
    a, b = (jax.device_get(restore_params(os.path.join(d, stage, "checkpoints"), target)) for d in (dir_a, dir_b))
    same = jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)
    return all(jax.tree.leaves(same))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--kill", action="append", help="a kill point STAGE:step:K or STAGE:save:K (repeatable)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import compare_runs

    from qedjax.config import load_config

    cfg = load_config(args.config, args.overrides)
    root = os.path.join(cfg.run.dir, "drill")
    straight, killed = os.path.join(root, "straight"), os.path.join(root, "killed")
    if os.path.exists(straight) or os.path.exists(killed):
        raise SystemExit(f"{root} exists: remove it (or set run.dir) for a fresh drill")
    os.makedirs(root)
    log = os.path.join(root, "drill.log")
    faults = args.kill or default_faults(cfg)
    print(f"[drill] straight run -> {straight}")
    kill_and_resume(launch_command(args.config, straight, args.overrides), [], log)
    print(f"[drill] killed at {', '.join(faults)} and resumed -> {killed}")
    kill_and_resume(launch_command(args.config, killed, args.overrides), faults, log)
    same = compare_runs.report(straight, killed, compare_runs.compare(compare_runs.load_rows(straight),
                                                                       compare_runs.load_rows(killed)))
    for stage in (s for s in cfg.run.stages if s in TRAINED and getattr(cfg, s) is not None):
        equal = params_equal(cfg, stage, straight, killed)
        print(f"[drill] {stage} parameters of the last checkpoint: {'identical' if equal else 'DIFFER'}")
        same = same and equal
    print(f"[drill] {'PASS' if same else 'FAIL'}: kill + resume {'equals' if same else 'differs from'} "
          f"the straight run (log: {log})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
