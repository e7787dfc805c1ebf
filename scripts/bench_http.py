#!/usr/bin/env python3
"""Dispatch rate of a sweep with and without many HTTP clients polling /api/v1/status; prints the slowdown.

A real master process (its HTTP API a process of its own) and real slave processes on loopback, as in
tests/httpcluster.py. Each round runs a sweep of `true` twice: once alone, once while POLLERS clients each GET
/api/v1/status, wait INTERVAL seconds after the answer, and repeat. The dispatch rate is tasks / (last task
finished - sweep submitted), read from the master's own records; latencies are the clients' (request written to
answer read).

On one small machine the clients compete with the master for the same CPUs, which no real deployment's remote
pollers do. So the clients are made cheap (one asyncio process, uvloop, one keep-alive connection each, the
request bytes written by hand) and the script reports what every party burned: CPU seconds per second of the
pollers, the HTTP process, the master and the slaves (with their workers), and the load average before and
after. A slowdown with the pollers' own CPU near a core says more about the machine than about the master.

    python scripts/bench_http.py [--tasks 1000] [--pollers 100] [--interval 0.1] [--rounds 5] [--http-nice 10]
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.httpcluster import HttpCluster  # noqa: E402


async def client(host: str, port: int, interval: float, stop: Any, took: list[float], ages: list[float],
                 errors: list[str]) -> None:
    """One poller: a keep-alive connection, GET /api/v1/status, read the answer, wait `interval`, again."""
    request = f"GET /api/v1/status HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while not stop.is_set():
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            body = await reader.readexactly(length)
            took.append(time.perf_counter() - t0)
            if not head.startswith(b"HTTP/1.1 200") or not body.startswith(b'{"time":'):
                errors.append(head.split(b"\r\n", 1)[0].decode())
            else:  # how old the (cached) answer was: a cache must not buy its speed with stale answers
                ages.append(time.time() - float(body[8:body.index(b",")]))
            await asyncio.sleep(interval)
    except (OSError, asyncio.IncompleteReadError) as exc:
        errors.append(repr(exc))
    finally:
        writer.close()


def poll(url: str, clients: int, interval: float, stop: Any, results: Any) -> None:
    """The pollers' process: `clients` coroutines until `stop`; puts (latencies, answers' ages, errors, CPU seconds,
    wall seconds)."""
    import uvloop

    host, port = url.removeprefix("http://").rsplit(":", 1)
    took: list[float] = []
    ages: list[float] = []
    errors: list[str] = []

    async def main() -> None:
        tasks = [asyncio.create_task(client(host, int(port), interval, stop, took, ages, errors)) for _ in range(clients)]
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await asyncio.gather(*tasks)

    cpu0, t0 = time.process_time(), time.perf_counter()
    uvloop.run(main())
    results.put((took, ages, errors, time.process_time() - cpu0, time.perf_counter() - t0))


@dataclass
class CpuMeter:
    """CPU seconds used by a set of processes (and their children) over a stretch of time."""

    groups: dict[str, list[psutil.Process]]

    def read(self) -> dict[str, float]:
        out = {}
        for name, procs in self.groups.items():
            total = 0.0
            for p in procs:
                for q in [p, *p.children(recursive=True)]:
                    try:
                        t = q.cpu_times()
                        total += t.user + t.system
                    except psutil.NoSuchProcess:
                        pass
            out[name] = total
        return out


def meter(c: HttpCluster) -> CpuMeter:
    """The master alone, its HTTP process alone, the slaves with the workers they start."""
    master = psutil.Process(c.master.pid)
    http = [p for p in master.children() if "master.web" in p.cmdline()]
    return CpuMeter({"master": [master], "http": http, "slaves": [psutil.Process(s.pid) for s in c.slaves]})


def master_only(before: dict[str, float], after: dict[str, float], http_cpu: float) -> dict[str, float]:
    """The master's own CPU: its process tree's, less the HTTP process it supervises."""
    out = {k: after[k] - before[k] for k in after}
    out["master"] -= http_cpu
    return out


def run_sweep(c: HttpCluster, name: str, tasks: int) -> float:
    spec = {"name": name, "argv": ["true"], "timeout": 60, "parameters": {"grid": {"x": {"range": [0, tasks]}}},
            "results": {"code": "exit_code"}}
    assert c.submit(spec).status == 201
    # one event stream that ends with the sweep, not a poll of our own beside the pollers measured
    assert b"sweep_finished" in c.get(f"/api/v1/events?sweep={name}&until_end=1", timeout=600).body
    s = c.sweep(name)
    return tasks / (s["finished"] - s["created"])


@dataclass
class Round:
    alone: float
    loaded: float
    requests: float
    p50: float
    p99: float
    oldest: float
    errors: int
    cpu_alone: dict[str, float]
    cpu_loaded: dict[str, float]


def measure(c: HttpCluster, m: CpuMeter, name: str, tasks: int) -> tuple[float, dict[str, float], float]:
    """A sweep's dispatch rate and each party's CPU seconds per wall second while it ran."""
    before, t0 = m.read(), time.perf_counter()
    rate = run_sweep(c, name, tasks)
    after, wall = m.read(), time.perf_counter() - t0
    http = after["http"] - before["http"]
    return rate, {k: v / wall for k, v in master_only(before, after, http).items()}, wall


def one_round(c: HttpCluster, m: CpuMeter, i: int, args: argparse.Namespace) -> Round:
    alone, cpu_alone, _ = measure(c, m, f"base-{i}", args.tasks)
    stop = multiprocessing.Event()
    results: multiprocessing.Queue[Any] = multiprocessing.Queue()
    proc = multiprocessing.Process(target=poll, args=(c.url, args.pollers, args.interval, stop, results))
    proc.start()
    time.sleep(1.0)  # every poller connected and settled
    loaded, cpu_loaded, wall = measure(c, m, f"loaded-{i}", args.tasks)
    stop.set()
    took, ages, errors, poller_cpu, poller_wall = results.get(timeout=60)
    proc.join(30)
    took.sort()
    cpu_loaded["pollers"] = poller_cpu / poller_wall
    return Round(alone, loaded, len(took) / poller_wall, took[len(took) // 2] if took else float("nan"),
                 took[int(len(took) * 0.99)] if took else float("nan"), max(ages, default=float("nan")), len(errors),
                 cpu_alone, cpu_loaded)


def cpu_line(cpu: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--pollers", type=int, default=100)
    ap.add_argument("--interval", type=float, default=0.1, help="seconds each poller waits between requests")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--slaves", type=int, default=2)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--http-nice", type=int, default=None, help="http_nice of the master (default: its default)")
    args = ap.parse_args()

    extra = "" if args.http_nice is None else f"http_nice = {args.http_nice}\n"
    load0 = os.getloadavg()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="tf-bench-") as tmp:
        c = HttpCluster(Path(tmp) / "state", n=args.slaves, slots=args.slots, extra_config=extra)
        try:
            m = meter(c)
            run_sweep(c, "warmup", 100)
            for i in range(args.rounds):
                r = one_round(c, m, i, args)
                rounds.append(r)
                print(f"round {i + 1}: alone {r.alone:6.1f} tasks/s, with {args.pollers} pollers {r.loaded:6.1f} "
                      f"tasks/s ({r.requests:.0f} status requests/s, p50 {r.p50 * 1000:.1f} ms, p99 "
                      f"{r.p99 * 1000:.1f} ms, answers at most {r.oldest:.2f} s old, {r.errors} errors)\n"
                      f"  CPU s/s alone: {cpu_line(r.cpu_alone)}\n  CPU s/s polled: {cpu_line(r.cpu_loaded)}",
                      flush=True)
        finally:
            c.close()
    load1 = os.getloadavg()
    med = lambda f: statistics.median(f(r) for r in rounds)  # noqa: E731
    b, l = med(lambda r: r.alone), med(lambda r: r.loaded)
    print(f"\n{args.tasks}-task sweep, {args.slaves} slaves x {args.slots} slots, median of {args.rounds} rounds, "
          f"http_nice {'default' if args.http_nice is None else args.http_nice}; load average "
          f"{load0[0]:.1f} before, {load1[0]:.1f} after (1 min)")
    print(f"dispatch rate alone:              {b:8.1f} tasks/s")
    print(f"dispatch rate with {args.pollers:3d} pollers:   {l:8.1f} tasks/s  "
          f"(~{med(lambda r: r.requests):.0f} GET /api/v1/status per s)")
    print(f"slowdown (alone / polled):        {b / l:8.3f}  ({(1 - l / b) * 100:+.1f}% dispatch rate lost)")
    # each round's two sweeps ran back to back: their ratio is the least disturbed by a machine whose load drifts
    paired = med(lambda r: r.alone / r.loaded)
    print(f"median of the rounds' own ratios: {paired:8.3f}  ({(1 - 1 / paired) * 100:+.1f}% dispatch rate lost)")
    print(f"p50 / p99 of GET /api/v1/status:  {med(lambda r: r.p50) * 1000:.1f} / {med(lambda r: r.p99) * 1000:.1f} ms"
          f"  (answers at most {max(r.oldest for r in rounds):.2f} s old; http_cache_ttl 0.5 s)")
    for k in rounds[0].cpu_loaded:
        print(f"CPU s/s {k:8s} alone {med(lambda r: r.cpu_alone.get(k, 0.0)):5.2f}   polled "
              f"{med(lambda r: r.cpu_loaded[k]):5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
