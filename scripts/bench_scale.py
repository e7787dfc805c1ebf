#!/usr/bin/env python3
"""Benchmark: one real master against many simulated slaves; prints the master's cost curve as a table.

The master runs as `python -m ticketfarm master` (CURVE on and off). Simulator processes (scripts/scale_sim.py)
each hold many DEALERs, one per simulated slave, speaking the real protocol through `ticketfarm.messages`: HELLO,
REQUEST for their slots, every TICKET answered at once with a RESULT (an `exit_code` output inline), HEARTBEAT
when a welcomed slave has sent nothing for `heartbeat_interval`. Per case (CURVE, slaves, sweep size) it measures over a window of sustained flow:

- tickets/s: results acknowledged per second (an ACK comes only after the result's group commit);
- master CPU per ticket (user + system of the whole master process) and how busy it was (CPU s per wall s);
- ticket round trip, median and p99: from the REQUEST that bought a slot to the ACK of the result of the ticket
  sent for it (dispatch, result intake and commit);
- heartbeats the slaves sent per second; false deaths (`slave_dead` events: no simulated slave ever dies);
- master peak RSS (VmHWM) and the store's bytes per task (state.db + WAL over the sweep's tasks);
- the simulator processes' busiest CPU share: below SIM_SATURATED (0.8) they had headroom, so the master set the
  pace; above it the row says so (run again with twice `--sim-procs` to see that the figures do not move).

Usage: python3 scripts/bench_scale.py                      # 10, 100, 1,000, 10,000 slaves; 100,000 tasks and
                                                           # 1,000,000 queued; CURVE off and on
       python3 scripts/bench_scale.py --quick              # about a minute: 10 and 100 slaves, 2,000 tasks
       python3 scripts/bench_scale.py --slaves 1000 --tasks 100000 --queued 0 --curve off
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from scale_sim import HEARTBEAT, Shared, simulate

LIVENESS = 5
#: CPU seconds per wall second of the busiest simulator above which the simulators, not the master, may set the
#: pace (the row then says so).
SIM_SATURATED = 0.8


# -- the parent: one case ---------------------------------------------------------------------------------------
@dataclass
class Case:
    curve: bool
    slaves: int
    tasks: int
    queued: bool
    """True: a fixed window with the sweep mostly still queued; False: from 5 % to 95 % of the sweep."""


@dataclass
class Row:
    case: Case
    tickets_per_s: float
    cpu_ms: float
    master_busy: float
    rtt_p50_ms: float
    rtt_p99_ms: float
    heartbeats_per_s: float
    rss_mb: float
    store_bytes_per_task: float
    false_deaths: int
    sim_busy: float
    submit_s: float
    connect_s: float
    note: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start_master(state: Path, curve: bool, durability: str) -> tuple[subprocess.Popen, str]:
    from master.config import MasterConfig, master_config_path
    from ticketfarm import keys
    from ticketfarm.config import to_toml

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = MasterConfig(bind=endpoint, insecure=not curve, heartbeat_interval=HEARTBEAT, liveness=LIVENESS,
                          max_message_size=256 * 1024 * 1024, durability=durability)
    state.mkdir(parents=True)
    master_config_path(state).write_text(to_toml(config))
    if curve:
        keys.init_state_keys(state)
    log = open(state / "master.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "ticketfarm", "--state", str(state), "master"],
                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=raise_fd_limit)
    deadline = time.time() + 30
    while b"listening on" not in (state / "master.log").read_bytes():
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"master did not start:\n{(state / 'master.log').read_text()}")
        time.sleep(0.05)
    return proc, endpoint


def master_cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def store_bytes(state: Path) -> int:
    return sum(p.stat().st_size for p in state.glob("state.db*"))


def false_deaths(state: Path) -> int:
    db = sqlite3.connect(f"file:{state / 'state.db'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT count(*) FROM events WHERE kind = 'slave_dead'").fetchone()[0]
    finally:
        db.close()


def submit(endpoint: str, state: Path, curve: bool, tasks: int) -> float:
    from ticketfarm.client.control import control
    from ticketfarm.keys import ClientKeys, keys_dir
    from ticketfarm.spec import Sweep

    sweep = Sweep(name="scale", params=[{"i": i} for i in range(tasks)], argv=["/bin/true"], timeout=600,
                  results={"code": "exit_code"})
    sweep.collect = []
    kdir = keys_dir(state)
    client_keys = ClientKeys.load(kdir / "master.key", kdir / "client.key_secret") if curve else None
    started = time.perf_counter()
    reply = control(endpoint, "submit", timeout=600, keys=client_keys, **sweep.submit_fields())
    if not reply.get("ok"):
        raise SystemExit(f"submit refused: {reply}")
    return time.perf_counter() - started


def wait_for(predicate: Any, timeout: float, what: str) -> bool:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            print(f"  (gave up waiting for {what} after {timeout:.0f} s)", file=sys.stderr)
            return False
        time.sleep(0.02)
    return True


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_case(case: Case, args: argparse.Namespace, tmp: Path) -> Row:
    state = tmp / f"{'curve' if case.curve else 'plain'}-{case.slaves}-{case.tasks}"
    proc, endpoint = start_master(state, case.curve, args.durability)
    master = psutil.Process(proc.pid)
    procs = max(1, min(args.sim_procs, case.slaves))
    shared = Shared.make(procs)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    names = [f"sim-{i}" for i in range(case.slaves)]
    keys_dir = str(state / "keys") if case.curve else None
    sims = [ctx.Process(target=simulate, args=(i, names[i::procs], endpoint, keys_dir, args.slots, shared, out,
                                                       args.task_seconds))
            for i in range(procs)]
    note = ""
    try:
        started = time.perf_counter()
        for p in sims:
            p.start()
        wait_for(lambda: sum(shared.welcomed) >= case.slaves, args.timeout, "every slave welcomed")
        connect_s = time.perf_counter() - started
        submit_s = submit(endpoint, state, case.curve, case.tasks)
        warm = case.tasks // 20 if not case.queued else min(case.tasks // 20, args.slaves_warmup)
        wait_for(lambda: sum(shared.acked) >= warm, args.timeout, "the first results")
        sim_ps = [psutil.Process(p.pid) for p in sims]
        t0, acked0, beats0 = time.time(), sum(shared.acked), sum(shared.heartbeats)
        cpu0, sim_cpu0 = master_cpu(master), [master_cpu(p) for p in sim_ps]
        shared.window[0] = t0
        spy = None if args.py_spy is None else subprocess.Popen(
            ["py-spy", "record", "--pid", str(proc.pid), "--rate", "200", "--format", "raw", "--nonblocking",
             "--output", str(args.py_spy / f"{state.name}.txt")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if case.queued:
            time.sleep(args.window)
        elif not wait_for(lambda: sum(shared.acked) >= case.tasks * 0.95, args.timeout, "95 % of the sweep"):
            note = "timed out"
        t1, acked1, beats1 = time.time(), sum(shared.acked), sum(shared.heartbeats)
        cpu1, sim_cpu1 = master_cpu(master), [master_cpu(p) for p in sim_ps]
        shared.window[1] = t1
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
        rss, size = peak_rss_mb(proc.pid), store_bytes(state)
        time.sleep(0.2)  # the ACKs of the window's last results
        shared.stop.value = 1
        results = dict(out.get(timeout=60) for _ in sims)
    finally:
        shared.stop.value = 1
        for p in sims:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    wall = t1 - t0
    done = acked1 - acked0
    samples = [x for r in results.values() for x in r["samples"]]
    if sum(r["rehellos"] for r in results.values()):
        note = (note + " " if note else "") + f"{sum(r['rehellos'] for r in results.values())} re-hellos"
    sim_busy = max((b - a) / wall for a, b in zip(sim_cpu0, sim_cpu1))
    if sim_busy > SIM_SATURATED:
        note = (note + " " if note else "") + "simulators saturated: run again with more --sim-procs"
    return Row(case, done / wall, 1000 * (cpu1 - cpu0) / max(done, 1), (cpu1 - cpu0) / wall,
               1000 * percentile(samples, 0.5), 1000 * percentile(samples, 0.99), (beats1 - beats0) / wall, rss,
               size / case.tasks, false_deaths(state), sim_busy, submit_s, connect_s, note)


# -- the table ---------------------------------------------------------------------------------------------------
COLUMNS = ("CURVE", "slaves", "tasks", "tickets/s", "CPU ms/ticket", "master busy", "rtt p50 ms", "rtt p99 ms",
           "heartbeats/s", "peak RSS MB", "store B/task", "false deaths", "sim busy max", "submit s", "connect s")


def cells(row: Row) -> list[str]:
    c = row.case
    tasks = f"{c.tasks:,}" + (" queued" if c.queued else "")
    return ["on" if c.curve else "off", f"{c.slaves:,}", tasks, f"{row.tickets_per_s:,.0f}", f"{row.cpu_ms:.3f}",
            f"{row.master_busy:.2f}", f"{row.rtt_p50_ms:.1f}", f"{row.rtt_p99_ms:.1f}", f"{row.heartbeats_per_s:,.0f}",
            f"{row.rss_mb:.0f}", f"{row.store_bytes_per_task:.0f}", str(row.false_deaths), f"{row.sim_busy:.2f}",
            f"{row.submit_s:.1f}", f"{row.connect_s:.1f}"] + ([row.note] if row.note else [])


def print_table(rows: list[Row]) -> None:
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "|".join(" --- " if i < 3 else " ---: " for i in range(len(COLUMNS))) + "|")
    for row in rows:
        print("| " + " | ".join(cells(row)) + " |", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slaves", default="10,100,1000,10000", help="comma-separated slave counts")
    parser.add_argument("--tasks", type=int, default=100_000, help="tasks of the run-to-the-end sweep (0: skip)")
    parser.add_argument("--queued", type=int, default=1_000_000, help="tasks of the mostly-queued sweep (0: skip)")
    parser.add_argument("--curve", default="both", choices=["both", "on", "off"])
    parser.add_argument("--durability", default="full", choices=["full", "normal"], help="the master's")
    parser.add_argument("--slots", type=int, default=2, help="slots per simulated slave")
    parser.add_argument("--task-seconds", type=float, default=0.001,
                        help="run time each simulated result reports (under 0.05 the master sends bundles)")
    parser.add_argument("--sim-procs", type=int, default=4, help="simulator processes")
    parser.add_argument("--window", type=float, default=15.0, help="seconds measured with the big sweep queued")
    parser.add_argument("--timeout", type=float, default=600.0, help="bound on each wait of a case")
    parser.add_argument("--quick", action="store_true", help="10 and 100 slaves, 2,000 tasks, 5,000 queued, 3 s")
    parser.add_argument("--json", type=Path, help="also write the rows here as JSON")
    parser.add_argument("--py-spy", type=Path, metavar="DIR",
                        help="record the master with py-spy during each window (collapsed stacks, one file per case)")
    args = parser.parse_args(argv)
    if args.quick:
        args.slaves, args.tasks, args.queued, args.window = "10,100", 2000, 5000, 3.0
    args.slaves_warmup = 2000
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    raise_fd_limit()
    if args.py_spy is not None:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    curves = {"both": [False, True], "on": [True], "off": [False]}[args.curve]
    cases = [Case(curve, int(n), size, queued) for curve in curves for n in args.slaves.split(",")
             for size, queued in ((args.tasks, False), (args.queued, True)) if size]
    print(f"{len(cases)} cases; {os.cpu_count()} CPUs; {args.sim_procs} simulator processes, {args.slots} slots "
          f"per slave; heartbeat {HEARTBEAT:g} s x liveness {LIVENESS}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for case in cases:
            rows.append(run_case(case, args, Path(tmp)))
            print("  " + " ".join(cells(rows[-1])), file=sys.stderr, flush=True)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps([{**r.__dict__, "case": r.case.__dict__} for r in rows], indent=1))
    return rows


if __name__ == "__main__":
    main()
