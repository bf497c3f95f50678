"""Benchmark of the judge path: how long grading N items takes against a judge that answers in D s.

Judging is I/O bound, so with concurrency C the batch should take about N * D / C, not N * D.
The script starts its own OpenAI-compatible server on 127.0.0.1 in a separate process (so that
server and client do not share one interpreter lock), grades N items with JudgeGrader, and prints
the wall time next to the ideal and the serial figure, and the largest number of requests the
server saw at once.

    python tools/bench_judge.py                      # 1,000 items, 50 ms per reply, concurrency 64
    python tools/bench_judge.py --items 5000 --delay 0.02 --concurrency 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time


async def _serve(delay_s: float) -> None:
    """A minimal HTTP/1.1 keep-alive server: every POST gets a score after `delay_s`; GET /stats."""
    stats = {"requests": 0, "in_flight": 0, "max_in_flight": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
                await reader.readexactly(int(headers.get("content-length", 0)))
                if request_line.startswith("GET /stats"):
                    payload = json.dumps(stats)
                else:
                    stats["requests"] += 1
                    stats["in_flight"] += 1
                    stats["max_in_flight"] = max(stats["max_in_flight"], stats["in_flight"])
                    await asyncio.sleep(delay_s)
                    stats["in_flight"] -= 1
                    text = f"The proof is fine.\n<score>{stats['requests'] % 8}</score>"
                    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})
                body = payload.encode()
                # One write per reply: separate header and body writes meet Nagle's algorithm.
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--delay", type=float, default=0.05, help="seconds the server takes per reply")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.delay))
        return

    import httpx

    from qedjax.rewards import GradeItem, JudgeConfig, JudgeGrader

    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--delay", str(args.delay)], stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(server.stdout.readline())
        base_url = f"http://127.0.0.1:{port}/v1"
        config = JudgeConfig(base_url=base_url, model="bench", concurrency=args.concurrency, timeout_s=60.0)
        grader = JudgeGrader(config)
        items = [
            GradeItem(f"Problem {i}.", f"<think>...</think>Proof {i}.", {"marking_scheme": "7 points: a proof."})
            for i in range(args.items)
        ]
        grader.grade(items[: min(args.concurrency, args.items)])  # warm-up: imports, first connections
        before = httpx.get(f"http://127.0.0.1:{port}/stats").json()
        start = time.perf_counter()
        grades = grader.grade(items)
        elapsed = time.perf_counter() - start
        after = httpx.get(f"http://127.0.0.1:{port}/stats").json()
    finally:
        server.kill()
        server.wait()

    ok = sum(grade.reason == "ok" for grade in grades)
    ideal = args.items * args.delay / args.concurrency
    serial = args.items * args.delay
    print(f"items={args.items} delay={args.delay * 1000:.0f}ms concurrency={args.concurrency}")
    print(f"graded ok: {ok}/{args.items}, server requests: {after['requests'] - before['requests']}")
    print(f"wall time: {elapsed:.2f} s  (ideal N*D/C = {ideal:.2f} s, serial N*D = {serial:.1f} s)")
    print(f"throughput: {args.items / elapsed:.0f} items/s; largest in flight at the server: {after['max_in_flight']}")


if __name__ == "__main__":
    main()
