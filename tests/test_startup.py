"""A master that cannot start says why in one line: its state dir in use by another master, an address in use."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from master.store import Store
from tests.conftest import MasterProcess, free_port, run_cli, wait_for, write_spec

SPEC = """
    name = "{name}"
    command = "echo {name}-{{n}} >> {log}; while [ ! -e {gate} ]; do sleep 0.05; done; echo {{n}}"
    timeout = 60
    [parameters.grid]
    n = {{range = [{count}]}}
"""


def test_second_master_on_a_state_dir_refuses_and_the_first_runs_each_task_once(tmp_path: Path) -> None:
    log = tmp_path / "executions.log"
    gate = tmp_path / "gate"  # a's tasks wait for it: the first master runs for as long as the test needs
    a = write_spec(tmp_path, SPEC.format(name="a", log=log, gate=gate, count=8), "a.toml")
    b = write_spec(tmp_path, SPEC.format(name="b", log=log, gate=gate, count=8), "b.toml")
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
        gate.touch()
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


@pytest.mark.parametrize("setting", ["bind", "http_bind"])
def test_address_in_use_is_one_line_naming_it(tmp_path: Path, setting: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        if setting == "bind":
            master = MasterProcess(tmp_path / "state", f"tcp://127.0.0.1:{port}")
            address = f"tcp://127.0.0.1:{port}"
        else:
            master = MasterProcess(tmp_path / "state", f"tcp://127.0.0.1:{free_port()}",
                                   extra_config=f'http_bind = "127.0.0.1:{port}"\n')
            address = f"127.0.0.1:{port}"
        result = run_cli("--state", str(master.state), "master", cwd=tmp_path, timeout=30)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    # http_bind: the HTTP process says it, then the master that started it says that it did not start
    line = next(line for line in result.stderr.splitlines() if f"cannot listen on {address}" in line)
    assert line.endswith(f"cannot listen on {address} ({setting}): Address already in use; another process "
                         "(perhaps another master) listens there: stop it, or choose another port")
