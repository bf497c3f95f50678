"""Orbax checkpoints of the train state and the data iterator, and saving on SIGTERM / Ctrl-C.

A checkpoint holds three items: `params`, `opt` (optimizer state and step) and `data` (the grain
iterator state, JSON). Later stages restore `params` alone; a resumed run restores all three,
onto whatever mesh the restore target describes (Orbax reshards on read).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100  # save every N optimizer steps (and always at the end)
    keep: int = 3  # keep the last K checkpoints
    async_save: bool = True


class CorruptCheckpointError(RuntimeError):
    """No checkpoint step of a directory reads back whole; the message names each step and why."""


class Checkpointer:
    """A CheckpointManager over `directory` (a local path or gs:// URL)."""

    def __init__(self, directory: str, cfg: CheckpointConfig = CheckpointConfig()):
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.cfg = cfg
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save,
                                                 create=True))
        self.restored_step: int | None = None  # the step `restore` read (an unreadable newer one is skipped)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_state=None, *, force: bool = False) -> bool:
        """Saves at `step` if it is a save step (every N) or `force`; returns whether it saved.

        `data_state`: a JSON-able dict, or a function returning one, called only when this step
        saves (gathering it may be a collective of every process).
        """
        if not force and step % self.cfg.every:
            return False
        if step in self.manager.all_steps():
            return False
        if callable(data_state):
            data_state = data_state()
        items = {"params": ocp.args.StandardSave(state["params"]),
                 "opt": ocp.args.StandardSave({"opt_state": state["opt_state"], "step": state["step"]}),
                 "data": ocp.args.JsonSave(data_state or {})}
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, target: dict, step: int | None = None) -> tuple[dict, dict]:
        """The full train state onto `target`'s shardings (see train.abstract_state), and the data state.

        Without `step`: the newest step that reads back whole. A step that does not (a file truncated,
        a directory half deleted) is named, moved aside to `corrupt-STEP` and the previous one tried;
        `self.restored_step` says which step it was. Raises CorruptCheckpointError if none reads.
        """
        step, out = self._restore_newest(step, lambda s: self.manager.restore(s, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target["params"]),
            opt=ocp.args.StandardRestore({"opt_state": target["opt_state"], "step": target["step"]}),
            data=ocp.args.JsonRestore())), set_aside=True)
        self.restored_step = step
        state = {"params": out["params"], "opt_state": out["opt"]["opt_state"], "step": out["opt"]["step"]}
        return state, dict(out["data"] or {})

    def restore_params(self, target: Any, step: int | None = None):
        """Only the parameters (e.g. SFT's result as GRPO's start), onto `target`'s shardings; without
        `step`, from the newest step that reads back whole (an unreadable one is named and skipped)."""
        _, out = self._restore_newest(step, lambda s: self.manager.restore(
            s, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))))
        return out["params"]

    def _restore_newest(self, step: int | None, read, set_aside: bool = False):
        """(step, read(step)) for `step`, or for the newest step that `read` reads without an error.
        With `set_aside`, the unreadable steps above it are moved to corrupt-STEP (by process 0) so
        that the resumed run saves those steps again instead of finding them already there."""
        steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        bad: list[tuple[int, str]] = []
        for s in steps:
            try:
                out = read(s)
            except Exception as e:  # noqa: BLE001 - whatever fails to read, this step is not usable
                reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
                bad.append((s, reason))
                if jax.process_index() == 0:
                    print(f"[qedjax] checkpoint step {s} in {self.directory} is unreadable, not restored: {reason}")
                continue
            if bad and jax.process_index() == 0:
                print(f"[qedjax] falling back to checkpoint step {s}")
            if bad and set_aside and "://" not in self.directory:
                if jax.process_index() == 0:
                    for b, _ in bad:
                        os.replace(os.path.join(self.directory, str(b)), os.path.join(self.directory, f"corrupt-{b}"))
                if jax.process_count() > 1:  # every process must see the same steps, or saves diverge
                    from jax.experimental import multihost_utils

                    multihost_utils.sync_global_devices("qedjax corrupt checkpoints set aside")
                self.manager.reload()
            return s, out
        raise CorruptCheckpointError(f"no readable checkpoint in {self.directory}: " +
                                     "; ".join(f"step {b} ({r})" for b, r in bad))

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(directory: str, target: Any, step: int | None = None):
    """Parameters from the checkpoint directory of a finished stage."""
    ckpt = Checkpointer(directory, CheckpointConfig(async_save=False))
    try:
        return ckpt.restore_params(target, step)
    finally:
        ckpt.close()


FAULT_ENV = "QEDJAX_FAULT"


def fault_point(name: str) -> None:
    """A crash drill's kill point, off unless the environment variable QEDJAX_FAULT equals `name`.

    Then this process SIGKILLs itself here, so that a drill (tests/test_faults.py, tools/fault_drill.py)
    kills a run at a chosen point of a chosen step instead of guessing with timers. The points:
    `STAGE:step:K` (sft, grpo) while optimizer step K is in flight, `STAGE:save:K` just after the
    asynchronous save of step K started (its files not yet complete), and `generate:chunk:K` before
    this process's K-th decode call of the JAX sampler (in the middle of a generation).
    `POINT/TERM` sends SIGTERM instead.
    """
    point, _, sig = os.environ.get(FAULT_ENV, "").partition("/")
    if point == name:
        os.kill(os.getpid(), getattr(signal, f"SIG{sig}") if sig else signal.SIGKILL)


class StopRequest:
    """Turns SIGTERM and Ctrl-C into a flag the train loop checks between steps (then it saves and
    stops), and that a generation or a wait in progress acts on too (qedjax/preempt.py). A second
    Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        from qedjax import preempt

        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        preempt.request()  # a generation or a wait in progress stops too (qedjax/preempt.py)
        print(f"\n[qedjax] process {jax.process_index()} got signal {signum}: saving a checkpoint, then stopping",
              flush=True)

    def agreed(self) -> bool:
        """Whether any process was asked to stop. Every process must stop (and save) at the same step:
        one that stops alone leaves the others waiting in the next collective. Collective itself."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))

    def __exit__(self, *exc):
        from qedjax import preempt

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        preempt.clear()
        return False
