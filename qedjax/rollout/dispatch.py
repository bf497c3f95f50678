"""The trainer's side of the rollout fleet (`engine.kind: workers`): RL steps cut into work items,
spread over every live worker, put back together and graded, for `rl.run`.

Each step's problems are cut into items of `problems_per_item` problems; the trainer keeps `depth`
steps of items queued (max_lag + 1 in async mode, one in sync mode) and a thread of process 0 keeps
the queue moving while the trainer trains: it takes results, gives the live workers the oldest
unassigned items (qedjax.rollout.queue.WorkQueue.dispatch), and takes back the items of dead workers.
A step is whole when all its items are back; since every random draw is seeded per problem
(groups.sample_groups), its Rollouts are the same whichever worker made which item. The metrics of a
step name how many workers made its groups (`rollout_workers`) and each one's share.

Every process of a multi-host trainer takes the same problems from its sampler; process 0 alone
talks to the queue and shares each step's result with the others.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import sys
import threading
import time
import uuid
from typing import Callable

import jax
import numpy as np

from qedjax import preempt
from qedjax.rollout import groups, items
from qedjax.rollout.queue import DEAD_AFTER_S, WorkQueue

MAX_REQUEUES = 3  # an item whose workers keep dying stops the run instead of killing every worker
BROADCAST_BYTES = 64 * 2**20  # multi-host trainers share a result in pieces this big
REPORT_S = 120.0  # a trainer waiting this long for a step says what the queue holds
BEATS_S = 1.0  # the dispatch thread reads the workers' heartbeats this often at most


class IncompatibleWorkerError(RuntimeError):
    """A worker that joined speaks another work protocol (another qedjax)."""


def compatible(beat: dict) -> bool:
    return beat.get("format") == items.FORMAT


class Dispatcher:
    """Rollouts from the workers, steps oldest first, graded here (see the module docstring).

    Args:
      queue_root: the work queue's path or URL.
      g, sampler, seed, grader: the grpo section, the problem order, the run's seed, the grader.
      depth: steps of work kept queued.
      version: () -> the trainer's policy version (the least version an item may be made with).
      problems_per_item: problems of a step per work item.
      slots: items a worker holds at once: one running and the next waiting, so that a worker never
        idles between items for want of a dispatch round.
      poll_s: seconds between rounds of the dispatch thread (a submitted step starts a round at once).
      dead_after_s: a worker whose heartbeat is still this long is dead; its items go to others.
      summarizer: the RC summariser the workers run, when it is a model of its own.
    """

    def __init__(self, queue_root: str, g: groups.GRPOConfig, sampler: groups.ProblemSampler, seed: int, grader, *,
                 depth: int, version: Callable[[], int], problems_per_item: int = 1, slots: int = 2,
                 poll_s: float = 0.25, dead_after_s: float = DEAD_AFTER_S,
                 summarizer: items.StoreSummarizer | None = None):
        self.g, self.sampler, self.seed, self.grader = g, sampler, seed, grader
        self.summarizer = summarizer.spec() if summarizer is not None else None
        self.depth, self.version = max(depth, 1), version
        self.per_item, self.slots, self.poll_s, self.dead_after_s = max(problems_per_item, 1), slots, poll_s, dead_after_s
        self.lead = jax.process_index() == 0
        self.queue = WorkQueue(queue_root) if self.lead else None
        self.session = uuid.uuid4().hex[:8]  # item ids of this trainer run (leftovers are dropped)
        self.pending: collections.deque[list[str]] = collections.deque()  # each queued step's items
        self.results: dict[str, dict] = {}
        self.submitted = 0
        self.warned: set[str] = set()
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._wake = threading.Event()  # new items: a round now, not at the next poll
        self._thread: threading.Thread | None = None
        self._beats: tuple[float, dict] = (-1e9, {})  # (when read, heartbeats): read once a second at most

    # --- process 0's thread --------------------------------------------------------------------------

    def start(self) -> None:
        """Clears the queue of an earlier session, checks the workers that joined, starts the thread."""
        if not self.lead:
            return
        self.queue.purge()
        self.check_workers()
        self._thread = threading.Thread(target=self._run, daemon=True, name="qedjax-dispatch")
        self._thread.start()

    def check_workers(self) -> dict[str, dict]:
        """The heartbeats of the workers that joined; raises IncompatibleWorkerError naming any that
        runs another work protocol (its items would fail or, worse, differ). A heartbeat older than
        dead_after_s by its own clock is a worker long gone (killed without leaving), not a check."""
        beats = self.queue.workers()
        bad = {w: b.get("format") for w, b in beats.items()
               if not compatible(b) and time.time() - b.get("time", 0) < self.dead_after_s}
        if bad:
            raise IncompatibleWorkerError(
                f"{self.queue}: rollout worker(s) {sorted(bad)} speak {sorted(set(map(str, bad.values())))}, this "
                f"trainer {items.FORMAT!r}: run the same qedjax on the trainer and the workers (or stop those workers)")
        return beats

    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                self._wake.clear()
                self.round()
                self._wake.wait(self.poll_s)
        except BaseException as e:  # surfaced in the trainer thread by get()
            self.error = e

    def round(self) -> None:
        """One round: results in, dead workers' items back, free workers given items."""
        taken = self.queue.take_results()
        with self._lock:
            wanted = {i for step in self.pending for i in step}
            self.results.update({k: v for k, v in taken.items() if k in wanted})
        if time.monotonic() - self._beats[0] > BEATS_S:  # heartbeats change every few seconds only
            self._beats = (time.monotonic(), self.queue.workers())
        beats = self._beats[1]
        for w, b in beats.items():
            if not compatible(b) and w not in self.warned:
                self.warned.add(w)
                print(f"[qedjax] rollout worker {w} speaks {b.get('format')!r}, not {items.FORMAT!r}: given no work",
                      file=sys.stderr, flush=True)
        live = self.queue.live(self.dead_after_s, beats)
        moved = self.queue.dispatch(live, slots=self.slots, accept=lambda w: compatible(beats[w]))
        for item in moved["reassigned"]:
            if self.queue.attempts[item] > MAX_REQUEUES:
                raise RuntimeError(f"{self.queue}: item {item} was taken back from {MAX_REQUEUES} dead workers; see "
                                   f"the workers' logs")

    # --- the trainer's side ----------------------------------------------------------------------------

    def _submit(self) -> None:
        problems = self.sampler.take(self.g.problems_per_step)
        step = f"{self.session}-{self.submitted:08d}"
        self.submitted += 1
        payloads = {f"{step}-{k:04d}": items.work_payload(
            self.g, problems[first:first + self.per_item], step=self.sampler.cursor, seed=self.seed,
            version=self.version(), summarizer=self.summarizer, first=first)
            for k, first in enumerate(range(0, len(problems), self.per_item))}
        if self.lead:
            self.queue.submit_all(payloads)
        names = list(payloads)
        with self._lock:
            self.pending.append(names)
        self._wake.set()

    def _wait(self, names: list[str], check: Callable[[], None] = lambda: None) -> dict:
        """The step's merged result as JSON: {"rollouts", "workers": {worker: groups}} or {"error", "worker"}.
        `check` raises preempt.Preempted when any trainer process was asked to stop."""
        t0 = noted = time.monotonic()
        while True:
            check()
            if self.error is not None:
                raise RuntimeError("the rollout dispatcher failed") from self.error
            with self._lock:
                got = [self.results.get(n) for n in names]
            failed = [r for r in got if r is not None and "error" in r]
            if failed:
                return failed[0]
            if all(r is not None for r in got):
                break
            if time.monotonic() - noted > REPORT_S:
                noted = time.monotonic()
                print(f"[qedjax] waited {noted - t0:.0f}s for rollout workers on step {names[0].rsplit('-', 1)[0]}: "
                      f"{self.queue.counts()}", file=sys.stderr, flush=True)
            time.sleep(min(self.poll_s, 0.05))
        with self._lock:
            for n in names:
                self.results.pop(n)
        parts = [items.rollouts_from_json(r["rollouts"]) for r in got]
        workers: dict[str, int] = collections.Counter()
        for r, part in zip(got, parts):
            workers[r["worker"]] += len(part.completions)
        return {"rollouts": items.rollouts_to_json(groups.merge_rollouts(parts)), "workers": dict(workers)}

    def get(self) -> groups.Rollouts:
        while len(self.pending) < self.depth:
            self._submit()
        names = self.pending[0]
        t0 = time.perf_counter()
        result = preempt.lead_waits(lambda check: self._wait(names, check))  # None on processes other than 0
        with self._lock:
            self.pending.popleft()
        if jax.process_count() > 1:
            result = _broadcast_json(result)
        if "error" in result:
            raise RuntimeError(f"rollout worker {result.get('worker')} failed on a work item:\n{result['error']}")
        ro = items.rollouts_from_json(result["rollouts"])
        ro = dataclasses.replace(ro, times={**ro.times, "wait_s": time.perf_counter() - t0}, workers=result["workers"])
        return groups.grade_rollouts(ro, self.grader)

    def stop(self) -> None:
        """Stops the thread and withdraws the work nobody finished (the trainer is stopping)."""
        self._stopped.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(60)
        if self.lead:
            self.queue.withdraw()

    def close(self) -> None:
        """The stage is finished: idle workers exit."""
        if self.lead:
            self.queue.close()


def _broadcast_json(obj: dict | None) -> dict:
    """Process 0's JSON object on every process, sent in pieces (bounded device memory)."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if obj is not None else np.zeros(0, np.uint8)
    size = multihost_utils.broadcast_one_to_all(np.asarray(divmod(data.size, 2**30), np.int32))
    n = int(size[0]) * 2**30 + int(size[1])
    out = bytearray()
    for at in range(0, n, BROADCAST_BYTES):
        piece = data[at:at + BROADCAST_BYTES] if data.size else np.zeros(min(BROADCAST_BYTES, n - at), np.uint8)
        out += np.asarray(multihost_utils.broadcast_one_to_all(piece)).astype(np.uint8).tobytes()
    return json.loads(bytes(out))
