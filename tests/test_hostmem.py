"""qedjax/hostmem.py: freed memory is reused without new page faults, and the policy's decision."""

import os
import subprocess
import sys

import pytest

from qedjax import hostmem

# Allocate, touch and free a 256 MiB block twice; print the minor faults of the second touch. glibc
# serves such a block with mmap and unmaps it on free, so by default the second touch faults its
# pages in again; with the policy it reuses the same pages.
PROBE = r"""
import ctypes, ctypes.util, sys
from qedjax import hostmem
applied = hostmem.keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def faults():
    return int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[7])
n = 256 << 20
for i in range(2):
    before = faults()
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
print(applied, faults() - before)
"""


def _second_touch_faults(mode: str) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MALLOC_MMAP_MAX_",
                                                            "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX")}
    env.update(QEDJAX_MALLOC="keep")
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env,
                         check=True, timeout=120).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/stat") or not hasattr(os, "confstr")
                    or "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or "").lower(),
                    reason="glibc on Linux only")
def test_freed_memory_is_reused_without_faults():
    applied, kept = _second_touch_faults("keep")
    _, default = _second_touch_faults("system")
    assert applied == "True"
    # default: every page of the block faults again (65,536 of 4 KiB; 128 with transparent huge
    # pages); kept: the pages are still mapped. A tenth leaves room for the interpreter's own faults.
    assert default >= 128
    assert kept * 10 <= default, (kept, default)


def test_decision():
    none = ()  # no accelerator device files
    gpu = ("/",)  # a pattern that always matches: a device file is there
    assert hostmem.wanted({}, none)
    assert not hostmem.wanted({}, gpu)
    assert hostmem.wanted({"JAX_PLATFORMS": "cpu"}, gpu)
    assert not hostmem.wanted({"JAX_PLATFORMS": "cuda,cpu"}, none)
    assert not hostmem.wanted({"QEDJAX_MALLOC": "system"}, none)
    assert hostmem.wanted({"QEDJAX_MALLOC": "keep", "JAX_PLATFORMS": "tpu"}, gpu)
    with pytest.raises(ValueError, match="QEDJAX_MALLOC"):
        hostmem.wanted({"QEDJAX_MALLOC": "tcmalloc"}, none)


def test_nothing_is_done_once_a_backend_has_started():
    import jax

    jax.devices()  # this test process's backend is up (as in any test that ran JAX before)
    assert not hostmem.keep_freed_memory({"QEDJAX_MALLOC": "keep"})


def test_launcher_names_a_bad_setting(monkeypatch):
    from qedjax import launch

    monkeypatch.setenv("QEDJAX_MALLOC", "jemalloc")
    with pytest.raises(SystemExit, match="QEDJAX_MALLOC must be 'system' or 'keep'"):
        launch.main(["--config", "configs/tiny.yaml"])
