"""Host memory policy of a CPU-only process: freed memory stays in the process (issue 22).

XLA:CPU allocates a step's large buffers (activations, logits, gradients) with malloc on its worker
threads. glibc serves every block over 32 MiB with a fresh mmap and unmaps it on free, so each step
touches new pages, and the kernel faults in and zeroes every one of them: bench-100m's SFT step at
1 x 2048 took 610,000 minor faults (2.4 GB of zeroed pages) per step, the logits' exponential ran
at 7 ns an element against 1.2 at 4 x 256, and the first matmuls of the forward at a third of the
rate of the same matmuls later in the step (tools/profile_step.py, docs/BENCHMARKS.md).

`keep_freed_memory` sets glibc's malloc, before any thread allocates, to serve every block from one
arena grown with sbrk and never to give its top back: a step then reuses the pages of the step
before, 10-25% faster alone on bench-100m. The price is resident memory: the heap never shrinks,
and it fragments, so now and then a step's blocks no longer fit the holes left by the step before
and the heap grows (on bench-100m three times in 60 steps, then not again: up to 1.8x glibc's peak).
It must run before JAX starts its backend (the worker threads bind to an arena on
their first allocation); set afterwards it changes nothing for them (measured), so it is then
not applied at all (a test process that calls the launcher after other tests ran JAX, for one).

Applied only where it was measured, a process that will run on the CPU: JAX_PLATFORMS names cpu
first, or, with JAX_PLATFORMS unset, the machine has no GPU or TPU device files. QEDJAX_MALLOC=system
leaves glibc's defaults; QEDJAX_MALLOC=keep applies it on any host. Other C libraries: nothing done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8

ACCELERATOR_FILES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/kfd")


def cpu_only(environ=os.environ, device_files=ACCELERATOR_FILES) -> bool:
    """Whether JAX will run on the CPU, decided without starting a backend."""
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(glob.glob(pattern) for pattern in device_files)


def wanted(environ=os.environ, device_files=ACCELERATOR_FILES) -> bool:
    """The policy's decision: QEDJAX_MALLOC=system / keep, else whether the process is CPU-only."""
    choice = environ.get("QEDJAX_MALLOC", "").strip().lower()
    if choice not in ("", "system", "keep"):
        raise ValueError(f"QEDJAX_MALLOC must be 'system' or 'keep', got {choice!r}")
    if choice:
        return choice == "keep"
    return cpu_only(environ, device_files)


def _backend_started() -> bool:
    """Whether JAX has started a backend in this process (a private hook; unknown counts as started)."""
    try:
        from jax._src import xla_bridge
    except ImportError:
        return True
    return bool(getattr(xla_bridge, "backends_are_initialized", lambda: True)())


def keep_freed_memory(environ=os.environ) -> bool:
    """Apply the policy if `wanted` and no JAX backend has started yet; True when glibc took all
    three settings. Once the backend runs, its threads are bound to their arenas and the settings
    would only pin this process's memory without sparing XLA its faults, so nothing is done."""
    if not wanted(environ) or _backend_started():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl and others have no such symbol)
    except (OSError, AttributeError, TypeError):
        return False
    # one arena for every thread; no mmap for large blocks; -1 (as size_t: the largest) never trims
    return all(libc.mallopt(param, value) == 1 for param, value in
               ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))
