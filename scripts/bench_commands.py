#!/usr/bin/env python3
"""Benchmark: 1,000 `/bin/true` and 1,000 `sleep 0.01` with 2 slots through ticketfarm --local, xargs -P2
and GNU parallel -j2, in one run, printing wall times and ratios against xargs; then how soon a short
`ticketfarm run --local` ends after its last result, and how long `ticketfarm status` takes with no master.

ticketfarm is timed from submit to the last result on an already started local cluster (2 slaves x 1 slot);
its start-up time is reported separately. Usage: python3 scripts/bench_commands.py [--tasks 1000] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from master.config import MasterConfig
from ticketfarm.client.local import LocalCluster
from ticketfarm.logs import configure_logging
from ticketfarm.spec import Sweep


def time_shell(cluster: LocalCluster, cmd: str) -> float:
    """Wall time of a shell command; the idle cluster keeps serving meanwhile (its slaves must hear heartbeats)."""
    ended: list[float] = []
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def wait() -> None:
        proc.wait()
        ended.append(time.perf_counter())

    # The end is taken by a thread waiting on the process: the serving loop notices it only at its next wake-up.
    waiter = threading.Thread(target=wait)
    waiter.start()
    cluster.run_until(lambda: bool(ended))
    waiter.join()
    if proc.returncode:
        raise SystemExit(f"{cmd!r} failed with exit code {proc.returncode}")
    return ended[0] - started


def cpu_seconds() -> tuple[float, float, float]:
    """CPU used so far by this process (master and client), by the slaves, and by everything they started
    (batch runners, workers, watchdogs): where a tiny task's time goes."""
    me = psutil.Process()
    slaves = others = 0.0
    for child in me.children():
        try:
            times = child.cpu_times()
            slaves += times.user + times.system
            others += times.children_user + times.children_system
            for grandchild in child.children(recursive=True):
                own = grandchild.cpu_times()
                others += own.user + own.system + own.children_user + own.children_system
        except psutil.Error:
            continue
    mine = me.cpu_times()
    return mine.user + mine.system, slaves, others


def time_ticketfarm(cluster: LocalCluster, name: str, argv: list[str], tasks: int) -> tuple[float, list[float]]:
    """Wall seconds of the sweep, and CPU ms per task of the master, the slaves and what they started."""
    sweep = Sweep(name=name, params=[{"i": i} for i in range(tasks)], argv=argv, timeout=60,
                  results={"code": "exit_code"})
    sweep.collect = []
    before = cpu_seconds()
    started = time.perf_counter()
    counts = cluster.run_sweep(sweep)
    elapsed = time.perf_counter() - started
    after = cpu_seconds()
    assert counts.get("done") == tasks, counts
    return elapsed, [1000 * (a - b) / tasks for a, b in zip(after, before)]


SHORT_SPEC = """name = "short"
command = "echo {x}"
[parameters.grid]
x = [1, 2, 3, 4, 5, 6]
"""


def short_runs(rounds: int) -> None:
    """`run --local 4` of 6 tasks: seconds from its last result (the store's last ticket end) to the process's
    end, and warnings printed; then `status` of that state dir with no master running."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spec.toml").write_text(SHORT_SPEC)
        cli = [sys.executable, "-m", "ticketfarm", "--state", "st"]
        env = {**os.environ, "TICKETFARM_LOG": "warning"}
        for _ in range(rounds):
            shutil.rmtree(Path(tmp) / "st", ignore_errors=True)
            run = subprocess.run([*cli, "run", "spec.toml", "--local", "4"], cwd=tmp, env=env, capture_output=True,
                                 text=True)
            ended = time.time()
            db = sqlite3.connect(Path(tmp) / "st" / "state.db")
            last = db.execute("SELECT max(finished) FROM tickets").fetchone()[0]
            db.close()
            warnings = sum("warning" in line for line in run.stderr.splitlines())
            print(f"run --local 4, 6 tasks: ended {ended - last:.3f} s after its last result "
                  f"(exit code {run.returncode}, {warnings} warnings)")
        for _ in range(rounds):
            started = time.perf_counter()
            status = subprocess.run([*cli, "status"], cwd=tmp, env=env, capture_output=True, text=True)
            print(f"status with no master: {time.perf_counter() - started:.3f} s (exit code {status.returncode})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--durability", default="full", choices=["full", "normal"])
    parser.add_argument("--rounds", type=int, default=3, help="short local runs and status calls timed")
    args = parser.parse_args()
    configure_logging("warning")
    n = args.tasks
    have_parallel = shutil.which("parallel") is not None
    workloads = {"/bin/true": (["/bin/true"], "/bin/true"), "sleep 0.01": (["sleep", "0.01"], "sleep 0.01")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        config = MasterConfig(heartbeat_interval=1.0, durability=args.durability)
        t0 = time.perf_counter()
        cluster = LocalCluster(Path(tmp) / "state", 2, slots=1, config=config)
        cluster.run_until(lambda: len(cluster.master.roster) == 2)
        startup = time.perf_counter() - t0
        try:
            for label, (argv, shell_cmd) in workloads.items():
                xargs = time_shell(cluster, f"seq {n} | xargs -P2 -I{{}} {shell_cmd}")
                parallel = (time_shell(cluster, f"seq {n} | parallel -j2 -N0 {shell_cmd} >/dev/null")
                            if have_parallel else None)
                tf, cpu = time_ticketfarm(cluster, f"bench-{label.replace(' ', '-').replace('/', '')}", argv, n)
                rows.append((label, xargs, parallel, tf, cpu))
        finally:
            cluster.close()
    print(f"ticketfarm local cluster start-up (master + 2 slaves connected): {startup:.2f} s")
    print(f"{n} tasks, 2 slots, durability={args.durability}")
    print(f"{'workload':<12} {'xargs -P2':>10} {'parallel -j2':>13} {'ticketfarm':>11} {'tf/xargs':>9} {'parallel/tf':>12}")
    for label, xargs, parallel, tf, _ in rows:
        par = f"{parallel:.2f} s" if parallel is not None else "n/a"
        par_ratio = f"{parallel / tf:.1f}x" if parallel is not None else "n/a"
        print(f"{label:<12} {xargs:>8.2f} s {par:>13} {tf:>9.2f} s {tf / xargs:>8.2f}x {par_ratio:>12}")
    for label, *_, (master, slaves, started) in rows:
        print(f"CPU per task of {label}: master {master:.2f} ms, slaves {slaves:.2f} ms, "
              f"workers with batch runners and watchdogs {started:.2f} ms")
    short_runs(args.rounds)


if __name__ == "__main__":
    main()
