"""Stopping at any moment, on every process at once.

A SIGTERM (a preempted pod) or Ctrl-C reaches one process, at any point: between steps, inside a
long generation, or while the trainer waits minutes for rollout workers. That process alone knows;
every process must stop at the same point (one that stops alone leaves the others waiting in their
next collective forever), save the same checkpoint together, and exit. Three places agree on it:

- Between steps: `checkpoint.StopRequest.agreed()`, an all-gather of the flags (as before).
- Inside a generation: the JAX sampler decodes in chunks of `decode_chunk` steps; each chunk's
  program takes every device's flag (`device_flags`) and returns their OR, so after the same
  chunk every process sees the same answer and raises `Preempted` (qedjax/rollout/sampler.py).
- While waiting for something only process 0 watches (rollout workers' results): `lead_waits`.
  No collective runs during the wait (a process blocked in one cannot run its signal handler);
  process 0 polls its work and the stop key of the coordination service, the others poll process
  0's verdict and post the stop key when they are signalled. Process 0 decides alone, so every
  process leaves the wait with the same outcome.

`Preempted` unwinds to the stage's loop, which saves the train state of the last finished step (the
data position of that step too, so the interrupted step's problems are taken again) and stops.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Callable, TypeVar

import jax
import numpy as np

T = TypeVar("T")

STOP_KEY = "qedjax/stop"
POLL_S = 0.05

_flag = threading.Event()
_when: float | None = None  # time.monotonic() of this process's request
_announced = False
_waits = itertools.count()


class Preempted(Exception):
    """Every process agreed to stop in the middle of a unit of work (a generation, a wait)."""


def request() -> None:
    """This process was asked to stop (called from the signal handler)."""
    global _when
    if _when is None:
        _when = time.monotonic()
    _flag.set()


def since() -> str:
    """How long ago this process was asked to stop, for messages ("" if it was not: another was)."""
    return "" if _when is None else f", {time.monotonic() - _when:.2f} s after the stop request"


def requested() -> bool:
    """Whether this process was asked to stop (it alone: not an agreement)."""
    return _flag.is_set()


def clear() -> None:
    global _announced, _when
    _flag.clear()
    _announced, _when = False, None


def _client():
    from jax._src import distributed

    return distributed.global_state.client


def _announce() -> None:
    """Posts this process's stop request where process 0 looks while it waits."""
    global _announced
    if _flag.is_set() and not _announced and jax.process_count() > 1:
        _client().key_value_set(STOP_KEY, str(jax.process_index()), allow_overwrite=True)
        _announced = True


def _try_get(key: str) -> str | None:
    try:
        return _client().key_value_try_get(key)
    except Exception:  # noqa: BLE001 - NOT_FOUND: nobody set it yet
        return None


def any_requested() -> bool:
    """Whether this process, or another that posted it, was asked to stop. Not collective: during a
    wait, only process 0 acts on it (see lead_waits)."""
    if _flag.is_set():
        return True
    return jax.process_count() > 1 and _try_get(STOP_KEY) is not None


def check() -> None:
    """Raises Preempted if a stop was requested (a wait's poll, on the process that decides)."""
    _announce()
    if any_requested():
        raise Preempted("stopped waiting" + since())


def lead_waits(work: Callable[[Callable[[], None]], T]) -> T | None:
    """Runs `work(check)` on process 0 and returns its result there (None on the other processes),
    or raises Preempted on every process when any of them is asked to stop before process 0 is done.

    `work` calls `check()` while it waits (it raises Preempted). The other processes meanwhile poll
    for process 0's verdict outside any collective, so a signal sent to one of them is handled at
    once and reaches process 0 through the coordination service.
    """
    if jax.process_count() == 1:
        return work(check)
    key = f"qedjax/wait/{next(_waits)}"
    if jax.process_index() == 0:
        try:
            out = work(check)
        except Preempted:
            _client().key_value_set(key, "stop")
            raise
        _client().key_value_set(key, "go")
        return out
    while True:
        _announce()
        verdict = _try_get(key)
        if verdict == "stop":
            raise Preempted("stopped waiting" + since())
        if verdict == "go":
            return None
        time.sleep(POLL_S)


def device_flags(mesh) -> jax.Array:
    """[devices] int32 over every device of `mesh`: 1 on this process's devices if it was asked to
    stop. A program that reduces it (any) tells every process whether any of them was."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    flag = np.int32(1 if _flag.is_set() else 0)
    sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    return jax.make_array_from_callback((mesh.size,), sharding,
                                        lambda idx: np.full(len(range(mesh.size)[idx[0]]), flag, np.int32))
