"""Reading and writing safetensors files one tensor at a time, bf16 included.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
data_offsets), then the raw little-endian bytes. Reading memory-maps the file, so a tensor costs host
memory only when it is touched; writing streams tensors into a file whose header is laid out first,
so a checkpoint never sits whole in host memory.

Alignment. The header written here is padded with spaces (as the format allows) so that the tensor
data starts at a multiple of 64 bytes: every tensor whose offset is a multiple of 64 (all of a
Qwen3's) then lies 64-byte aligned in the map, which jax.device_put on CPU takes without a copy
(SafetensorsFile.load). Files from other writers are only 8-byte aligned (the format's minimum).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
CODES = {v: k for k, v in DTYPES.items()}


_MADV_POPULATE_READ = 22  # Linux 5.14+ (not in Python's mmap module before 3.13)


def _address(buffer) -> int:
    """The address of a writable-or-not buffer's first byte."""
    return np.frombuffer(buffer, np.uint8, count=1).ctypes.data


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """An uninitialised array whose data starts at a multiple of `align` bytes."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + n].view(dtype).reshape(shape)


class SafetensorsFile:
    """A memory-mapped safetensors file: `names()`, `shape(name)`, `dtype(name)`, `get(name)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            try:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            except (struct.error, ValueError) as e:
                raise ValueError(f"{self.path}: not a safetensors file ({e})") from None
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._base = 8 + n
        self.metadata = header.pop("__metadata__", {}) or {}
        self._header = header
        self.bytes_read = 0  # bytes copied out by `read` or mapped by `load`

    def names(self) -> list[str]:
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def dtype_code(self, name: str) -> str:
        return self._header[name]["dtype"]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy view on the mapped file (no copy)."""
        entry = self._header[name]
        code = entry["dtype"]
        if code not in DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has dtype {code}, which qedjax cannot read "
                             f"(supported: {sorted(DTYPES)})")
        start, end = entry["data_offsets"]
        arr = np.frombuffer(self._map, dtype=DTYPES[code], count=(end - start) // DTYPES[code].itemsize,
                            offset=self._base + start)
        return arr.reshape(entry["shape"])

    def read(self, name: str, index: tuple = (), out: np.ndarray | None = None) -> np.ndarray:
        """A copy of `get(name)[index]` (a tuple of slices) in fresh, 64-byte aligned host memory: only
        the bytes of that slice are read from the file (page granularity aside); `bytes_read` adds
        them up. A run of whole rows is one read() from the file; other slices are gathered from the
        map. (On CPU, jax.device_put takes a 64-byte aligned array without copying it.) `out`: a
        buffer of at least that many bytes to read into instead (its start must be 64-byte aligned)."""
        view = self.get(name)
        index = tuple(index) + (slice(None),) * (view.ndim - len(index))
        sub = view[index]
        if out is None:
            out = aligned_empty(sub.shape, sub.dtype)
        else:
            out = out.reshape(-1).view(np.uint8)[:sub.nbytes].view(sub.dtype).reshape(sub.shape)
        rows = index[0] if view.ndim else slice(None)
        whole_rows = all(sl == slice(None) or (sl.start in (None, 0) and sl.stop in (None, n))
                         for sl, n in zip(index[1:], view.shape[1:]))
        if view.ndim and whole_rows and rows.step in (None, 1):
            start = self._header[name]["data_offsets"][0] + self._base
            row_bytes = view.itemsize * int(np.prod(view.shape[1:], dtype=np.int64))
            first = range(view.shape[0])[rows].start if len(range(view.shape[0])[rows]) else 0
            with open(self.path, "rb", buffering=0) as f:
                f.seek(start + first * row_bytes)
                got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
            if got != out.nbytes:
                raise ValueError(f"{self.path}: tensor {name!r} is cut short ({got} of {out.nbytes} bytes)")
        else:
            np.copyto(out, sub)
        self.bytes_read += out.nbytes
        return out

    def load(self, name: str, index: tuple = ()) -> np.ndarray:
        """`get(name)[index]` (a tuple of slices) for jax.device_put: a view of the map when the slice is
        one contiguous run of bytes (whole rows), its pages mapped now (MADV_POPULATE_READ where the
        kernel has it); else a copy from `read`. On CPU, jax.device_put takes a 64-byte aligned view
        without a copy, so the parameter is the page cache's memory, as torch's from_pretrained keeps
        it: nothing fresh is allocated (on a VM, first-touching fresh memory costs many times more
        than mapping page-cache pages: docs/BENCHMARKS.md, "Checkpoint load"). Donating such an array
        never writes to the file: XLA gives a donated buffer it does not own a fresh output."""
        sub = self.get(name)[tuple(index)]
        if not sub.flags.c_contiguous:
            return self.read(name, index)
        if sub.nbytes:
            start = sub.ctypes.data - _address(self._map)
            page = start - start % mmap.PAGESIZE
            try:
                self._map.madvise(_MADV_POPULATE_READ, page, start + sub.nbytes - page)
            except OSError:  # kernels before 5.14: the pages are mapped when first touched
                pass
        self.bytes_read += sub.nbytes
        return sub

    def close(self):
        try:
            self._map.close()
        except BufferError:  # arrays still view the map; it is released when they are collected
            pass


def write_safetensors(path: str | os.PathLike, specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                      produce: Callable[[str], np.ndarray], metadata: Mapping[str, str] | None = None):
    """Writes tensors to `path` one at a time.

    Args:
      specs: name -> (shape, dtype) of every tensor, in file order (the header is written first).
      produce: called once per name, in order; returns the array (it may be freed right after).
    """
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, (shape, dtype) in specs.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": CODES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 64)  # tensor data starts 64-byte aligned (see the docstring)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, (shape, dtype) in specs.items():
            arr = np.ascontiguousarray(produce(name))
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise ValueError(f"{path}: tensor {name!r} is {arr.shape} {arr.dtype}, "
                                 f"expected {tuple(shape)} {np.dtype(dtype)}")
            f.write(arr.reshape(-1).view(np.uint8))  # raw bytes, no copy (x86/ARM are little-endian)


def read_index(directory: str) -> dict[str, str]:
    """name -> file for a HF directory with `model.safetensors` or a sharded index."""
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError) as e:
                raise ValueError(f"{index}: not a safetensors index ({e})") from None
        missing = sorted({v for v in weight_map.values() if not os.path.exists(os.path.join(directory, v))})
        if missing:
            raise FileNotFoundError(f"{index} names files that are not there: {missing}")
        return {k: os.path.join(directory, v) for k, v in weight_map.items()}
    if os.path.exists(single):
        f = SafetensorsFile(single)
        names = f.names()
        f.close()
        return {name: single for name in names}
    raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def shard_plan(sizes: Iterable[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Groups names into consecutive shards of at most max_bytes (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards
