"""How the weight store (qedjax.rollout.weights) cuts one sharded parameter: qedjax shard -> HF rectangle,
the zarr chunk grid inside the shards' rectangles, and the checksum of each chunk a process writes.

See "Sharded writes" in qedjax.rollout.weights: every chunk lies inside one shard's rectangle, so
processes write their own shards without sharing a chunk; shards that are not rectangles in HF layout
make the tensor a gathered write by process 0.
"""

from __future__ import annotations

import jax
import numpy as np

from qedjax.convert import _to_host, hf_shape, to_hf


def digest(fn, block: np.ndarray) -> str:
    """Checksum of an array's bytes in C order (copies only if the view is not contiguous)."""
    return fn(np.ascontiguousarray(block).reshape(-1).view(np.uint8))


# --- qedjax shard -> HF rectangle ----------------------------------------------------------------------

def _merge_axes(outer: tuple[int, int], inner: tuple[int, int], size: int) -> tuple[int, int] | None:
    """The range covered by (outer, inner) ranges of two axes flattened as outer*size + inner, if
    contiguous."""
    if inner == (0, size):
        return outer[0] * size, outer[1] * size
    if outer[1] - outer[0] == 1:
        return outer[0] * size + inner[0], outer[0] * size + inner[1]
    return None


def hf_region(index: tuple[tuple[int, int], ...], shape: tuple[int, ...], layout: str):
    """The HF-layout rectangle holding the qedjax block `index` ((start, stop) per qedjax axis of an
    array of qedjax `shape`), or None when the block is not a rectangle in HF layout."""
    if layout == "same":
        return tuple(index)
    if layout == "head_rows":  # [heads, H, D] -> [heads*H, D]
        rows = _merge_axes(index[0], index[1], shape[1])
        return None if rows is None else (rows, index[2])
    if layout == "head_cols":  # [D, heads, H] -> [D, heads*H]
        cols = _merge_axes(index[1], index[2], shape[2])
        return None if cols is None else (index[0], cols)
    raise ValueError(f"unknown layout {layout!r}")


def _ranges(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _chunk_rows(rows: int, row_bytes: int, max_bytes: int) -> int:
    """The largest divisor of `rows` whose chunk stays under max_bytes (1 at least)."""
    limit = max(1, max_bytes // max(row_bytes, 1))
    best = 1
    for d in range(1, int(rows ** 0.5) + 1):
        if rows % d == 0:
            for c in (d, rows // d):
                if best < c <= limit:
                    best = c
    return best


class ShardedTensor:
    """How one parameter is written: its HF shape, chunk shape, and this process's blocks."""

    def __init__(self, key, value, np_dtype, chunk_bytes: int):
        self.name, self.layout, self.value = key.hf, key.layout, value
        shape = tuple(value.shape)
        self.shape = hf_shape(shape, key.layout)
        self.dtype = np_dtype
        self.gather = False
        base = self.shape
        if isinstance(value, jax.Array):
            index_map = value.sharding.devices_indices_map(shape)
            regions = {hf_region(_ranges(idx, shape), shape, key.layout) for idx in index_map.values()}
            sizes = {None if r is None else tuple(b - a for a, b in r) for r in regions}
            if None in sizes or len(sizes) != 1:
                self.gather = True  # not rectangles in HF layout: process 0 writes a gathered copy
            else:
                base = sizes.pop()
        row_bytes = int(np.prod(base[1:], dtype=np.int64)) * np_dtype.itemsize
        self.chunk = (_chunk_rows(base[0], row_bytes, chunk_bytes),) + tuple(base[1:])
        self.grid = tuple(-(-n // c) for n, c in zip(self.shape, self.chunk))

    def blocks(self):
        """(HF region, source) for every block this process writes; the source is a device array
        (converted on its device), or a host array already in HF layout."""
        if isinstance(self.value, jax.Array) and not self.gather:
            shape = tuple(self.value.shape)
            for shard in self.value.addressable_shards:
                if shard.replica_id == 0:
                    yield hf_region(_ranges(shard.index, shape), shape, self.layout), shard.data
            return
        # Replicated host values and gathered tensors: every process takes part in the gather
        # (it is collective), process 0 writes the whole tensor.
        host = _to_host(self.value) if isinstance(self.value, jax.Array) else np.asarray(self.value)
        if jax.process_index() == 0:
            yield tuple((0, n) for n in self.shape), to_hf(host, self.layout)

    def metadata(self) -> dict:
        return {"shape": list(self.shape), "data_type": self.dtype.name,
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(self.chunk)}},
                "chunk_key_encoding": {"name": "default"},
                "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
                "fill_value": 0}

    def chunk_checksums(self, region, block: np.ndarray, fn) -> dict[int, str]:
        """Checksums of the chunks inside a block (chunks are whole row ranges of the block)."""
        first = [a // c for (a, _), c in zip(region, self.chunk)]
        out = {}
        for i, row in enumerate(range(0, block.shape[0], self.chunk[0])):
            cell = np.ravel_multi_index([first[0] + i] + first[1:], self.grid)
            out[int(cell)] = digest(fn, block[row: row + self.chunk[0]])
        return out
