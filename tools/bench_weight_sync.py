"""Weight-store publish and read time against the raw bandwidth of the same disk, measured in one run.

  python tools/bench_weight_sync.py [--dir DIR] [--preset qwen3-0.6b] [--repeats 3] [--vllm] [--dtype float32]
                                    [--param-dtype float32] [--gcs]

The model: random bf16 parameters of the preset's shapes, made leaf by leaf directly in bf16 (never a
second fp32 copy of the model). Each repeat, alternating so that load from other processes hits both
alike:
  raw write  the same bytes, tensor after tensor, into one file with plain file IO, then fsync
  raw read   that file read back in 64 MiB blocks into one reused buffer (the disk's bandwidth)
  raw read into new arrays   the same, tensor by tensor into new arrays with np.fromfile (what any
             reader that hands out arrays pays: first-touch page faults on new memory)
  publish    WeightStore.publish (layout transform, checksums, zarr chunks, fsync per file as
             tensorstore's file driver does by default, manifest, garbage collection)
  read       WeightStore.read, every tensor checked against its checksums
With `--vllm` (vLLM importable: the CUDA build, or the CPU build `make venv` installs), a VllmEngine
follows the store and each repeat also times the whole sync, from the end of a train step to vLLM
serving the new version:
  vllm load  VllmEngine.load_weights: WeightStore.read (cold, checksummed) into vLLM's worker through
             the layerwise reload, kernel repacking, and the prefix-cache reset
  sync       publish + vllm load, against raw write + raw read of the same bytes
With `--param-dtype float32 --dtype bfloat16` the parameters are a trainer's fp32 master weights of a
bf16 model, published in the engine's dtype (what engine.kind=vllm/workers do); the bytes of a version
are printed either way. With `--gcs` the store is a bucket of the fake-gcs-server emulator on 127.0.0.1
(tests/gcs.py; the raw figures stay those of the local disk, the page-cache eviction of the store is
skipped).
Page cache: before every read phase, each file that is about to be read is evicted from the page
cache with posix_fadvise(DONTNEED) (it has been fsync'd, so its pages are clean and do get dropped;
this needs no root, unlike /proc/sys/vm/drop_caches). A warm re-read of the raw file is printed too,
to show that the cold reads did hit the disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qedjax.convert import abstract_model
from qedjax.models.qwen3 import Qwen3Config
from qedjax.rollout import weights
from qedjax.rollout.weights import WeightStore

BLOCK = 64 * 2**20


def random_params(config: Qwen3Config) -> dict:
    """Parameters of the config's shapes and param dtype, each leaf drawn directly in that dtype."""
    shapes = nnx.to_pure_dict(abstract_model(config)[1])
    leaves, treedef = jax.tree.flatten(shapes)
    dtype = jnp.dtype(config.param_dtype)
    made = [0.02 * jax.random.normal(jax.random.key(i), s.shape, dtype) for i, s in enumerate(leaves)]
    return jax.tree.unflatten(treedef, made)


def evict(path: str) -> None:
    """Drops a file's (clean) pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def evict_tree(root: str) -> None:
    for parent, _, files in os.walk(root):
        for f in files:
            evict(os.path.join(parent, f))


def evict_store(store_dir: str) -> None:
    if "://" not in store_dir:  # a bucket has no page cache here
        evict_tree(store_dir)


def raw_write(path: str, leaves: list[np.ndarray]) -> float:
    start = time.perf_counter()
    with open(path, "wb") as f:
        for leaf in leaves:
            f.write(leaf.reshape(-1).view(np.uint8).data)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - start


def raw_read(path: str, nbytes: int) -> float:
    buf = bytearray(min(BLOCK, nbytes))
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - start


def raw_read_fresh(path: str, leaves: list[np.ndarray]) -> float:
    """The file read back tensor by tensor into new arrays (what a reader that returns arrays pays)."""
    start = time.perf_counter()
    with open(path, "rb") as f:
        for leaf in leaves:
            got = np.fromfile(f, dtype=np.uint8, count=leaf.nbytes)
            assert got.size == leaf.nbytes
    return time.perf_counter() - start


def store_read(store: WeightStore, version: int) -> float:
    start = time.perf_counter()
    total = sum(a.nbytes for _, a in store.read(version))
    elapsed = time.perf_counter() - start
    assert total > 0
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir under /tmp)")
    parser.add_argument("--preset", default="qwen3-0.6b")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-mb", type=int, default=weights.DEFAULT_CHUNK_BYTES // 2**20)
    parser.add_argument("--concurrency", type=int, default=None, help="tensorstore file I/O concurrency")
    parser.add_argument("--direct-io", action="store_true", help="WeightStore(direct_io=True)")
    parser.add_argument("--vllm", action="store_true", help="also time loading each version into vLLM")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="the engine's dtype: what a version is published in")
    parser.add_argument("--param-dtype", choices=("bfloat16", "float32"),
                        help="the trainer's parameters (default: --dtype)")
    parser.add_argument("--gcs", action="store_true", help="the store on the fake-gcs-server emulator")
    args = parser.parse_args()

    config = Qwen3Config.preset(args.preset, param_dtype=args.param_dtype or args.dtype, dtype=args.dtype)
    params = random_params(config)
    host = [np.asarray(x).astype(args.dtype) if str(x.dtype) != args.dtype else np.asarray(x)
            for x in jax.tree.leaves(params)]  # the published bytes, for the raw figures
    nbytes = sum(x.nbytes for x in host)
    root = tempfile.mkdtemp(prefix="bench_weight_sync_", dir=args.dir)
    raw_file = os.path.join(root, "raw.bin")
    emulator = None
    if args.gcs:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        from gcs import Emulator

        emulator = Emulator(backend="filesystem")  # GBs of versions: see tests/gcs.py
        store_dir = f"{emulator.bucket()}/store"
    else:
        store_dir = os.path.join(root, "store")
    store = WeightStore(store_dir, keep=2, chunk_bytes=args.chunk_mb * 2**20, concurrency=args.concurrency,
                        direct_io=args.direct_io)
    gb = nbytes / 1e9
    print(f"{args.preset}: {len(host)} tensors, {gb:.3f} GB {args.dtype}; dir {root}; chunks <= {args.chunk_mb} MiB; "
          f"checksum {weights.DEFAULT_CHECKSUM}; file concurrency "
          f"{args.concurrency or weights.DEFAULT_FILE_CONCURRENCY}; direct_io {args.direct_io}; "
          f"{os.cpu_count()} cpus")
    times: dict[str, list[float]] = {k: [] for k in ("raw_write", "raw_read", "raw_read_fresh", "publish",
                                                      "read")}
    engine, parts = None, []
    if args.vllm:
        times["vllm_load"] = []
        engine = start_vllm(store, params, config, root)
    try:
        for rep in range(1, args.repeats + 1):
            times["raw_write"].append(raw_write(raw_file, host))
            evict(raw_file)
            times["raw_read"].append(raw_read(raw_file, nbytes))
            evict(raw_file)
            times["raw_read_fresh"].append(raw_read_fresh(raw_file, host))
            os.remove(raw_file)
            start = time.perf_counter()
            store.publish(params, rep, config=config, dtype=args.dtype)
            times["publish"].append(time.perf_counter() - start)
            evict_store(store_dir)
            times["read"].append(store_read(store, rep))
            if engine is not None:
                evict_store(store_dir)
                start = time.perf_counter()
                engine.load_weights(rep)
                times["vllm_load"].append(time.perf_counter() - start)
                parts.append(engine.load_times)
            print("  repeat %d: " % rep + ", ".join(f"{k} {v[-1]:.2f}s ({gb / v[-1]:.2f} GB/s)"
                                                    for k, v in times.items()))
        raw_write(raw_file, host)
        raw_read(raw_file, nbytes)
        warm = raw_read(raw_file, nbytes)
        print(f"  (warm raw re-read, page cache kept: {gb / warm:.2f} GB/s)")
        stored = sum(np.prod(t["shape"]) * np.dtype(weights.NP_DTYPES[t["dtype"]]).itemsize
                     for t in store.manifest(args.repeats)["tensors"])
        print(f"  a version: {stored / 1e9:.3f} GB ({args.dtype}, from {config.param_dtype} parameters of "
              f"{sum(x.nbytes for x in jax.tree.leaves(params)) / 1e9:.3f} GB)")
    finally:
        if engine is not None:
            engine.close()
        if emulator is not None:
            emulator.stop()
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"median of {args.repeats}:")
    print(f"  write: publish {gb / med['publish']:.2f} GB/s vs raw {gb / med['raw_write']:.2f} GB/s "
          f"-> {med['raw_write'] / med['publish']:.0%} of disk bandwidth")
    print(f"  read:  read {gb / med['read']:.2f} GB/s vs raw {gb / med['raw_read']:.2f} GB/s "
          f"-> {med['raw_read'] / med['read']:.0%} of disk bandwidth; raw into new arrays "
          f"{gb / med['raw_read_fresh']:.2f} GB/s -> {med['raw_read_fresh'] / med['read']:.0%} of that")
    if engine is not None:
        sync, raw = med["publish"] + med["vllm_load"], med["raw_write"] + med["raw_read"]
        print(f"  vLLM:  load {med['vllm_load']:.2f}s ({gb / med['vllm_load']:.2f} GB/s); sync (publish + load) "
              f"{sync:.2f}s vs raw write + read {raw:.2f}s -> {sync / raw:.2f}x the raw disk time")
        print("  vLLM load, inside its worker (median): " + ", ".join(
            f"{k} {statistics.median(p[k] for p in parts):.2f}s" for k in parts[0]) +
              " (read: WeightStore.read; load: model.load_weights into the layers, each processed when complete;"
              " finalize: layers left over, the tied head)")


def start_vllm(store: WeightStore, params, config: Qwen3Config, root: str):
    """A VllmEngine on version 0 of the store (not timed: starting vLLM takes 20 s to minutes)."""
    import vllm

    from qedjax import toy
    from qedjax.rollout.vllm import VllmEngine

    store.publish(params, 0, config=config, dtype=config.dtype)
    tokenizer = toy.build_tokenizer(os.path.join(root, "tokenizer"), vocab_size=512)
    t0 = time.perf_counter()
    engine = VllmEngine(store, tokenizer, version=0, max_model_len=256, max_num_seqs=4)
    print(f"  vLLM {vllm.__version__} started in {time.perf_counter() - t0:.0f}s", flush=True)
    return engine


if __name__ == "__main__":
    main()
