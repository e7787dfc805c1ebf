#!/usr/bin/env python3
"""Benchmark: Python function tasks through ticketfarm vs Dask distributed, ipyparallel and a process pool.

    python scripts/bench_python.py [--noop 10000] [--submit 2000] [--sleep 2000]
                                   [--only ticketfarm,dask,ipyparallel,pool]

Each runner gets 2 local workers on this machine: ticketfarm `Cluster(local=2)` (durable store,
synchronous=FULL), Dask `LocalCluster(n_workers=2, threads_per_worker=1)`, ipyparallel with 2
engines (load-balanced view), and `ProcessPoolExecutor(2)` as the no-network, no-durability
reference. A peer that is not installed is skipped with a message. Prints tasks/s per workload
and the ratio ticketfarm/peer; for the ~10 ms tasks also the fraction of the ideal rate (2 / 10 ms).
Workloads: no-op tasks through `map` (one call for all), no-op tasks through a loop of `submit()`
calls (then every result), and ~10 ms tasks through `map`.
On the idle cluster it also takes two medians: the round trip `submit(noop).result()`, and
submit->start, from `time.time()` just before submit to `time.time()` when the task starts
(same machine, same clock).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SLEEP = 0.010
WORKERS = 2


def noop(x: Any) -> Any:
    return x


def sleepy(x: Any) -> Any:
    import time  # ipyparallel ships __main__ functions without their module globals

    time.sleep(0.010)
    return x


def started_at(x: Any) -> float:
    import time

    return time.time()


def idle_latencies(call: Callable[[Callable[[Any], Any], Any], Any], n: int) -> dict[str, float]:
    """Medians over n one-at-a-time tasks on an idle cluster; `call(fn, x)` submits fn(x) and waits for it."""
    for i in range(10):  # warm: started_at's body reaches every worker before it is timed
        call(started_at, i)
    round_trips, starts = [], []
    for i in range(n):
        started = time.perf_counter()
        call(noop, i)
        round_trips.append(time.perf_counter() - started)
    for i in range(n):
        submitted = time.time()
        starts.append(call(started_at, i) - submitted)
    return {"latency_ms": statistics.median(round_trips) * 1000, "start_ms": statistics.median(starts) * 1000}


def timed(run: Callable[[Callable[[Any], Any], int], list[Any]], fn: Callable[[Any], Any], n: int) -> float:
    started = time.perf_counter()
    out = run(fn, n)
    elapsed = time.perf_counter() - started
    assert list(out) == list(range(n)), "wrong results"
    return n / elapsed


def submitted(submit: Callable[[Callable[[Any], Any], Any], Any], result: Callable[[Any], Any]
              ) -> Callable[[Callable[[Any], Any], int], list[Any]]:
    """A runner of n tasks as a loop of submit() calls, then each future's result."""
    def run(fn: Callable[[Any], Any], n: int) -> list[Any]:
        futures = [submit(fn, i) for i in range(n)]
        return [result(f) for f in futures]
    return run


def bench_ticketfarm(args: argparse.Namespace) -> dict[str, float]:
    from ticketfarm import Cluster

    with Cluster(local=WORKERS, durability=args.durability) as cluster:
        cluster.wait_for_slaves(WORKERS)
        list(cluster.map(noop, range(200)))  # warm: workers started, function cached on both slaves
        out = idle_latencies(lambda fn, x: cluster.submit(fn, x).result(), 200)
        out["noop"] = timed(lambda fn, n: list(cluster.map(fn, range(n))), noop, args.noop)
        out["submit"] = timed(submitted(cluster.submit, lambda f: f.result()), noop, args.submit)
        out["sleep"] = timed(lambda fn, n: list(cluster.map(fn, range(n))), sleepy, args.sleep)
    return out


def bench_dask(args: argparse.Namespace) -> dict[str, float]:
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=None) as lc, \
            Client(lc) as client:
        client.gather(client.map(noop, range(200), pure=False))

        def run(fn: Callable[[Any], Any], n: int) -> list[Any]:
            return client.gather(client.map(fn, range(n), pure=False))

        out = idle_latencies(lambda fn, x: client.submit(fn, x, pure=False).result(), 100)
        loop = submitted(lambda fn, x: client.submit(fn, x, pure=False), lambda f: f.result())
        return {**out, "noop": timed(run, noop, args.noop), "submit": timed(loop, noop, args.submit),
                "sleep": timed(run, sleepy, args.sleep)}


def bench_ipyparallel(args: argparse.Namespace) -> dict[str, float]:
    import ipyparallel as ipp

    cluster = ipp.Cluster(n=WORKERS, log_level=40)
    rc = cluster.start_and_connect_sync()
    try:
        rc.wait_for_engines(WORKERS, timeout=120)
        view = rc.load_balanced_view()
        view.map_sync(noop, range(50))

        def run(fn: Callable[[Any], Any], n: int) -> list[Any]:
            return list(view.map_sync(fn, range(n)))

        out = idle_latencies(view.apply_sync, 100)
        loop = submitted(view.apply_async, lambda r: r.get())
        return {**out, "noop": timed(run, noop, args.noop), "submit": timed(loop, noop, args.submit),
                "sleep": timed(run, sleepy, args.sleep)}
    finally:
        rc.close()
        cluster.stop_cluster_sync()


def bench_pool(args: argparse.Namespace) -> dict[str, float]:
    with ProcessPoolExecutor(WORKERS) as pool:
        list(pool.map(noop, range(100)))

        def run(fn: Callable[[Any], Any], n: int) -> list[Any]:
            return list(pool.map(fn, range(n)))

        out = idle_latencies(lambda fn, x: pool.submit(fn, x).result(), 100)
        loop = submitted(pool.submit, lambda f: f.result())
        return {**out, "noop": timed(run, noop, args.noop), "submit": timed(loop, noop, args.submit),
                "sleep": timed(run, sleepy, args.sleep)}


RUNNERS = {"ticketfarm": bench_ticketfarm, "dask": bench_dask, "ipyparallel": bench_ipyparallel,
           "pool": bench_pool}
NEEDS = {"dask": "distributed", "ipyparallel": "ipyparallel"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noop", type=int, default=10_000, help="no-op tasks per runner")
    parser.add_argument("--submit", type=int, default=2_000, help="no-op tasks per runner through submit() calls")
    parser.add_argument("--sleep", type=int, default=2_000, help="~10 ms tasks per runner")
    parser.add_argument("--only", default=",".join(RUNNERS), help="comma-separated runners")
    parser.add_argument("--durability", choices=("full", "normal"), default="full",
                        help="ticketfarm's SQLite synchronous mode")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    for name in args.only.split(","):
        module = NEEDS.get(name)
        if module is not None:
            try:
                __import__(module)
            except ImportError:
                print(f"skipping {name}: `{module}` is not installed (pip install {module})", flush=True)
                continue
        print(f"running {name} ...", flush=True)
        try:
            results[name] = RUNNERS[name](args)
        except Exception as exc:  # noqa: BLE001 - one broken peer must not lose the others' figures
            print(f"  {name} failed: {exc!r}", flush=True)
            continue
        print("  " + ", ".join(f"{k} {v:,.2f}" for k, v in results[name].items()), flush=True)
    ideal = WORKERS / SLEEP
    print()
    print(f"{'runner':<12} {'no-op tasks/s':>14} {'submit() no-op/s':>17} {'10 ms tasks/s':>14} {'of ideal':>9} "
          f"{'median rtt ms':>14} {'submit->start ms':>17}")
    for name, r in results.items():
        print(f"{name:<12} {r['noop']:>14,.0f} {r['submit']:>17,.0f} {r['sleep']:>14,.1f} {r['sleep'] / ideal:>9.2f} "
              f"{r['latency_ms']:>14.2f} {r['start_ms']:>17.2f}")
    tf = results.get("ticketfarm")
    if tf:
        print()
        for name, r in results.items():
            if name != "ticketfarm":
                print(f"ticketfarm/{name}: no-op x{tf['noop'] / r['noop']:.2f}, submit() no-op "
                      f"x{tf['submit'] / r['submit']:.2f}, 10 ms x{tf['sleep'] / r['sleep']:.2f}, "
                      f"round trip x{tf['latency_ms'] / r['latency_ms']:.2f}, "
                      f"submit->start x{tf['start_ms'] / r['start_ms']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
