"""The rollout dispatcher's efficiency: a sync RL step's wall time with 1, 2, 4, 8 workers against the ideal
(one worker's time / N), with engines that wait a fixed time per work item (this machine's cores cannot
show real engines scaling; what is measured is the queue, the assignment and the trainer's bookkeeping).

  python tools/bench_dispatch.py [--workers 1,2,4,8] [--problems 64] [--per-item 2] [--item-s 1.0]
                                 [--steps 3] [--slots 2] [--poll-s 0.5] [--worker-poll-s 1.0] [--gcs]

Each worker is a thread running `qedjax.rollout.worker.serve` (as a worker process does, with its own
queue client and heartbeat) over the real queue on a temporary directory, or on a bucket of the
fake-gcs-server emulator with --gcs. The trainer side is `qedjax.rollout.dispatch.Dispatcher` as
`rl.run` uses it in sync mode: one step queued, items of `--per-item` problems, graded by a grader that
answers at once. A step's time is `Dispatcher.get()`'s; the first step of each setting is a warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from benchlib import print_footer, print_header  # noqa: E402
from qedjax.benchmarks import Problem  # noqa: E402
from qedjax.rewards import Grade  # noqa: E402
from qedjax.rollout import dispatch, groups, worker  # noqa: E402
from qedjax.rollout.engine import Completion, SamplingParams  # noqa: E402


class WaitingEngine:
    """Generates nothing but waits `item_s` per generate call (one call per work item without RC)."""

    def __init__(self, item_s: float):
        self.item_s, self.version = item_s, 0

    def generate(self, requests, params, seeds=None):
        time.sleep(self.item_s)
        return [Completion(text="x", tokens=(1,), logprobs=(0.0,), finish_reason="stop", prompt_tokens=(1,),
                           policy_version=0) for _ in requests]

    def count_tokens(self, text):
        return 1


class OneVersion:
    def latest(self):
        return 0


class ZeroGrader:
    def grade(self, items):
        return [Grade(0.0, 0.0, "ok", "") for _ in items]


def step_times(root: str, n: int, args) -> list[float]:
    problems = [Problem(str(i), f"problem {i}", {}) for i in range(args.problems)]
    g = groups.GRPOConfig(problems_per_step=args.problems, group_size=args.group_size,
                          sampling=SamplingParams(max_new_tokens=1, seed=0))
    disp = dispatch.Dispatcher(root, g, groups.ProblemSampler(problems, 0), 0, ZeroGrader(), depth=1,
                               version=lambda: 0, problems_per_item=args.per_item, slots=args.slots, poll_s=args.poll_s)
    stop = threading.Event()
    threads = [threading.Thread(target=worker.serve, args=(root, OneVersion(), lambda v: WaitingEngine(args.item_s)),
                                kwargs={"worker_id": f"w{k}", "poll_s": args.worker_poll_s, "stop": stop,
                                        "heartbeat_s": 2.0}, daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    disp.start()
    times = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        ro = disp.get()
        times.append(time.perf_counter() - t0)
        assert len(ro.completions) == args.problems
    disp.stop()
    disp.close()
    stop.set()
    for t in threads:
        t.join(60)
    return times[1:]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,2,4,8")
    p.add_argument("--problems", type=int, default=64)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--per-item", type=int, default=2)
    p.add_argument("--item-s", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--poll-s", type=float, default=0.25, help="the trainer's dispatch period (Dispatcher's default)")
    p.add_argument("--worker-poll-s", type=float, default=0.25,
                   help="a worker's look at the queue while idle (the worker command's default)")
    p.add_argument("--gcs", action="store_true", help="the queue on a bucket of the fake-gcs-server emulator")
    args = p.parse_args()
    print_header(f"{args.problems} problems x {args.group_size} per step, items of {args.per_item} problems "
                 f"({-(-args.problems // args.per_item)} items) waiting {args.item_s}s each; slots {args.slots}; "
                 f"trainer poll {args.poll_s}s, worker poll {args.worker_poll_s}s; queue on "
                 f"{'the GCS emulator' if args.gcs else 'local disk'}")
    emulator = None
    if args.gcs:
        from gcs import Emulator

        emulator = Emulator()
    base = None
    try:
        for n in [int(x) for x in args.workers.split(",")]:
            root = f"{emulator.bucket()}/queue" if emulator else tempfile.mkdtemp(prefix="bench_dispatch_")
            times = step_times(root, n, args)
            med = statistics.median(times)
            base = base or med * n  # one worker's time (the first setting must be 1 worker)
            ideal = base / n
            print(f"{n} worker(s): step {med:.2f}s (median of {len(times)}: "
                  f"{', '.join(f'{t:.2f}' for t in times)}); ideal {ideal:.2f}s -> {ideal / med:.0%} efficiency",
                  flush=True)
    finally:
        if emulator is not None:
            emulator.stop()
    print_footer()


if __name__ == "__main__":
    main()
