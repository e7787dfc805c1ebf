"""A master that cannot start says why in one line: its state dir in use by another master."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from master.store import Store
from tests.conftest import run_cli, wait_for, write_spec

SPEC = """
    name = "{name}"
    command = "echo {name}-{{n}} >> {log}; sleep {sleep}; echo {{n}}"
    timeout = 60
    [parameters.grid]
    n = {{range = [{count}]}}
"""


def test_second_master_on_a_state_dir_refuses_and_the_first_runs_each_task_once(tmp_path: Path) -> None:
    log = tmp_path / "executions.log"
    a = write_spec(tmp_path, SPEC.format(name="a", log=log, sleep=0.3, count=8), "a.toml")
    b = write_spec(tmp_path, SPEC.format(name="b", log=log, sleep=0, count=8), "b.toml")
    first = subprocess.Popen([sys.executable, "-m", "ticketfarm", "--state", "st", "run", str(a), "--local", "2"],
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock = tmp_path / "st" / "master.lock"
        wait_for(lambda: lock.exists() and len(lock.read_text().split()) == 2, 20, "the first master to bind")
        second = run_cli("--state", "st", "run", str(b), "--local", "2", cwd=tmp_path)
        assert second.returncode == 4
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert "state dir st is in use" in lines[0] and f"pid {first.pid}" in lines[0]
        assert "--state" in lines[0] and "submit" in lines[0]
        assert first.wait(60) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert sorted(log.read_text().split()) == sorted(f"a-{n}" for n in range(8))  # b never ran, a ran once each
    store = Store(tmp_path / "st" / "state.db", readonly=True)
    try:
        assert store.db.execute("SELECT count(*) FROM tickets").fetchone()[0] == 8
    finally:
        store.close()
    again = run_cli("--state", "st", "run", str(b), "--local", "1", cwd=tmp_path)  # the lock went with its master
    assert again.returncode == 0, again.stderr

