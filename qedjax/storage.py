"""Storage by path or URL: a local directory or an object-store URL (gs://bucket/dir, s3://...), opened as
a tensorstore kvstore, for the weight store, the rollout work queue and the preflight checks.

Object stores have no rename and no directories: a key is written whole by one put (atomic on every
kvstore: an object store replaces the object whole, tensorstore's file driver writes a temporary file
and renames it), and a listing of a prefix is current after a write (Cloud Storage and S3 are strongly
consistent for reads and lists). The weight store and the queue need nothing more.

Against an emulator (tests): tensorstore's gcs driver reads TENSORSTORE_GCS_HTTP_URL and
GOOGLE_AUTH_TOKEN_FOR_TESTING; gcsfs (Orbax's gs:// directories, through etils) reads STORAGE_EMULATOR_HOST.
"""

from __future__ import annotations

import os
import uuid

import tensorstore as ts

TIMEOUT_S = 60.0  # one small request to a store; an unreachable endpoint fails within this


class StorageError(RuntimeError):
    """A store that cannot be reached, read or written; the message names its path or URL."""


def is_url(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def location(path: str | os.PathLike) -> str:
    """A path made absolute (URLs as they are), with no trailing slash."""
    path = os.fspath(path)
    return path.rstrip("/") if is_url(path) else os.path.abspath(path)


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...` for a local path or a URL."""
    base = location(base)
    return "/".join([base, *parts]) if is_url(base) else os.path.join(base, *parts)


def parent(path: str | os.PathLike) -> str:
    """The directory (or URL prefix) holding `path`."""
    path = location(path)
    return path.rsplit("/", 1)[0] if is_url(path) else os.path.dirname(path)


def kvstore_spec(path: str | os.PathLike) -> dict:
    """A local directory or a kvstore URL -> kvstore JSON spec whose path ends in '/'."""
    path = os.fspath(path)
    if is_url(path):
        spec = ts.KvStore.Spec(path).to_json()
    else:
        spec = {"driver": "file", "path": os.path.abspath(path)}
    if spec.get("path", "") and not spec["path"].endswith("/"):
        spec["path"] += "/"
    return spec


def open_kvstore(path: str | os.PathLike, context: ts.Context | None = None) -> ts.KvStore:
    try:
        return ts.KvStore.open(kvstore_spec(path), context=context).result(timeout=TIMEOUT_S)
    except Exception as e:
        raise StorageError(f"cannot open the store {location(path)}: {e}") from None


def prefix_range(prefix: str) -> ts.KvStore.KeyRange:
    """Every key that starts with `prefix`."""
    return ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))


def check_writable(path: str | os.PathLike, what: str = "store") -> None:
    """Writes, reads back and deletes a probe key under `path`; raises StorageError naming the URL and
    the reason (no such bucket, no permission, unreachable) within about TIMEOUT_S."""
    key = f".qedjax-probe-{uuid.uuid4().hex}"
    try:
        kv = ts.KvStore.open(kvstore_spec(path)).result(timeout=TIMEOUT_S)
        kv.write(key, b"probe").result(timeout=TIMEOUT_S)
        got = kv.read(key).result(timeout=TIMEOUT_S)
        kv.write(key, None).result(timeout=TIMEOUT_S)
    except Exception as e:
        raise StorageError(f"the {what} {location(path)} is not writable: {type(e).__name__}: "
                           f"{(str(e).splitlines() or [''])[0][:300]}") from None
    if got.state != "value" or got.value != b"probe":
        raise StorageError(f"the {what} {location(path)} did not read back what was written to it")
