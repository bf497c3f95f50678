"""Versioned weight store on tensorstore: the trainer publishes parameters, rollout engines load them.

Layout under the store root (a local directory, or any tensorstore kvstore URL: gs://, s3://, file://):

  v00000012/<hf_name>/zarr.json, c/...   one zarr v3 array per tensor: HF name, HF layout, uncompressed
  v00000012/parts/p00001.json            multi-host only: the chunk checksums each process computed
  manifests/v00000012.json               the commit record of version 12

Commit protocol. A version exists for readers only once its manifest exists, and the manifest is
written last, in one put of one small object. A single put is atomic on every kvstore (an object store
replaces the object whole; tensorstore's file driver writes a temporary file and renames it), so the
protocol needs no rename and no consistent listing, and works the same on local disk, GCS and S3.
Publishing a version that already exists first deletes its manifest; garbage collection deletes a
manifest before its arrays. So a reader sees a whole version or none. The one race left, a version
collected or re-published while a reader is still reading it, is caught by the checksums and the
missing-chunk check and reported as an error naming the version, never returned as weights.

The manifest holds the version, the dtype, the model's HF config (Qwen3Config.to_hf()), who wrote it,
and for every tensor in key-table order its name, shape, dtype, chunk shape and one checksum per chunk.

Sharded writes. Each process writes only the shards it owns (for each region of an array, the shard
with replica_id 0). The model keeps HF's layout, so a qedjax shard is a rectangle of the HF tensor: the
same one, and for `head_rows` / `head_cols` (q/k/v and o_proj) a block of whole heads (or part of one
head) flattened into contiguous rows or columns. The zarr chunk grid is cut so that every chunk lies inside one shard's rectangle, so
writers never share a chunk (no read-modify-write, no locks). A shard that splits head_dim while
spanning several heads is not a rectangle in HF layout; such a tensor is gathered and written by
process 0 (no training rule shards head_dim today); the cutting is in qedjax.rollout.weight_shards.
A dtype conversion runs on the shard's device (asynchronously, ahead of the host work), so only the
stored bytes cross to the host; the layout is a reshape of the host copy.

Checksums: xxh3-64 of each chunk's bytes in C order (xxhash, ~10 GB/s on one core), or crc32 from
zlib (~2 GB/s) where xxhash is missing; the manifest names the algorithm.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import re
import socket
import time
import zlib
from typing import Any, Iterator

import jax
import numpy as np
import tensorstore as ts
from flax import nnx

from qedjax import convert, storage
from qedjax.convert import NP_DTYPES, _get, abstract_model, hf_shape, key_table
from qedjax.models.qwen3 import Qwen3, Qwen3Config
from qedjax.rollout.weight_shards import ShardedTensor, digest

try:
    import xxhash
except ImportError:  # a dependency of `datasets`, so normally present
    xxhash = None

FORMAT = "qedjax-weights/1"
MANIFESTS = "manifests/"
DEFAULT_CHUNK_BYTES = 64 * 2**20  # chunks at most this big (a shard's rectangle is cut along rows)
IN_FLIGHT_BYTES = 512 * 2**20  # host bytes queued for tensorstore (writes) or prefetched (reads)
DEFAULT_FILE_CONCURRENCY = 32
_MANIFEST_KEY = re.compile(r"^v(\d{8})\.json$")
_VERSION_DIR = re.compile(r"^v(\d{8})/")


class WeightStoreError(RuntimeError):
    """A version that cannot be read whole: not committed, missing data, or corrupt."""


def _checksum_fn(name: str):
    if name == "xxh3_64":
        if xxhash is None:
            raise WeightStoreError("this version was written with xxh3_64 checksums; pip install xxhash")
        return xxhash.xxh3_64_hexdigest
    if name == "crc32":
        return lambda b: f"{zlib.crc32(b):08x}"
    raise WeightStoreError(f"unknown checksum algorithm {name!r}")


DEFAULT_CHECKSUM = "xxh3_64" if xxhash is not None else "crc32"


def _slices(region) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in region)


@functools.lru_cache(maxsize=None)
def _device_cast(dtype: str):
    """Jitted cast to the stored dtype, run on the shard's own device."""
    return jax.jit(lambda x: x.astype(dtype))


@functools.lru_cache(maxsize=8)
def _hf_shapes(config: Qwen3Config) -> dict[str, tuple[int, ...]]:
    """hf_name -> HF shape the config needs (from the abstract model; nothing allocated)."""
    shapes = nnx.to_pure_dict(abstract_model(config)[1])
    return {k.hf: hf_shape(tuple(_get(shapes, k.path).shape), k.layout) for k in key_table(config)}


class WeightStore:
    """Versioned HF-layout weights on a tensorstore kvstore (see the module docstring).

    Args:
      path: a local directory or a tensorstore kvstore URL (gs://bucket/dir/, s3://..., file://...).
      keep: committed versions kept after each publish (older ones are deleted).
      chunk_bytes: the largest chunk written.
      concurrency: concurrent file operations of tensorstore's file driver (object stores use their
        drivers' own request concurrency).
      direct_io: local files bypass the page cache (O_DIRECT). Reads get ~20% faster when one process
        per host reads a version; leave it off when several do (tensor-parallel vLLM workers each
        read the whole version, and all but the first are then served from the page cache).
    """

    def __init__(self, path: str | os.PathLike, keep: int = 3, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 concurrency: int | None = None, direct_io: bool = False):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.path = os.fspath(path)
        self.keep = keep
        self.chunk_bytes = chunk_bytes
        # Many files are fsync'd at once: tensorstore's default file concurrency (max(4, cores)) is low.
        context = {"file_io_concurrency": {"limit": concurrency or DEFAULT_FILE_CONCURRENCY}}
        if direct_io:
            context["file_io_mode"] = {"mode": "direct"}
        self._context = ts.Context(context)
        self._spec = storage.kvstore_spec(self.path)
        self._kv = ts.KvStore.open(self._spec, context=self._context).result()

    def __repr__(self) -> str:
        return f"WeightStore({self.path!r})"

    # --- reading -------------------------------------------------------------------------------------

    def versions(self) -> list[int]:
        """Committed versions, oldest first."""
        keys = self._kv.list(range=storage.prefix_range(MANIFESTS), strip_prefix_length=len(MANIFESTS)).result()
        found = (_MANIFEST_KEY.match(k.decode()) for k in keys)
        return sorted(int(m.group(1)) for m in found if m)

    def latest(self) -> int | None:
        """The newest committed version, or None for an empty store."""
        return (self.versions() or [None])[-1]

    def manifest(self, version: int) -> dict:
        got = self._kv.read(_manifest_key(version)).result()
        if got.state != "value":
            raise WeightStoreError(f"{self}: version {version} is not committed (no manifest); "
                                   f"committed versions: {self.versions()}")
        try:
            manifest = json.loads(got.value)
        except ValueError as e:
            raise WeightStoreError(f"{self}: version {version}: unreadable manifest ({e})") from None
        if manifest.get("format") != FORMAT or manifest.get("version") != version:
            raise WeightStoreError(f"{self}: version {version}: not a {FORMAT} manifest of this version")
        return manifest

    def config(self, version: int, manifest: dict | None = None) -> Qwen3Config:
        """The model config of a version (param and compute dtype set to the stored dtype)."""
        manifest = manifest or self.manifest(version)
        return Qwen3Config.from_hf(manifest["config"], source=f"{self} version {version}",
                                   param_dtype=manifest["dtype"], dtype=manifest["dtype"])

    def read(self, version: int) -> Iterator[tuple[str, np.ndarray]]:
        """(hf_name, array) pairs of a committed version, in key-table order.

        Each tensor is checked (shape, dtype, every chunk present, every chunk checksum) before it is
        yielded; any failure raises WeightStoreError naming the version and the tensor. Reads run ahead
        of the consumer by up to IN_FLIGHT_BYTES.
        """
        manifest = self.manifest(version)
        tensors = manifest["tensors"]
        expected = [k.hf for k in key_table(self.config(version, manifest))]
        if [t["name"] for t in tensors] != expected:
            raise WeightStoreError(f"{self}: version {version}: manifest tensors do not match the key "
                                   f"table of its config")
        fn = _checksum_fn(manifest["checksum"])
        opened = [ts.open({"driver": "zarr3", "kvstore": self._child(_array_dir(version, t["name"])),
                           "fill_missing_data_reads": False}, open=True, read=True, context=self._context)
                  for t in tensors]
        pending: collections.deque = collections.deque()
        queued, nxt = 0, 0
        for i, t in enumerate(tensors):
            while nxt < len(tensors) and (nxt <= i or queued < IN_FLIGHT_BYTES):
                pending.append(self._start_read(version, tensors[nxt], opened[nxt]))
                queued += pending[-1][1]
                nxt += 1
            future, nbytes = pending.popleft()
            queued -= nbytes
            try:
                array = future.result()
            except Exception as e:
                raise WeightStoreError(f"{self}: version {version}: tensor {t['name']}: read failed "
                                       f"({e})") from None
            self._verify(version, t, array, fn)
            yield t["name"], array

    def _start_read(self, version: int, t: dict, opening) -> tuple[Any, int]:
        name = t["name"]
        try:
            store = opening.result()
        except Exception as e:
            raise WeightStoreError(f"{self}: version {version}: tensor {name}: array missing or "
                                   f"unreadable ({e})") from None
        shape, dtype = tuple(t["shape"]), np.dtype(NP_DTYPES[t["dtype"]])
        if tuple(store.shape) != shape or np.dtype(store.dtype.numpy_dtype) != dtype:
            raise WeightStoreError(f"{self}: version {version}: tensor {name}: stored shape/dtype "
                                   f"{tuple(store.shape)}/{store.dtype.name} do not match the manifest "
                                   f"{shape}/{dtype.name}")
        if tuple(store.chunk_layout.read_chunk.shape) != tuple(t["chunk_shape"]):
            raise WeightStoreError(f"{self}: version {version}: tensor {name}: chunk shape "
                                   f"{tuple(store.chunk_layout.read_chunk.shape)} does not match the "
                                   f"manifest {tuple(t['chunk_shape'])}")
        return store.read(), int(np.prod(shape, dtype=np.int64)) * dtype.itemsize

    def _verify(self, version: int, t: dict, array: np.ndarray, fn) -> None:
        chunk = tuple(t["chunk_shape"])
        grid = tuple(-(-n // c) for n, c in zip(array.shape, chunk))
        sums = t["checksums"]
        if len(sums) != int(np.prod(grid, dtype=np.int64)):
            raise WeightStoreError(f"{self}: version {version}: tensor {t['name']}: manifest has "
                                   f"{len(sums)} checksums for {int(np.prod(grid))} chunks")
        for cell, want in enumerate(sums):
            pos = np.unravel_index(cell, grid)
            view = array[tuple(slice(p * c, (p + 1) * c) for p, c in zip(pos, chunk))]
            if digest(fn, view) != want:
                raise WeightStoreError(f"{self}: version {version}: tensor {t['name']}: checksum "
                                       f"mismatch in chunk {tuple(int(p) for p in pos)} (corrupt, or "
                                       f"overwritten while being read)")

    # --- writing -------------------------------------------------------------------------------------

    def publish(self, params_or_model: Qwen3 | dict, version: int, *, config: Qwen3Config | None = None,
                dtype: str | None = None) -> None:
        """Writes `version` and commits it; every process of a multi-host run must call this.

        Args:
          params_or_model: a Qwen3 module, or its params pure dict (nnx.to_pure_dict) with `config`.
            Arrays may be sharded over any mesh; each process writes the shards it owns.
          version: a non-negative int; publishing an existing version replaces it.
          config: the model config (taken from the module when one is given).
          dtype: stored dtype, "float32" or "bfloat16" (default: the config's param dtype).
        Returns when the version is committed (visible to readers) on every process.
        """
        config, params = convert.params_and_config(params_or_model, config, "publish")
        if not isinstance(version, int) or not 0 <= version < 10**8:
            raise ValueError(f"version must be an int in [0, 1e8), got {version!r}")
        dtype = dtype or config.param_dtype
        if dtype not in NP_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(NP_DTYPES)}, got {dtype!r}")
        np_dtype = NP_DTYPES[dtype]
        leader, multihost = jax.process_index() == 0, jax.process_count() > 1
        tensors = [ShardedTensor(k, _get(params, k.path), np_dtype, self.chunk_bytes) for k in key_table(config)]
        for t in tensors:
            if t.shape != (want := _hf_shapes(config)[t.name]):
                raise ValueError(f"publish: {t.name} has HF shape {t.shape}, the config needs {want}")
        if leader:  # un-commit first, so a reader never pairs an old manifest with new arrays
            self._kv.delete_range(storage.prefix_range(_manifest_key(version))).result()
            self._kv.delete_range(storage.prefix_range(f"v{version:08d}/")).result()
        _barrier(f"qedjax_weights_clear_{version}", multihost)
        checksum = DEFAULT_CHECKSUM
        sums = self._write_arrays(version, tensors, leader, _checksum_fn(checksum))
        if multihost:
            part = json.dumps({t.name: s for t, s in zip(tensors, sums)}).encode()
            self._kv.write(f"v{version:08d}/parts/p{jax.process_index():05d}.json", part).result()
            _barrier(f"qedjax_weights_written_{version}", multihost)
            if leader:
                sums = self._merge_parts(version, tensors)
        if leader:
            manifest = {
                "format": FORMAT, "version": version, "dtype": dtype, "checksum": checksum,
                "config": {**config.to_hf(), "torch_dtype": dtype, "dtype": dtype},
                "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": dtype,
                             "chunk_shape": list(t.chunk), "checksums": self._ordered(version, t, s)}
                            for t, s in zip(tensors, sums)],
                "writer": {"host": socket.gethostname(), "pid": os.getpid(),
                           "process_count": jax.process_count(), "time": time.time(),
                           "jax": jax.__version__},
            }
            self._kv.write(_manifest_key(version), json.dumps(manifest).encode()).result()  # the commit
            self._collect_garbage(version)
        _barrier(f"qedjax_weights_committed_{version}", multihost)

    def uncommit(self, version: int) -> None:
        """Withdraws a committed version from readers by deleting its manifest (how publish and garbage
        collection uncommit too); its arrays go when the version is published again or collected.
        Call it from one process."""
        self._kv.delete_range(storage.prefix_range(_manifest_key(version))).result()

    def _write_arrays(self, version: int, tensors: list[ShardedTensor], leader: bool, fn) -> list[dict]:
        """Writes this process's blocks; returns each tensor's {chunk cell: checksum}."""
        stores = []
        for t in tensors:  # the leader writes zarr.json; the others assume the same metadata
            spec = {"driver": "zarr3", "kvstore": self._child(_array_dir(version, t.name)),
                    "metadata": t.metadata()}
            stores.append(ts.open(spec, create=leader, open=not leader, assume_metadata=not leader,
                                  context=self._context))
        jobs = ((i, region, src) for i, t in enumerate(tensors) for region, src in t.blocks())
        sums: list[dict] = [{} for _ in tensors]
        converted: collections.deque = collections.deque()
        writes: collections.deque = collections.deque()
        queued = 0

        def convert_next():
            job = next(jobs, None)
            if job is not None:
                i, region, src = job
                t = tensors[i]
                if isinstance(src, jax.Array):  # async on the device; only stored bytes reach the host
                    if src.dtype != t.dtype:
                        src = _device_cast(t.dtype.name)(src)
                    src.copy_to_host_async()
                converted.append((i, region, src))

        convert_next()
        while converted:
            convert_next()  # keep one conversion running ahead of the host work
            i, region, src = converted.popleft()
            t = tensors[i]
            block = np.ascontiguousarray(np.asarray(src), dtype=t.dtype).reshape([b - a for a, b in region])
            sums[i].update(t.chunk_checksums(region, block, fn))
            # The block is never modified, so tensorstore may keep it instead of copying it.
            write = stores[i].result()[_slices(region)].write(
                block, can_reference_source_data_indefinitely=True)
            writes.append((write, block.nbytes, t.name))
            queued += block.nbytes
            while queued > IN_FLIGHT_BYTES:
                queued -= self._finish_write(version, writes.popleft())
        while writes:
            self._finish_write(version, writes.popleft())
        return sums

    def _finish_write(self, version: int, write) -> int:
        future, nbytes, name = write
        try:
            future.result()
        except Exception as e:
            raise WeightStoreError(f"{self}: version {version}: writing {name} failed ({e})") from None
        return nbytes

    def _merge_parts(self, version: int, tensors: list[ShardedTensor]) -> list[dict]:
        sums: list[dict] = [{} for _ in tensors]
        for p in range(jax.process_count()):
            got = self._kv.read(f"v{version:08d}/parts/p{p:05d}.json").result()
            if got.state != "value":
                raise WeightStoreError(f"{self}: version {version}: process {p} left no checksums")
            part = json.loads(got.value)
            for i, t in enumerate(tensors):
                sums[i].update({int(c): s for c, s in part[t.name].items()})
        return sums

    def _ordered(self, version: int, t: ShardedTensor, sums: dict[int, str]) -> list[str]:
        """Chunk checksums in grid (C) order; every chunk must have been written by some process."""
        n = int(np.prod(t.grid, dtype=np.int64))
        if len(sums) != n:  # a bug in the region bookkeeping, never expected
            raise WeightStoreError(f"{self}: version {version}: tensor {t.name}: {n - len(sums)} chunks unwritten")
        return [sums[c] for c in range(n)]

    def _collect_garbage(self, just_committed: int) -> None:
        """Keeps the newest `keep` committed versions; deletes older ones (manifest first) and the
        arrays of uncommitted versions older than the one just committed (writers killed mid-way)."""
        committed = self.versions()
        kept = set(committed[-self.keep:])
        for v in committed:
            if v not in kept:
                self._kv.delete_range(storage.prefix_range(_manifest_key(v))).result()
        keys = self._kv.list(range=ts.KvStore.KeyRange("v", "w")).result()
        dirs = {int(m.group(1)) for m in (_VERSION_DIR.match(k.decode()) for k in keys) if m}
        for v in sorted(dirs):
            if v not in kept and v < just_committed:
                self._kv.delete_range(storage.prefix_range(f"v{v:08d}/")).result()

    def _child(self, suffix: str) -> dict:
        return {**self._spec, "path": self._spec.get("path", "") + suffix}


def _manifest_key(version: int) -> str:
    return f"{MANIFESTS}v{version:08d}.json"


def _array_dir(version: int, name: str) -> str:
    return f"v{version:08d}/{name}/"


def _barrier(name: str, multihost: bool) -> None:
    if multihost:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
