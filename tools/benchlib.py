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


def add_malloc_flag(parser):
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's malloc as it is (default: qedjax/hostmem.py's policy, as the launcher)")


def host_memory(system_malloc: bool) -> str:
    """The launcher's host memory policy for this process (both frameworks share it); call it before
    JAX starts its backend. Returns a line for the header."""
    from qedjax import hostmem

    kept = not system_malloc and hostmem.keep_freed_memory()
    return "host memory: " + ("freed memory kept (qedjax/hostmem.py)" if kept else "glibc malloc defaults")


def add_host_flags(parser):
    """--system-malloc and --threads, the flags of a benchmark that runs on this host's cores."""
    add_malloc_flag(parser)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="cores to pin the process to (default: all it may use)")


def setup_host(args, torch_threads: bool = True):
    """Pins the process to --threads cores, applies the host memory policy (unless --system-malloc)
    and prints the header; call it before JAX starts its backend."""
    pin_threads(args.threads, torch_threads=torch_threads)
    print_header(host_memory(args.system_malloc))


def print_footer():
    print(f"# load average at the end {os.getloadavg()[0]:.1f}", flush=True)
