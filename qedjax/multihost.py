"""Small host-side exchanges between the processes of a multi-process run."""

from __future__ import annotations

import json

import jax
import numpy as np

PIECE_BYTES = 1 << 24  # a broadcast's bytes go in pieces of this size (bounded device memory)


def broadcast_json(obj, source: int = 0) -> object:
    """Process `source`'s JSON-serialisable value on every process (a collective: all must call it).
    A single process gets its own value back."""
    if jax.process_count() == 1:
        return obj
    from jax.experimental import multihost_utils

    lead = jax.process_index() == source
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if lead else np.zeros(0, np.uint8)
    size = multihost_utils.broadcast_one_to_all(np.asarray(divmod(data.size, 2**30), np.int32), is_source=lead)
    n = int(size[0]) * 2**30 + int(size[1])
    out = bytearray()
    for at in range(0, n, PIECE_BYTES):
        piece = data[at:at + PIECE_BYTES] if lead else np.zeros(min(PIECE_BYTES, n - at), np.uint8)
        out += np.asarray(multihost_utils.broadcast_one_to_all(piece, is_source=lead)).astype(np.uint8).tobytes()
    return json.loads(bytes(out))


def allgather_json(obj) -> list:
    """Every process's JSON-serialisable value, by process index (a collective: all must call it)."""
    return [broadcast_json(obj, source) for source in range(jax.process_count())]


def sync(name: str) -> None:
    """Every process reaches this point before any goes on."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
