"""No process outlives what started it: workers of a killed slave, local slaves of a killed `run --local`."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.conftest import SlaveProcess, wait_for, write_spec

TICKING_SPEC = """
    name = "ticking"
    command = "while true; do echo tick >> {workdir}/ticks; sleep 0.05; done"
    timeout = 600
    [parameters.grid]
    n = {range = [4]}
"""


def workers_of(work_root: Path) -> list[psutil.Process]:
    """Live workers (their process group leaders) whose work dir lies under `work_root`, whoever their parent is."""
    found = []
    for proc in psutil.process_iter():
        try:
            if (os.getpgid(proc.pid) == proc.pid
                    and proc.environ().get("TICKETFARM_WORKDIR", "").startswith(str(work_root))):
                found.append(proc)
        except (psutil.Error, ProcessLookupError):
            continue
    return found


def watchdog_of(slave: SlaveProcess) -> psutil.Process | None:
    for child in psutil.Process(slave.proc.pid).children():
        try:
            if "slave.watchdog" in " ".join(child.cmdline()):
                return child
        except psutil.Error:  # a killed watchdog, a zombie until its slave waits for it
            continue
    return None


def gone_within(procs: list[psutil.Process], seconds: float) -> None:
    _, alive = psutil.wait_procs(procs, timeout=seconds)
    assert not alive, f"still alive after {seconds}s: {alive}"


def running_ticking(master, start_slave, tmp_path: Path, name: str) -> tuple[SlaveProcess, list[psutil.Process]]:
    slave = start_slave(name, 2)
    master.submit(write_spec(tmp_path, TICKING_SPEC))
    procs = wait_for(lambda: len(w := workers_of(slave.work_root)) >= 2 and w, 15, "two workers ticking")
    wait_for(lambda: len(list(slave.work_root.glob("ticking/*/ticks"))) == 2, 10, "both work dirs written")
    return slave, procs


def test_slave_sigkilled_its_workers_die_within_seconds(master, start_slave, tmp_path: Path) -> None:
    slave, procs = running_ticking(master, start_slave, tmp_path, "doomed")
    slave.proc.send_signal(signal.SIGKILL)
    slave.proc.wait()
    gone_within(procs, 3)
    assert not list(slave.work_root.glob("ticking/*/ticks")), "the killed workers' work dirs are removed"
    assert not list(slave.work_root.glob(".tf-watchdog-*"))


def test_slave_and_watchdog_sigkilled_a_restarted_slave_kills_what_they_left(master, start_slave,
                                                                             tmp_path: Path) -> None:
    slave, procs = running_ticking(master, start_slave, tmp_path, "twice-doomed")
    try:
        watchdog = watchdog_of(slave)
        wait_for(lambda: sum(len(f.read_text().splitlines()) for f in slave.work_root.glob(".tf-watchdog-*")) == 2,
                 10, "the watchdog to write its list of groups")
        os.kill(watchdog.pid, signal.SIGKILL)
        slave.proc.send_signal(signal.SIGKILL)
        slave.proc.wait()
        time.sleep(0.5)
        assert all(p.is_running() for p in procs), "nothing else kills them: the restart below must"
        stale = list(slave.work_root.glob("ticking/*"))
        assert len(stale) >= 2  # two running (and one prepared, soon after)
        assert master.control("cancel_sweep", sweep="ticking")["ok"]
        start_slave("twice-doomed", 2)  # the same name on the same work root
        gone_within(procs, 5)
        wait_for(lambda: not any(d.exists() for d in stale), 5, "stale work dirs removed")
    finally:
        for proc in procs:
            if proc.is_running():
                os.killpg(proc.pid, signal.SIGKILL)


def test_watchdog_killed_while_its_slave_lives_is_started_again(master, start_slave, tmp_path: Path) -> None:
    slave = start_slave("guarded", 2)
    first = wait_for(lambda: watchdog_of(slave), 10, "the watchdog")
    first.kill()  # a zombie until its slave notices (at its next word to the watchdog) and waits for it
    master.submit(write_spec(tmp_path, TICKING_SPEC))
    procs = wait_for(lambda: len(w := workers_of(slave.work_root)) >= 2 and w, 15, "two workers ticking")
    wait_for(lambda: (w := watchdog_of(slave)) is not None and w.pid != first.pid, 10, "a second watchdog")
    slave.proc.send_signal(signal.SIGKILL)
    slave.proc.wait()
    gone_within(procs, 3)


def test_run_local_sigkilled_its_slaves_and_their_workers_die(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, TICKING_SPEC)
    run = subprocess.Popen([sys.executable, "-m", "ticketfarm", "--state", str(tmp_path / "state"), "run", str(spec),
                            "--local", "2"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    slaves: list[psutil.Process] = []
    try:
        workers = wait_for(lambda: len(w := workers_of(tmp_path / "state" / "work")) >= 2 and w, 20,
                           "both local slaves running a worker")
        slaves += [p for p in psutil.Process(run.pid).children() if "slave" in p.cmdline()]
        assert len(slaves) == 2
        run.kill()
        run.wait()
        gone_within(slaves + workers, 5)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        for proc in slaves:
            if proc.is_running():
                proc.terminate()


ESCAPING_SPEC = """
    name = "{name}"
    command = "{escape}; sleep 300"
    timeout = {timeout}
    max_attempts = 1
    [parameters.grid]
    n = {{range = [2]}}
"""


def escapees(tmp_path: Path, count: int) -> list[psutil.Process]:
    """The processes the workers started in sessions of their own (each wrote its pid to escaped-N)."""
    def found() -> list[psutil.Process] | None:
        files = list(tmp_path.glob("escaped-*"))
        if len(files) < count or not all(f.read_text().strip() for f in files):
            return None
        procs = [psutil.Process(int(f.read_text())) for f in files]
        # `$!` is known before the child has run `setsid`: wait until each is out of the worker's session
        return procs if all(os.getsid(proc.pid) == proc.pid for proc in procs) else None
    return wait_for(found, 15, "the workers to start their escapees, each in a session of its own")


def test_a_worker_child_in_a_session_of_its_own_dies_with_its_sigkilled_slave(master, start_slave,
                                                                               tmp_path: Path) -> None:
    slave = start_slave("escaping", 2)
    master.submit(write_spec(tmp_path, ESCAPING_SPEC.format(
        name="setsid", timeout=600, escape=f"setsid sleep 300 & echo $! > {tmp_path}/escaped-{{n}}")))
    procs = escapees(tmp_path, 2)
    slave.proc.send_signal(signal.SIGKILL)
    slave.proc.wait()
    gone_within(procs, 5)


def test_a_double_forked_worker_child_dies_at_its_tickets_timeout(master, start_slave, tmp_path: Path) -> None:
    start_slave("forking", 2)
    master.submit(write_spec(tmp_path, ESCAPING_SPEC.format(
        name="daemonised", timeout=2, escape=f"(setsid sleep 300 & echo $! > {tmp_path}/escaped-{{n}})")))
    procs = escapees(tmp_path, 2)
    for proc in procs:  # its parent (the subshell) is gone: it is no descendant of the worker any more
        assert proc.ppid() not in {p.pid for p in psutil.Process(os.getpid()).children(recursive=True)}
    status = master.wait_finished("daemonised", timeout=30)
    assert status["failed"] == 2, status
    gone_within(procs, 5)
