"""A slave whose work disk is full (a real 1 MiB tmpfs): its workers fail and are retried, the slave lives, no
result it was acknowledged for is lost, and a result whose manifest cannot be written is still delivered."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import psutil
import pytest

from master.store import Store
from tests.conftest import wait_for, write_spec


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 1 MiB tmpfs at tmp_path/small (root only), unmounted at the end whatever happened, once every process
    naming it is gone (ask for it before the slaves: it is torn down after them)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    disk = tmp_path / "small"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield disk
    wait_for(lambda: not naming(disk), 20, "the watchdogs to end")
    subprocess.run(["umount", "-l", str(disk)], check=True)


def naming(disk: Path) -> list[int]:
    """Processes whose command line names a path on the disk (a watchdog names its state file there)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if str(disk) in " ".join(proc.cmdline()):
                found.append(proc.pid)
        except psutil.Error:
            continue  # gone meanwhile
    return found


def fill(disk: Path) -> Path:
    """Fill the disk to the last byte with one file; returns it (delete it to free the disk)."""
    filler = disk / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
    with pytest.raises(OSError):  # ENOSPC: nothing more fits
        (disk / "probe").write_bytes(b"x" * 8192)
    return filler


def watchdog_of(pid: int) -> list[int]:
    found = []
    for child in psutil.Process(pid).children():
        try:
            if "slave.watchdog" in " ".join(child.cmdline()):
                found.append(child.pid)
        except psutil.Error:
            continue  # a worker that just ended
    return found


def tickets(state: Path, sweep: str) -> list[tuple[int, str, str]]:
    store = Store(state / "state.db", readonly=True)
    try:
        return store.db.execute("SELECT task, state, coalesce(reason, '') FROM tickets WHERE sweep = ?",
                                (sweep,)).fetchall()
    finally:
        store.close()


def results(state: Path, sweep: str) -> dict[int, bytes]:
    store = Store(state / "state.db", readonly=True)
    try:
        return dict(store.db.execute("SELECT task, data FROM results WHERE sweep = ?", (sweep,)).fetchall())
    finally:
        store.close()


def test_full_work_disk_fails_tickets_that_run_again_once_it_is_freed(small_disk: Path, master, start_slave,
                                                                      tmp_path: Path) -> None:
    filler = fill(small_disk)
    cramped = start_slave("cramped", 2, "--work-root", str(small_disk / "work"))
    master.submit(write_spec(tmp_path, """
        name = "full"
        command = "echo {n} $(( {n} * 7 ))"
        max_attempts = 1000
        [parameters.grid]
        n = {range = [12]}
    """))
    wait_for(lambda: sum(state == "failed" for _, state, _ in tickets(master.state, "full")) >= 6, 30,
             "tickets to fail on the full disk")
    assert cramped.proc.poll() is None, (tmp_path / "slave-cramped.log").read_text()
    assert watchdog_of(cramped.proc.pid), "the slave's watchdog died of the full disk"
    filler.unlink()
    status = master.wait_finished("full", timeout=60)
    assert status["done"] == 12, status
    assert cramped.proc.poll() is None, "the slave died of its full disk"
    assert results(master.state, "full") == {n: f"{n} {n * 7}\n".encode() for n in range(12)}
    assert sum(state == "done" for _, state, _ in tickets(master.state, "full")) == 12


def test_result_whose_manifest_does_not_fit_is_still_delivered(small_disk: Path, master, start_slave,
                                                               tmp_path: Path) -> None:
    # Each task prints its result, then fills the disk itself: the slave cannot write the result's manifest. The
    # disk is freed when the master's ACK lets the slave remove the work dir.
    cramped = start_slave("cramped", 1, "--work-root", str(small_disk / "work"))
    master.submit(write_spec(tmp_path, """
        name = "filled"
        command = "echo r{n} && { cat /dev/zero > pad 2>/dev/null; true; }"
        max_attempts = 1000
        [parameters.grid]
        n = {range = [4]}
    """))
    status = master.wait_finished("filled", timeout=60)
    assert status["done"] == 4, status
    assert cramped.proc.poll() is None, (tmp_path / "slave-cramped.log").read_text()
    assert results(master.state, "filled") == {n: f"r{n}\n".encode() for n in range(4)}
    assert "manifest_not_saved" in (tmp_path / "slave-cramped.log").read_text()
