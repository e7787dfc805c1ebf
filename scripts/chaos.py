#!/usr/bin/env python3
"""A seeded storm of faults against a real master and real slaves, then a check of the promise.

A master process and N slaves run a sweep whose every output is a function of its parameters. As root, with
ansible-playbook, each slave lives on a test host of its own (a network namespace with sshd, made by
scripts/testhosts.sh), installed and started there by playbooks/slaves.yml under its supervisor; else
(`--local`) they are processes on loopback, without link and disk faults. Faults drawn from
`random.Random(seed)` hit them meanwhile: slave SIGKILL (its supervisor restarts it; we do if it is slow to), slave
SIGSTOP past its tickets' deadline then SIGCONT, master SIGKILL and restart on the same state dir, a second master on
that state dir (must refuse), a host's link cut past the liveness, packet loss (tc netem), worker SIGKILL (a crash),
worker SIGSTOP (a timeout), and slave 1's small work disk (a tmpfs) filled so that its workers and its outbox meet
ENOSPC, then freed. Then everything is healed, the sweep runs to its end, and the store, the collected CSV and the
slaves' acknowledgements are checked: every task done exactly once with its own result, no acknowledged result lost,
attempts and tickets consistent, no worker left alive, SQLite integrity; and the master's own promise metrics
(/metrics) against the counts made here. The seed, the fault schedule and the counts are printed, so a failing seed
replays the same schedule.

Usage: python3 scripts/chaos.py --seed 7 --duration 60 [--tasks 2000] [--slaves 3] [--local] [--calm] [--keep DIR]
Exit status 0 when the promise held, 1 when it did not.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

from chaos_check import SWEEP, check, compare_metrics, parse_metrics, under  # noqa: E402  (beside this script)
from chaos_hosts import DeployedSlaves, Hosts, LocalSlaves, workers  # noqa: E402
from tests.testhosts import why_not  # noqa: E402
from ticketfarm import keys  # noqa: E402
from ticketfarm.client.control import control  # noqa: E402
from ticketfarm.errors import MasterUnreachable  # noqa: E402
from ticketfarm.spec import load_spec  # noqa: E402

HEARTBEAT = 0.2
LIVENESS = 5
TIMEOUT = 2.0
"""Each task's timeout (s): a worker stopped longer than this is killed by its slave."""
SPEC = f"""
name = "{SWEEP}"
command = "sleep 0.$(( {{n}} % 4 )); echo {{n}} $(( {{n}} * {{n}} % 1000003 ))"
timeout = {TIMEOUT}
max_attempts = 50
[parameters.grid]
n = {{range = [{{tasks}}]}}
[results]
out = "stdout"
[[collect]]
mode = "table"
path = "chaos.csv"
"""
#: Fault kinds and their weights; link faults only with network namespaces.
KINDS = {"slave_kill": 3, "slave_stop": 2, "master_kill": 1, "second_master": 1, "worker_kill": 4,
         "worker_stop": 2, "link_cut": 2, "packet_loss": 1, "disk_full": 2}
HOST_KINDS = ("link_cut", "packet_loss", "disk_full")
"""Faults only test hosts can take."""


@dataclass
class Fault:
    at: float
    kind: str
    target: int
    length: float

    def __str__(self) -> str:
        return f"{self.at:6.2f}s {self.kind:<13} slave-{self.target} {self.length:.2f}s"


def schedule(seed: int, duration: float, slaves: int, hosts: bool) -> list[Fault]:
    """The faults of a run: a function of the seed alone (and of what the run can inject)."""
    rng = random.Random(seed)
    kinds = [k for k in KINDS if hosts or k not in HOST_KINDS]
    weights = [KINDS[k] for k in kinds]
    faults, at = [], 1.0
    while True:
        at += rng.expovariate(1 / 0.8)
        if at >= duration:
            return faults
        kind = rng.choices(kinds, weights)[0]
        length = {"slave_stop": rng.uniform(2.5, 4), "link_cut": rng.uniform(1.5, 3),
                  "packet_loss": rng.uniform(2, 4), "worker_stop": TIMEOUT + 1,
                  "slave_kill": rng.uniform(0.3, 2), "master_kill": rng.uniform(0.3, 1.5),
                  "disk_full": rng.uniform(1.5, 3)}.get(kind, 0.0)
        target = rng.randrange(1, slaves + 1)
        faults.append(Fault(round(at, 2), kind, 1 if kind == "disk_full" else target, round(length, 2)))


@dataclass
class Cluster:
    """The master and slave processes of one run, started, killed and restarted by the faults."""

    root: Path
    slaves: int
    hosts: Hosts | None
    master: subprocess.Popen | None = None
    stopped: set[int] = field(default_factory=set)
    runs: list[dict] = field(default_factory=list)
    """Each master process's start (time, offset in master.log) and its last metrics scrape."""

    def __post_init__(self) -> None:
        self.state = self.root / "state"
        self.state.mkdir(parents=True)
        keys.init_state_keys(self.state)
        host = f"{self.hosts.net}.1" if self.hosts else "127.0.0.1"
        self.endpoint = f"tcp://{host}:{free_port(host)}"
        (self.state / "master.toml").write_text(
            f'bind = "{self.endpoint}"\nheartbeat_interval = {HEARTBEAT}\nliveness = {LIVENESS}\n'
            f'deadline_grace = 1.0\ndurability = "normal"\n')
        self.client_keys = keys.ClientKeys.from_dir(keys.keys_dir(self.state))
        self.fleet = DeployedSlaves(self.hosts, self.endpoint, self.state, HEARTBEAT, LIVENESS) if self.hosts \
            else LocalSlaves(self.root, self.slaves, self.endpoint, self.state, HEARTBEAT)

    def ask(self, op: str, timeout: float = 2.0, **fields: object) -> dict | None:
        try:
            return control(self.endpoint, op, timeout=timeout, keys=self.client_keys, **fields)
        except MasterUnreachable:
            return None

    def start_master(self) -> None:
        log_path = self.root / "master.log"
        self.runs.append({"started": time.time(), "offset": log_path.stat().st_size if log_path.exists() else 0,
                          "metrics": {}})
        with open(log_path, "ab") as log:
            self.master = subprocess.Popen([sys.executable, "-m", "ticketfarm", "--state", str(self.state),
                                            "--log-level", "info", "master"], stdout=log, stderr=log)
        deadline = time.time() + 20
        while not self.ask("ping", 0.5):
            if time.time() > deadline or self.master.poll() is not None:
                raise RuntimeError(f"master did not start; see {self.root / 'master.log'}")

    def scrape(self) -> None:
        """The running master's promise metrics (CONTROL op `metrics`, what /metrics serves), kept per master run."""
        reply = self.ask("metrics", 2)
        if reply and reply.get("ok"):
            self.runs[-1]["metrics"] = parse_metrics(reply["text"])

    def finished(self) -> bool:
        status = self.ask("status", 2) or {}
        return any(s["name"] == SWEEP and s["state"] == "finished" for s in status.get("sweeps", []))

    def master_up(self) -> bool:
        return self.master is not None and self.master.poll() is None

    def kill_master(self) -> None:
        if self.master_up():
            self.scrape()  # what it counted up to a moment before its end
            self.master.kill()  # type: ignore[union-attr]
            self.master.wait()  # type: ignore[union-attr]

    def second_master(self) -> int:
        """Exit code of a second master started on the same state dir (4: refused, as it must be)."""
        result = subprocess.run([sys.executable, "-m", "ticketfarm", "--state", str(self.state), "master"],
                                capture_output=True, text=True, timeout=30)
        return result.returncode

    def start_slave(self, i: int) -> None:
        self.fleet.start(i)
        self.stopped.discard(i)

    def slave_up(self, i: int) -> bool:
        return self.fleet.pid(i) is not None

    def signal_slave(self, i: int, sig: signal.Signals) -> None:
        pid = self.fleet.pid(i)
        if pid is None:
            return
        os.kill(pid, sig)
        if sig == signal.SIGSTOP:
            self.stopped.add(i)
        elif sig == signal.SIGCONT:
            self.stopped.discard(i)
        elif sig == signal.SIGKILL:
            self.stopped.discard(i)
            self.fleet.reap(i)

    def workers(self, i: int) -> list[psutil.Process]:
        return workers(self.fleet.pid(i))

    def stop_all(self) -> None:
        self.fleet.stop_all()
        if self.master_up():
            self.scrape()
            self.master.terminate()  # type: ignore[union-attr]
            try:
                self.master.wait(15)  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                self.kill_master()


def free_port(host: str) -> int:
    """A TCP port on `host` that nothing listens on now (for the master to bind)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class Storm:
    """Injects the faults at their times and undoes each when its length has passed."""

    def __init__(self, cluster: Cluster, rng: random.Random):
        self.cluster = cluster
        self.rng = rng
        self.heals: list[tuple[float, str, int]] = []
        self.injected: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.refusals: list[int] = []

    def inject(self, fault: Fault, now: float) -> None:
        c, i = self.cluster, fault.target
        busy = {(kind, target) for _, kind, target in self.heals}
        if fault.kind == "master_kill":
            if not c.master_up():
                return self._skip(fault)
            c.kill_master()
        elif fault.kind == "second_master":
            if not c.master_up():
                return self._skip(fault)
            self.refusals.append(c.second_master())
        elif fault.kind in ("slave_kill", "slave_stop"):
            if not c.slave_up(i) or ("slave_kill", i) in busy or ("slave_stop", i) in busy:
                return self._skip(fault)
            c.signal_slave(i, signal.SIGKILL if fault.kind == "slave_kill" else signal.SIGSTOP)
        elif fault.kind in ("worker_kill", "worker_stop"):
            workers = c.workers(i) if c.slave_up(i) and i not in c.stopped else []
            if not workers:
                return self._skip(fault)
            victim = self.rng.choice(workers)
            try:
                os.killpg(victim.pid, signal.SIGKILL if fault.kind == "worker_kill" else signal.SIGSTOP)
            except ProcessLookupError:
                return self._skip(fault)
            # a stopped worker is killed by its slave at its timeout: nothing to undo
        elif fault.kind == "link_cut":
            if ("link_cut", i) in busy:
                return self._skip(fault)
            c.hosts.cut(i, True)  # type: ignore[union-attr]
        elif fault.kind == "packet_loss":
            if ("packet_loss", i) in busy:
                return self._skip(fault)
            c.hosts.loss(i, True)  # type: ignore[union-attr]
        elif fault.kind == "disk_full":
            if ("disk_full", i) in busy:
                return self._skip(fault)
            c.fleet.fill_disk(True)  # type: ignore[union-attr]
        self.injected[fault.kind] += 1
        if fault.length and fault.kind not in ("worker_stop",):
            self.heals.append((now + fault.length, fault.kind, i))

    def _skip(self, fault: Fault) -> None:
        self.skipped[fault.kind] += 1

    def heal_due(self, now: float, everything: bool = False) -> None:
        due = [h for h in self.heals if everything or h[0] <= now]
        self.heals = [h for h in self.heals if h not in due]
        for _, kind, i in sorted(due):
            self.heal(kind, i)

    def heal(self, kind: str, i: int) -> None:
        c = self.cluster
        if kind == "master_kill":
            c.start_master()
        elif kind == "slave_kill":
            c.start_slave(i)
        elif kind == "slave_stop":
            c.signal_slave(i, signal.SIGCONT)
        elif kind == "link_cut":
            c.hosts.cut(i, False)  # type: ignore[union-attr]
        elif kind == "packet_loss":
            c.hosts.loss(i, False)  # type: ignore[union-attr]
        elif kind == "disk_full":
            c.fleet.fill_disk(False)  # type: ignore[union-attr]


# -- the run -------------------------------------------------------------------------------------------------
def run(seed: int, duration: float, tasks: int, slaves: int, local: bool, root: Path, calm: bool = False) -> int:
    no_hosts = "--local" if local else why_not("cx")
    faults = [] if calm else schedule(seed, duration, slaves, no_hosts is None)
    print(f"chaos seed={seed} duration={duration}s tasks={tasks} slaves={slaves} root={root} hosts="
          + ("test hosts (network namespaces), slaves deployed by playbooks/slaves.yml" if no_hosts is None
             else f"loopback ({no_hosts})"))
    print("schedule:\n  " + "\n  ".join(map(str, faults)))
    hosts = Hosts(root, slaves) if no_hosts is None else None
    cluster = Cluster(root, slaves, hosts)
    storm = Storm(cluster, random.Random(seed + 1))
    sweep_wall = deploy = 0.0
    try:
        cluster.start_master()
        deploy = cluster.fleet.deploy()
        print(f"slaves up (and registered, when deployed) in {deploy:.1f}s")
        spec = root / "chaos.toml"
        spec.write_text(SPEC.replace("{tasks}", str(tasks)))
        if not (cluster.ask("submit", 10, **load_spec(spec).submit_fields()) or {}).get("ok"):
            raise RuntimeError("submit failed")
        t0 = time.monotonic()
        pending = list(faults)
        checked = 0.0
        while time.monotonic() - t0 < duration:
            now = time.monotonic() - t0
            while pending and pending[0].at <= now:
                storm.inject(pending.pop(0), now)
            storm.heal_due(now)
            if now - checked > 0.5:  # faults after the end would hit nothing
                checked = now
                if cluster.master_up():
                    cluster.scrape()
                    if cluster.finished():
                        break
            time.sleep(0.02)
        storm.heal_due(0, everything=True)
        for i in range(1, slaves + 1):
            if not cluster.slave_up(i):
                cluster.start_slave(i)
        if not cluster.master_up():
            cluster.start_master()
        deadline = time.monotonic() + max(120, tasks / 10)
        while not cluster.finished():
            if time.monotonic() > deadline:
                raise RuntimeError(f"sweep not finished after the storm; see {root}")
            time.sleep(0.2)
        sweep_wall = time.monotonic() - t0
        subprocess.run([sys.executable, "-m", "ticketfarm", "--state", str(cluster.state), "collect", SWEEP,
                        "--out", str(root / "out")], check=True, capture_output=True)
    finally:
        cluster.stop_all()
        time.sleep(1)  # a watchdog kills within moments of its slave's end
        orphans = [p.pid for p in psutil.process_iter() if under(p, root)]  # before the hosts' teardown kills all
        if hosts is not None:
            hosts.down()
    problems, counts = check(root, cluster.state, tasks, orphans, cluster.fleet.logs())
    table, disagreements = compare_metrics(root, cluster.state, counts, cluster.runs)
    problems += disagreements
    refused = Counter(storm.refusals)
    if any(code != 4 for code in storm.refusals):
        problems.append(f"a second master on the state dir was not refused: exit codes {dict(refused)}")
    print("faults injected: " + ", ".join(f"{k}={storm.injected[k]}" for k in KINDS if storm.injected[k]))
    if storm.skipped:
        print("faults skipped (target not in a state to take them): " + ", ".join(
            f"{k}={v}" for k, v in sorted(storm.skipped.items())))
    print(table)
    print("counts: " + ", ".join(f"{k}={v}" for k, v in counts.items()) + f", sweep_wall={sweep_wall:.1f}s, "
          f"deploy={deploy:.1f}s")
    print(json.dumps({"seed": seed, "injected": storm.injected, "counts": counts, "sweep_wall": round(sweep_wall, 1),
                      "deploy": round(deploy, 1), "problems": problems}))
    for problem in problems:
        print(f"PROMISE BROKEN: {problem}")
    print("promise held" if not problems else f"replay: python3 scripts/chaos.py --seed {seed} "
          f"--duration {duration:g} --tasks {tasks} --slaves {slaves}{' --local' if local else ''}")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of faults (then the sweep ends)")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--slaves", type=int, default=3)
    parser.add_argument("--local", action="store_true", help="all on loopback, no network namespaces")
    parser.add_argument("--calm", action="store_true", help="no faults: the same sweep's wall time to compare")
    parser.add_argument("--keep", type=Path, help="run in this (new) directory and keep it")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True)
        return run(args.seed, args.duration, args.tasks, args.slaves, args.local, args.keep.resolve(), args.calm)
    with tempfile.TemporaryDirectory(prefix="tf-chaos-") as tmp:
        return run(args.seed, args.duration, args.tasks, args.slaves, args.local, Path(tmp), args.calm)


if __name__ == "__main__":
    sys.exit(main())
