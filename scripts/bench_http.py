#!/usr/bin/env python3
"""Dispatch rate of a sweep with and without many HTTP clients polling /api/v1/status; prints the slowdown.

A real master process (HTTP API on: since issue 14 a process of its own) and real slave processes on loopback, as in tests/httpcluster.py. Each round
runs a 1000-task sweep of `true` twice: once alone, once while POLLERS client threads (in a separate process, so
they do not share this process's GIL) each GET /api/v1/status, wait INTERVAL seconds, and repeat. The dispatch rate
is tasks / (last task finished - sweep submitted), read from the master's own records; the p99 is the pollers'
request latency (connect to answer read).

    python scripts/bench_http.py [--tasks 1000] [--pollers 100] [--interval 0.1] [--rounds 3]
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.httpcluster import HttpCluster  # noqa: E402


def poll(url: str, clients: int, interval: float, stop: "multiprocessing.synchronize.Event",
         counts: "multiprocessing.sharedctypes.Synchronized", latencies: "multiprocessing.Queue[list[float]]") -> None:
    """`clients` threads, each with its own keep-alive-less GET loop, until `stop` is set; puts the latencies."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    errors = []
    took: list[float] = []

    def client() -> None:
        while not stop.is_set():
            try:
                t0 = time.perf_counter()
                with opener.open(url + "/api/v1/status", timeout=10) as r:
                    r.read()
                took.append(time.perf_counter() - t0)
                with counts.get_lock():
                    counts.value += 1
            except OSError as exc:
                errors.append(exc)
            stop.wait(interval)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.put(took)
    if errors:
        print(f"  pollers: {len(errors)} errors, e.g. {errors[0]}", file=sys.stderr)


def run_sweep(c: HttpCluster, name: str, tasks: int) -> float:
    spec = {"name": name, "argv": ["true"], "timeout": 60, "parameters": {"grid": {"x": {"range": [0, tasks]}}},
            "results": {"code": "exit_code"}}
    assert c.submit(spec).status == 201
    c.wait_state(name, "finished", timeout=600)
    s = c.sweep(name)
    return tasks / (s["finished"] - s["created"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--pollers", type=int, default=100)
    ap.add_argument("--interval", type=float, default=0.1, help="seconds each poller waits between requests")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--slaves", type=int, default=2)
    ap.add_argument("--slots", type=int, default=2)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="tf-bench-") as tmp:
        c = HttpCluster(Path(tmp) / "state", n=args.slaves, slots=args.slots)
        try:
            run_sweep(c, "warmup", 100)
            base, loaded, rates, p99s = [], [], [], []
            for i in range(args.rounds):
                base.append(run_sweep(c, f"base-{i}", args.tasks))
                stop = multiprocessing.Event()
                counts = multiprocessing.Value("i", 0)
                latencies: multiprocessing.Queue[list[float]] = multiprocessing.Queue()
                proc = multiprocessing.Process(target=poll, args=(c.url, args.pollers, args.interval, stop, counts,
                                                                  latencies))
                proc.start()
                time.sleep(1.0)  # let every poller connect and settle
                start_count, t0 = counts.value, time.time()
                loaded.append(run_sweep(c, f"loaded-{i}", args.tasks))
                rates.append((counts.value - start_count) / (time.time() - t0))
                stop.set()
                took = sorted(latencies.get(timeout=60))
                proc.join(30)
                p99s.append(took[int(len(took) * 0.99)] if took else float("nan"))
                print(f"round {i + 1}: alone {base[-1]:7.1f} tasks/s   with {args.pollers} pollers "
                      f"{loaded[-1]:7.1f} tasks/s   ({rates[-1]:.0f} status requests/s, p99 "
                      f"{p99s[-1] * 1000:.1f} ms)", flush=True)
        finally:
            c.close()
    b, l = statistics.median(base), statistics.median(loaded)
    print(f"\n{args.tasks}-task sweep, {args.slaves} slaves x {args.slots} slots, median of {args.rounds} rounds")
    print(f"dispatch rate alone:              {b:8.1f} tasks/s")
    print(f"dispatch rate with {args.pollers:3d} pollers:   {l:8.1f} tasks/s  "
          f"(~{statistics.median(rates):.0f} GET /api/v1/status per s)")
    print(f"slowdown ratio (alone / polled):  {b / l:8.3f}  ({(1 - l / b) * 100:+.1f}% dispatch rate lost)")
    print(f"p99 of GET /api/v1/status under that load: {statistics.median(p99s) * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
