#!/usr/bin/env python3
"""Benchmark: the throughput cost of CURVE versus plain TCP on a 1,000-task sweep.

Two local clusters (a master in this process, 2 slaves x 1 slot on loopback), one with CURVE (the default)
and one with `insecure = true`, run the same sweeps in alternating rounds; the median wall time of each
(from submit to the last stored result) is printed with the ratio. Workloads: `/bin/true` (small messages:
the per-message cost) and a 60 KiB stdout per task (the encryption cost per byte, still inline).
Usage: python3 scripts/bench_curve.py [--tasks 1000] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import zmq

from master.config import MasterConfig
from ticketfarm.client.local import LocalCluster
from ticketfarm.logs import configure_logging
from ticketfarm.spec import Sweep

WORKLOADS = {
    "/bin/true": ["/bin/true"],
    "60 KiB stdout": ["head", "-c", "61440", "/dev/zero"],
}


def run_sweep(cluster: LocalCluster, name: str, argv: list[str], tasks: int) -> float:
    sweep = Sweep(name=name, params=[{"i": i} for i in range(tasks)], argv=argv, timeout=60)
    started = time.perf_counter()
    counts = cluster.run_sweep(sweep)
    elapsed = time.perf_counter() - started
    assert counts.get("done") == tasks, counts
    return elapsed


def start(state: Path, insecure: bool) -> LocalCluster:
    """A local cluster; `insecure` = plain TCP (its warning at start is expected here)."""
    config = MasterConfig(heartbeat_interval=1.0, durability="normal", insecure=insecure)
    cluster = LocalCluster(state, 2, slots=1, config=config)
    cluster.run_until(lambda: len(cluster.master.roster) == 2)
    return cluster


def transport(size: int, count: int, curve: bool) -> float:
    """Seconds to push `count` messages of `size` bytes DEALER -> ROUTER over loopback TCP (no master)."""
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for sock in (router, dealer):
        sock.linger = 0
        sock.rcvhwm = sock.sndhwm = 0
    if curve:  # no ZAP handler in this context: CURVE without the key check, the cost of the crypto alone
        server_public, server_secret = zmq.curve_keypair()
        router.curve_server, router.curve_secretkey = True, server_secret
        dealer.curve_serverkey = server_public
        dealer.curve_publickey, dealer.curve_secretkey = zmq.curve_keypair()
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send(b"hello")
    router.recv_multipart()
    body = b"x" * size
    started = time.perf_counter()
    for _ in range(count):
        dealer.send(body, copy=False)
    for _ in range(count):
        router.recv_multipart(copy=False)
    elapsed = time.perf_counter() - started
    ctx.destroy(linger=0)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    configure_logging("warning", False)
    times: dict[tuple[str, bool], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        clusters = {False: start(Path(tmp) / "curve", False), True: start(Path(tmp) / "plain", True)}
        try:
            for r in range(args.rounds):
                for label, argv in WORKLOADS.items():
                    for insecure in (False, True) if r % 2 == 0 else (True, False):
                        name = f"b{r}-{label.replace(' ', '').replace('/', '')}"
                        times.setdefault((label, insecure), []).append(
                            run_sweep(clusters[insecure], name, argv, args.tasks))
        finally:
            for c in clusters.values():
                c.close()
    print(f"{args.tasks} tasks, 2 local slaves x 1 slot, {args.rounds} alternating rounds, durability=normal")
    print("best = fastest round (least disturbed by other load), median = middle round")
    print(f"{'workload':<14} {'':>6} {'plain TCP':>10} {'CURVE':>10} {'CURVE/plain':>12} {'tasks/s plain':>14} "
          f"{'tasks/s CURVE':>14}")
    for label in WORKLOADS:
        for stat, fn in (("best", min), ("median", statistics.median)):
            plain, curve = fn(times[(label, True)]), fn(times[(label, False)])
            print(f"{label:<14} {stat:>6} {plain:>8.2f} s {curve:>8.2f} s {curve / plain:>11.3f}x "
                  f"{args.tasks / plain:>14.0f} {args.tasks / curve:>14.0f}")
    print("\ntransport alone (DEALER -> ROUTER on loopback, best of 3):")
    for size, count in ((64, 200_000), (60 * 1024, 20_000)):
        plain = min(transport(size, count, False) for _ in range(3))
        curve = min(transport(size, count, True) for _ in range(3))
        print(f"{count} x {size} B: plain {count / plain:,.0f} msg/s ({count * size / plain / 2**20:,.0f} MiB/s), "
              f"CURVE {count / curve:,.0f} msg/s ({count * size / curve / 2**20:,.0f} MiB/s), "
              f"CURVE/plain time {curve / plain:.2f}x")


if __name__ == "__main__":
    main()
