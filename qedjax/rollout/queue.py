"""The rollout work queue: the trainer hands out work items, rollout workers hand back results, all as
objects under one root (a local directory or a URL such as gs://bucket/run/queue; qedjax.storage).

Layout under the root, and who writes each key:

  items/<item>.json               the payload of a submitted item                    trainer
  assigned/<worker>/<item>.json   the item given to that worker ({"attempt": n})     trainer
  done/<worker>/<item>.json       the worker's result                                that worker
  workers/<worker>.json           the worker's heartbeat (a counter and its status)  that worker
  closed                          present once the stage is finished                  trainer

Why the trainer assigns, instead of workers claiming. A claim must be exclusive: of two workers
taking the same item exactly one may win. On a POSIX filesystem a rename does that; object stores
have no rename, and a claim by "create this key unless it exists" needs a conditional write
(Cloud Storage's ifGenerationMatch=0), which the GCS emulators in use do not all enforce (fake-gcs-server
ignored the precondition on simple uploads until mid-2026), so such a queue could not be tested
anywhere but on the real service. Here no key ever has two writers: the trainer alone decides who
makes what, each worker writes only its own heartbeat and its own results. That needs nothing from
the store but whole-object puts and current listings, which Cloud Storage, S3 and local disks all
give, and the trainer knows which worker made which item (the per-worker shares in the metrics).

Assignment. Each poll, the trainer (`WorkQueue.dispatch`) gives every live worker with fewer than
`slots` unfinished items the oldest unassigned ones. A worker makes its assigned items oldest first and
writes each result under done/. Items are small (a few problems of a step), so every live worker
shares every step.

Dead workers. A worker is dead when its heartbeat counter has not changed for `timeout_s` seconds of
the trainer's own clock (a counter, not a timestamp: hosts need no synchronised clocks) or when its
heartbeat is gone (a worker that stops cleanly, or on SIGTERM, deletes it). Its items are assigned
to others. A worker that was only slow and finishes after all still delivers: the trainer takes the
first result of an item and drops repeats.

Item and worker ids are names of letters, digits, `_`, `-` and `.`. Payloads and results are JSON
objects.
"""

from __future__ import annotations

import collections
import json
import os
import re
import time
import uuid

from qedjax import storage

_ID = re.compile(r"^[A-Za-z0-9_.-]+$")
ITEMS, ASSIGNED, DONE, WORKERS, CLOSED = "items/", "assigned/", "done/", "workers/", "closed"
HEARTBEAT_S = 10.0  # a worker bumps its heartbeat this often
DEAD_AFTER_S = 300.0  # the trainer reassigns the items of a worker whose heartbeat was still this long


def check_id(name: str, kind: str = "id") -> str:
    if not isinstance(name, str) or not _ID.match(name) or name.startswith("."):
        raise ValueError(f"{kind} {name!r} must be letters, digits, '_', '-' and '.' (not leading)")
    return name


def _name(key: str, prefix: str) -> str:
    """The id in a key `prefix<id>.json`."""
    return key[len(prefix):-len(".json")]


class WorkQueue:
    """The queue rooted at a path or URL; see the module docstring."""

    def __init__(self, root: str | os.PathLike):
        self.root = storage.location(root)
        self._kv = storage.open_kvstore(self.root)
        self._beats: dict[str, int] = {}
        self._session = uuid.uuid4().hex[:12]  # a restarted worker of the same id never repeats a beat
        self._seen: dict[str, tuple[object, float]] = {}  # worker -> (its last counter, when it changed)
        self.attempts: collections.Counter = collections.Counter()  # item -> times assigned (trainer)

    def __repr__(self) -> str:
        return f"WorkQueue({self.root!r})"

    # --- objects ------------------------------------------------------------------------------------

    def _put(self, key: str, obj) -> None:
        self._put_all({key: obj})

    def _put_all(self, objects: dict) -> None:
        """Writes every {key: JSON object} at once (an object store's requests overlap, not queue)."""
        self._wait({key: self._kv.write(key, json.dumps(obj, separators=(",", ":")).encode())
                    for key, obj in objects.items()}, "writing")

    def _delete_all(self, keys) -> None:
        self._wait({key: self._kv.write(key, None) for key in keys}, "deleting")

    def _wait(self, futures: dict, doing: str) -> dict:
        out = {}
        for key, future in futures.items():
            try:
                out[key] = future.result(timeout=storage.TIMEOUT_S)
            except Exception as e:
                raise OSError(f"{self}: {doing} {key} failed: {e}") from None
        return out

    def _get(self, key: str):
        """The JSON object at `key`, or None if there is none."""
        try:
            got = self._kv.read(key).result(timeout=storage.TIMEOUT_S)
        except Exception as e:
            raise OSError(f"{self}: reading {key} failed: {e}") from None
        return json.loads(got.value) if got.state == "value" else None

    def _delete(self, key: str) -> None:
        self._delete_all([key])

    def _list(self, prefix: str) -> list[str]:
        """Keys under `prefix` (sorted: item ids sort in submission order)."""
        try:
            keys = self._kv.list(range=storage.prefix_range(prefix)).result(timeout=storage.TIMEOUT_S)
        except Exception as e:
            raise OSError(f"{self}: listing {prefix} failed: {e}") from None
        return sorted(k.decode() for k in keys if k.endswith(b".json"))

    # --- the trainer's side ------------------------------------------------------------------------

    def submit(self, item_id: str, payload: dict) -> None:
        """Queues a work item."""
        self.submit_all({item_id: payload})

    def submit_all(self, payloads: dict[str, dict]) -> None:
        """Queues work items {item id: payload}, written at once."""
        self._put_all({f"{ITEMS}{check_id(i, 'item id')}.json": p for i, p in payloads.items()})

    def items(self) -> list[str]:
        return [_name(k, ITEMS) for k in self._list(ITEMS)]

    def assignments(self) -> dict[str, list[str]]:
        """{worker: the items assigned to it}, oldest first."""
        out: dict[str, list[str]] = {}
        for key in self._list(ASSIGNED):
            worker, _, name = key[len(ASSIGNED):].partition("/")
            out.setdefault(worker, []).append(name[:-len(".json")])
        return out

    def workers(self) -> dict[str, dict]:
        """Every worker's last heartbeat: {worker: {"beat", "time", "host", "pid", status fields}}."""
        out = {}
        for key in self._list(WORKERS):
            beat = self._get(key)
            if beat is not None:
                out[_name(key, WORKERS)] = beat
        return out

    def live(self, timeout_s: float, beats: dict[str, dict] | None = None) -> set[str]:
        """Workers whose heartbeat changed within the last `timeout_s` seconds of this object's clock
        (a worker is live from the first time this object sees its heartbeat)."""
        now = time.monotonic()
        beats = self.workers() if beats is None else beats
        out = set()
        for worker, info in beats.items():
            last = self._seen.get(worker)
            if last is None or last[0] != info.get("beat"):
                self._seen[worker] = (info.get("beat"), now)
            if now - self._seen[worker][1] <= timeout_s:
                out.add(worker)
        return out

    def dispatch(self, live: set[str], *, slots: int = 1, accept=lambda worker: True) -> dict:
        """One round of the trainer's bookkeeping: takes back the items of workers not in `live`, and
        gives each live worker that `accept`s (compatible ones) its share of unassigned items, at most
        `slots` unfinished at a time. Returns {"assigned": [(item, worker)], "reassigned": [item]}."""
        items = self.items()
        held = self.assignments()
        finished = {tuple(k[len(DONE):-len(".json")].split("/", 1)) for k in self._list(DONE)}
        reassigned, busy, gone = [], set(), []
        for worker, names in held.items():
            for item in names:
                if worker not in live or item not in items:  # dead, or the item withdrawn or taken
                    gone.append(f"{ASSIGNED}{worker}/{item}.json")
                    if worker not in live and item in items:
                        reassigned.append(item)
                else:
                    busy.add(item)
        self._delete_all(gone)
        assigned, writes = [], {}
        pending = [i for i in items if i not in busy]
        load = {w: sum(1 for i in held.get(w, []) if i in busy and (w, i) not in finished) for w in live}
        for worker in sorted(live, key=lambda w: (load[w], w)):
            if not accept(worker):
                continue
            while pending and load[worker] < slots:
                item = pending.pop(0)
                self.attempts[item] += 1
                writes[f"{ASSIGNED}{worker}/{item}.json"] = {"attempt": self.attempts[item]}
                load[worker] += 1
                assigned.append((item, worker))
        self._put_all(writes)
        return {"assigned": assigned, "reassigned": reassigned}

    def take_results(self) -> dict[str, dict]:
        """Every finished result, removed with its item: {item id: result}, the result carrying its
        worker under "worker". Repeats (an item made twice) are dropped."""
        keys = self._list(DONE)
        got = self._wait({key: self._kv.read(key) for key in keys}, "reading")
        out: dict[str, dict] = {}
        for key in keys:
            worker, _, name = key[len(DONE):].partition("/")
            item = name[:-len(".json")]
            if got[key].state == "value" and item not in out:
                out[item] = {**json.loads(got[key].value), "worker": worker}
        self._delete_all(keys + [f"{ITEMS}{item}.json" for item in out])
        return out

    def purge(self) -> None:
        """Removes all work and results (a new trainer session starts clean) and opens the queue.
        Heartbeats stay: the workers outlive trainer sessions."""
        self._delete_all([key for prefix in (ITEMS, ASSIGNED, DONE) for key in self._list(prefix)] + [CLOSED])

    def withdraw(self) -> None:
        """Removes the items not yet finished (the trainer stops)."""
        self._delete_all([key for prefix in (ITEMS, ASSIGNED) for key in self._list(prefix)])

    def close(self) -> None:
        """Marks the queue finished: workers exit once idle."""
        self._put(CLOSED, {"time": time.time()})

    @property
    def closed(self) -> bool:
        return self._get(CLOSED) is not None

    def counts(self) -> dict[str, int]:
        """Items waiting or in progress, assigned, and finished (for progress messages)."""
        return {"items": len(self._list(ITEMS)), "assigned": len(self._list(ASSIGNED)), "done": len(self._list(DONE))}

    # --- the workers' side -------------------------------------------------------------------------

    def next_item(self, worker_id: str, skip=()) -> tuple[str, dict] | None:
        """The oldest item assigned to `worker_id` and not in `skip`, as (item id, payload); None if none."""
        prefix = f"{ASSIGNED}{check_id(worker_id, 'worker id')}/"
        for key in self._list(prefix):
            item = _name(key, prefix)
            if item in skip:
                continue
            payload = self._get(f"{ITEMS}{item}.json")
            if payload is not None:  # else taken back meanwhile
                return item, payload
        return None

    def complete(self, item_id: str, result: dict, worker_id: str) -> None:
        """Hands the result of an item to the trainer."""
        self._put(f"{DONE}{check_id(worker_id, 'worker id')}/{check_id(item_id, 'item id')}.json", result)

    def heartbeat(self, worker_id: str, **info) -> None:
        """Bumps the worker's heartbeat counter (with status fields: the trainer reads "format" and
        "qedjax" to check compatibility; people read the rest)."""
        n = self._beats[worker_id] = self._beats.get(worker_id, 0) + 1
        self._put(f"{WORKERS}{check_id(worker_id, 'worker id')}.json",
                  {"beat": f"{self._session}-{n}", "time": time.time(), "pid": os.getpid(), **info})

    def heartbeat_of(self, worker_id: str) -> dict | None:
        return self._get(f"{WORKERS}{check_id(worker_id, 'worker id')}.json")

    def leave(self, worker_id: str) -> None:
        """Removes the worker's heartbeat (a clean exit): the trainer reassigns its items at once."""
        self._delete(f"{WORKERS}{check_id(worker_id, 'worker id')}.json")
