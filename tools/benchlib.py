"""Helpers shared by the benchmark scripts in tools/: pinning to cores, and the header and footer
lines every script prints so that a pasted result says where and when it was taken."""

from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pin_threads(n: int, torch_threads: bool = True):
    """Restricts this process (and the threads jax and torch start later) to the first n usable cores.

    XLA sizes its CPU thread pool to the cores it may use; with `torch_threads` torch is told the same
    number (leave it off where importing torch would distort what is measured, e.g. memory).
    """
    cores = sorted(os.sched_getaffinity(0))
    if not 1 <= n <= len(cores):
        raise SystemExit(f"--threads must be in 1..{len(cores)}, got {n}")
    os.sched_setaffinity(0, cores[:n])
    if torch_threads:
        import torch

        torch.set_num_threads(n)


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")


def print_header(note: str = ""):
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {cpu_name()}, {len(os.sched_getaffinity(0))} cores pinned "
          f"of {os.cpu_count()}  load average {os.getloadavg()[0]:.1f}\n# command: python "
          f"{os.path.relpath(sys.argv[0], ROOT)} {' '.join(sys.argv[1:])}" + (f"\n# {note}" if note else ""),
          flush=True)


def print_footer():
    print(f"# load average at the end {os.getloadavg()[0]:.1f}", flush=True)
