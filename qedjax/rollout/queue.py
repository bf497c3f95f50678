"""A work queue in a directory: the trainer submits rollout work, rollout workers claim it and hand
back results, all as files (qedjax.rollout.worker sends RL rollouts through it).

Layout under the root:

  todo/<item>.json               submitted work nobody holds yet (the payload)
  claimed/<item>@<worker>.json   work a worker holds: the same file, renamed
  done/<item>.json               results, until the trainer takes them
  workers/<worker>.json          each worker's heartbeat: a counter it bumps every few seconds
  tmp/                           files being written
  closed                         present once the trainer has finished; idle workers then exit

Atomicity. Every file is written whole under tmp/ (flushed and fsynced) and renamed into place, so a
reader listing todo/, done/ or workers/ never sees a partial file. A claim is a rename of
todo/<item>.json to claimed/<item>@<worker>.json: of two workers renaming the same file exactly one
succeeds and the other finds the source gone, so every item has one owner.

Dead workers. `requeue_dead(timeout_s)` (the trainer calls it while it waits) moves a claim back to
todo/ when its worker's heartbeat counter has not changed for `timeout_s` seconds of the caller's
own clock: a counter, not a timestamp, so hosts need no synchronised clocks. A worker that was only
slow and completes after all still delivers its result; the trainer takes the first result of an
item and drops repeats.

Where the directory lives: anywhere every host mounts with POSIX rename semantics: a local disk (all
on one host), NFS, Filestore, Lustre. Claims need an atomic rename, which object stores do not have,
so a bucket works only through a FUSE mount whose rename is one atomic server-side call. gcsfuse 3.1
and later rename with Cloud Storage's MoveObject call, which is atomic, on buckets that support it
(those with hierarchical namespace); a mount that renames by copy-then-delete (older gcsfuse, flat
buckets) can let two workers take the same item. Mount with the metadata caches off
(`--metadata-cache-ttl-secs=0`) so that listings are current. The weight store needs no rename and
talks to gs:// directly (qedjax.rollout.weights).

Item and worker ids are names of letters, digits, `_`, `-` and `.`. Payloads and results are JSON
objects. This module uses the standard library only, so it imports in a blink.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid

_ID = re.compile(r"^[A-Za-z0-9_.-]+$")
TODO, CLAIMED, DONE, WORKERS, TMP = "todo", "claimed", "done", "workers", "tmp"
CLOSED = "closed"


def check_id(name: str, kind: str = "id") -> str:
    if not isinstance(name, str) or not _ID.match(name) or name.startswith("."):
        raise ValueError(f"{kind} {name!r} must be letters, digits, '_', '-' and '.' (not leading)")
    return name


def _entries(directory: str) -> list[str]:
    """Names of the finished files in a directory, sorted (item ids sort in submission order)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.endswith(".json"))


class WorkQueue:
    """The queue rooted at a directory (created if missing); see the module docstring."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.path.abspath(os.fspath(root))
        for sub in (TODO, CLAIMED, DONE, WORKERS, TMP):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        self._beats: dict[str, int] = {}
        self._session = uuid.uuid4().hex[:12]  # a restarted worker of the same id never repeats a beat
        self._seen: dict[str, tuple[object, float]] = {}  # worker -> (its last counter, when it changed)

    def __repr__(self) -> str:
        return f"WorkQueue({self.root!r})"

    def _path(self, sub: str, name: str = "") -> str:
        return os.path.join(self.root, sub, name) if name else os.path.join(self.root, sub)

    def _write(self, path: str, obj) -> None:
        """Writes JSON to a temporary file in tmp/ and renames it to `path` (same filesystem)."""
        tmp = self._path(TMP, f"{uuid.uuid4().hex}.part")
        try:
            with open(tmp, "w") as f:
                json.dump(obj, f, separators=(",", ":"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            _unlink(tmp)
            raise

    @staticmethod
    def _read(path: str):
        with open(path) as f:
            return json.load(f)

    # --- the trainer's side ------------------------------------------------------------------------

    def submit(self, item_id: str, payload: dict) -> None:
        """Queues a work item (replacing an unclaimed one of the same id)."""
        self._write(self._path(TODO, f"{check_id(item_id, 'item id')}.json"), payload)

    def take_results(self) -> dict[str, dict]:
        """Every finished result, removed from the queue: {item id: result}."""
        out = {}
        for name in _entries(self._path(DONE)):
            path = self._path(DONE, name)
            try:
                out[name[:-len(".json")]] = self._read(path)
            except FileNotFoundError:  # another reader took it
                continue
            _unlink(path)
        return out

    def requeue_dead(self, timeout_s: float) -> list[str]:
        """Moves back to todo/ the claims of workers whose heartbeat has been still for `timeout_s`
        seconds (counted from when this queue object first saw it); returns their item ids."""
        now = time.monotonic()
        out = []
        for name in _entries(self._path(CLAIMED)):
            item, _, worker = name[:-len(".json")].partition("@")
            beat = self.heartbeat_of(worker)
            beat = None if beat is None else beat.get("beat")
            last = self._seen.get(worker)
            if last is None or last[0] != beat:
                self._seen[worker] = (beat, now)
            elif now - last[1] > timeout_s:
                try:
                    os.rename(self._path(CLAIMED, name), self._path(TODO, f"{item}.json"))
                    out.append(item)
                except FileNotFoundError:  # completed or released meanwhile
                    pass
        return out

    def purge(self) -> None:
        """Removes unclaimed work and untaken results (a new trainer session starts clean) and opens
        the queue. Claimed items are left to their workers; their results are dropped as unknown."""
        for sub in (TODO, DONE):
            for name in _entries(self._path(sub)):
                _unlink(self._path(sub, name))
        _unlink(os.path.join(self.root, CLOSED))

    def withdraw(self) -> None:
        """Removes unclaimed work (the trainer stops)."""
        for name in _entries(self._path(TODO)):
            _unlink(self._path(TODO, name))

    def close(self) -> None:
        """Marks the queue finished: workers exit once idle."""
        self._write(os.path.join(self.root, CLOSED), {"time": time.time()})

    @property
    def closed(self) -> bool:
        return os.path.exists(os.path.join(self.root, CLOSED))

    def counts(self) -> dict[str, int]:
        """Items waiting, held by workers, and finished (for progress messages)."""
        return {sub: len(_entries(self._path(sub))) for sub in (TODO, CLAIMED, DONE)}

    # --- the workers' side -------------------------------------------------------------------------

    def claim(self, worker_id: str) -> tuple[str, dict] | None:
        """The oldest unclaimed item as (item id, payload), now held by `worker_id`; None if none."""
        check_id(worker_id, "worker id")
        for name in _entries(self._path(TODO)):
            item = name[:-len(".json")]
            held = self._path(CLAIMED, f"{item}@{worker_id}.json")
            try:
                os.rename(self._path(TODO, name), held)
            except FileNotFoundError:
                # Another worker won. (On NFS a retransmitted rename can fail although the first
                # attempt moved the file: then the claim is ours after all.)
                if not os.path.exists(held):
                    continue
            try:
                return item, self._read(held)
            except FileNotFoundError:  # requeued at once: this worker's heartbeat had gone still
                continue
        return None

    def complete(self, item_id: str, result: dict, worker_id: str) -> None:
        """Publishes the result of a claimed item and drops the claim."""
        self._write(self._path(DONE, f"{check_id(item_id, 'item id')}.json"), result)
        _unlink(self._path(CLAIMED, f"{item_id}@{worker_id}.json"))
        # Requeued while we were slow: take the copy back so nobody redoes it (if someone already
        # claimed it, the trainer drops the repeat).
        _unlink(self._path(TODO, f"{item_id}.json"))

    def release(self, item_id: str, worker_id: str) -> None:
        """Hands a claimed item back unfinished (a worker stopping mid-item)."""
        try:
            os.rename(self._path(CLAIMED, f"{item_id}@{worker_id}.json"), self._path(TODO, f"{item_id}.json"))
        except FileNotFoundError:
            pass

    def release_all(self, worker_id: str) -> list[str]:
        """Hands back every item claimed under `worker_id` (a worker restarting under the same id
        takes over from its previous life, which cannot finish them); returns their ids."""
        held = [n[:-len(".json")].partition("@")[0] for n in _entries(self._path(CLAIMED))
                if n[:-len(".json")].partition("@")[2] == worker_id]
        for item in held:
            self.release(item, worker_id)
        return held

    def heartbeat(self, worker_id: str, **info) -> None:
        """Bumps the worker's heartbeat counter (with optional status fields for people to read)."""
        n = self._beats[worker_id] = self._beats.get(worker_id, 0) + 1
        self._write(self._path(WORKERS, f"{check_id(worker_id, 'worker id')}.json"),
                    {"beat": f"{self._session}-{n}", "time": time.time(), "pid": os.getpid(), **info})

    def heartbeat_of(self, worker_id: str) -> dict | None:
        try:
            return self._read(self._path(WORKERS, f"{worker_id}.json"))
        except (FileNotFoundError, ValueError):
            return None

    def leave(self, worker_id: str) -> None:
        """Removes the worker's heartbeat (a clean exit)."""
        _unlink(self._path(WORKERS, f"{worker_id}.json"))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
