"""fp32 matrix products on the CPU through MKL's sgemm, as an XLA custom call (issue 22).

On an Intel host XLA:CPU's own GEMM libraries (YNNPACK, Eigen) reach 0.65-0.90x of MKL's speed on
the train step's products (tools/bench_matmul.py), and those products are most of the step. This
module gives XLA MKL's: a small FFI handler (csrc/cpu_gemm.cc) that passes an fp32 product, either
operand optionally transposed in place, 2-D or batched over a leading axis, to `cblas_sgemm` from
the `mkl` wheel (the `cpu-blas` extra, which the Makefile installs on x86-64 Linux). The handler is
compiled on first use with the host's C++ compiler against the FFI headers jaxlib ships (about 5 s;
cached under $QEDJAX_CACHE or ~/.cache/qedjax, keyed by the sources, jaxlib's version and the
host's CPU flags). The same library holds the C++ flash attention kernel (csrc/cpu_attention.cc,
cpu_attention.py) and the single-pass AdamW update (csrc/cpu_adamw.cc, cpu_adamw.py).

`gemm(a, b, trans_a, trans_b)` is the product (for code whose backward pass is written out);
`matmul(x, w, transpose_w)` is differentiable, its gradients the same custom call with other
transposes (so a weight gradient needs no transposed copy of the rows). `available()` says whether
the custom calls can run here and, if not, why. `Qwen3Config.gemm == "mkl"` routes the projections
and the vocabulary projection here (`train.default_gemm` picks it on a one-device mesh of an Intel
CPU when it is available); `Qwen3Config.attention_kernel` routes flash attention to cpu_attention.

MKL threads with Intel OpenMP across the cores this process may use; its threads sleep as soon as a
product ends (KMP_BLOCKTIME=0, unless set). XLA may run two independent products at once, each with
its own thread team; serializing them (a lock in the handler) measured the same at 1 x 2048 (5.88
against 5.64 s, within the spread; again with the attention kernel, 4.85 s both ways) and 6% slower
at 2 x 128 (0.80 against 0.75 s), and one MKL thread per product was 55% slower.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

TARGET = "qedjax_gemm"
# flash attention's forward and backward passes (cpu_attention.py), in the same library
ATTENTION_TARGETS = ("qedjax_attention_fwd", "qedjax_attention_bwd")
# the single-pass AdamW update (cpu_adamw.py), in the same library
ADAMW_TARGET = "qedjax_adamw"
_SOURCES = tuple(Path(__file__).with_name("csrc") / name
                 for name in ("cpu_gemm.cc", "cpu_attention.cc", "cpu_adamw.cc"))
# -march=native: the attention kernel's elementwise loops take the host's widest vectors (the
# library is keyed by the host's CPU flags too, so a shared cache never hands it to another CPU);
# -fno-math-errno: without it GCC does not vectorize a loop with a square root (AdamW's update)
_FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp-simd", "-fno-math-errno", "-shared",
          "-fPIC", "-std=c++17", "-w")
_MKL_NAMES = ("libmkl_rt.so.2", "libmkl_rt.so")


def _mkl_path() -> Path | None:
    """libmkl_rt from the `mkl` wheel, which installs into the environment's lib/ (None if not there)."""
    for name in _MKL_NAMES:
        candidate = Path(sys.prefix) / "lib" / name
        if candidate.exists():
            return candidate
    return None


def _cache_dir() -> Path:
    root = os.environ.get("QEDJAX_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                          os.path.expanduser("~/.cache"), "qedjax")
    return Path(root)


def _cpu_flags() -> str:
    """The host's CPU feature flags (/proc/cpuinfo), which -march=native compiles for."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _build() -> Path:
    """The compiled handler library, built once per source, jaxlib version and CPU (atomic, so
    concurrent processes may race to build it)."""
    import jaxlib

    identity = b"".join(src.read_bytes() for src in _SOURCES) + " ".join(
        (jaxlib.__version__, *_FLAGS, _cpu_flags())).encode()
    key = hashlib.sha256(identity).hexdigest()[:16]
    out = _cache_dir() / f"cpu_gemm-{key}.so"
    if out.exists():
        return out
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) to build the MKL custom call")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, _SOURCES), "-o", str(built)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building the MKL custom call failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
        os.replace(built, out)
    return out


@functools.cache
def cpu_vendor() -> str | None:
    """This host's CPU vendor as /proc/cpuinfo names it ("GenuineIntel", "AuthenticAMD"), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _why_not(platform: str, mkl_path: Path | None) -> str | None:
    """Why the custom call cannot run on this platform with this MKL, or None."""
    if platform != "linux":
        return f"the MKL custom call is built for Linux only (this is {platform})"
    if mkl_path is None:
        return (f"MKL is not installed ({' or '.join(_MKL_NAMES)} not in {Path(sys.prefix) / 'lib'}; "
                "pip install -e '.[cpu-blas]' on x86-64 Linux)")
    return None


@functools.cache
def _load() -> str | None:
    """Loads MKL and the handler and registers the custom call, once per process; None on success,
    else the reason the custom call cannot run here."""
    mkl_path = _mkl_path()
    reason = _why_not(sys.platform, mkl_path)
    if reason is not None:
        return reason
    # Intel OpenMP's threads spin for 200 ms after each parallel region by default, taking the cores
    # from XLA's own threads between products: 2 x 128 ran 8% slower than without MKL, 1.4% faster
    # with no spinning (read when OpenMP starts, so before the first product; a value set wins).
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    try:
        mkl = ctypes.CDLL(str(mkl_path))
        sgemm = ctypes.cast(mkl.cblas_sgemm, ctypes.c_void_p)
        threads_local = ctypes.cast(mkl.MKL_Set_Num_Threads_Local, ctypes.c_void_p)
        lib = ctypes.CDLL(str(_build()))
    except (OSError, AttributeError, RuntimeError) as e:
        # MKL is installed, so XLA's slower products are a surprise: say so once, not only when asked
        warnings.warn(f"qedjax: MKL's products are off, XLA's run instead: {e}", stacklevel=2)
        return f"the MKL custom call cannot be loaded: {e}"
    lib.qedjax_set_sgemm(sgemm)
    lib.qedjax_attention_set_blas(sgemm, threads_local)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.QedjaxGemm), platform="cpu")
    for target, handler in zip(ATTENTION_TARGETS, (lib.QedjaxAttentionFwd, lib.QedjaxAttentionBwd)):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    jax.ffi.register_ffi_target(ADAMW_TARGET, jax.ffi.pycapsule(lib.QedjaxAdamW), platform="cpu")
    return None


def threads() -> int:
    """The cores this process may use: how many threads the attention and AdamW handlers split over."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def available() -> str | None:
    """None when `matmul` can run on this host, else why not."""
    return _load()


def applies(gemm: str, *operands: jax.Array) -> bool:
    """Whether a product of these operands runs here under Qwen3Config.gemm: "mkl" and all fp32
    (other dtypes stay with XLA)."""
    return gemm == "mkl" and all(x.dtype == jnp.float32 for x in operands)


def _out_shape(a: jax.Array, b: jax.Array, trans_a: bool, trans_b: bool) -> tuple[int, ...]:
    if a.dtype != jnp.float32 or b.dtype != jnp.float32 or a.ndim != b.ndim or a.ndim not in (2, 3):
        raise ValueError(f"cpu_gemm takes float32 operands, both 2-D or both 3-D, got "
                         f"{a.dtype}{list(a.shape)} and {b.dtype}{list(b.shape)}")
    m, k = (a.shape[-1], a.shape[-2]) if trans_a else a.shape[-2:]
    kb, n = (b.shape[-1], b.shape[-2]) if trans_b else b.shape[-2:]
    if k != kb or a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"cpu_gemm: {list(a.shape)} (trans_a={trans_a}) and {list(b.shape)} "
                         f"(trans_b={trans_b}) do not multiply")
    return (*a.shape[:-2], m, n)


def gemm(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """op(a) @ op(b) by MKL's sgemm, fp32: 2-D operands, or 3-D with a common leading batch dimension.
    Not differentiable (for code with its own backward pass, like flash attention's); see `matmul`."""
    reason = available()
    if reason is not None:
        raise RuntimeError(reason)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(_out_shape(a, b, trans_a, trans_b), jnp.float32))
    return call(a, b, trans_a=trans_a, trans_b=trans_b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x, w, transpose_w):
    return gemm(x, w, False, transpose_w)


def _matmul_fwd(x, w, transpose_w):
    return gemm(x, w, False, transpose_w), (x, w)


def _matmul_bwd(transpose_w, res, dy):
    x, w = res
    dx = gemm(dy, w, False, not transpose_w)  # dy w^T, or dy w when w was used transposed
    dw = gemm(dy, x, True, False) if transpose_w else gemm(x, dy, True, False)
    return dx, dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x: jax.Array, w: jax.Array, transpose_w: bool = False) -> jax.Array:
    """x [M, K] @ w [K, N] (or @ w.T for w [N, K] with `transpose_w`), fp32, by MKL's sgemm.
    Differentiable: both gradients are products of the same kind, transposing in place."""
    if x.ndim != 2 or w.ndim != 2:
        raise ValueError(f"cpu_gemm.matmul takes 2-D operands, got {list(x.shape)} and {list(w.shape)}")
    _out_shape(x, w, False, transpose_w)
    return _matmul(x, w, transpose_w)
