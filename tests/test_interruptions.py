"""Interruptions cost no attempt, a resumed slave runs nothing the master gave away, a refusal that cannot
change is not retried."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from master.store import Store
from tests.conftest import write_spec

LOGGING = """
    name = "{name}"
    command = "echo start {{n}} >> {log}; sleep {sleep}; echo end {{n}} >> {log}; echo {{n}}"
    timeout = 30
    max_attempts = {attempts}
    [parameters.grid]
    n = {{range = [{count}]}}
"""


def one_attempt_spec(tmp_path: Path, name: str, count: int, sleep: float, attempts: int = 1) -> tuple[Path, Path]:
    """A sweep whose tasks log their start and end, with a single attempt each unless told otherwise."""
    log = tmp_path / f"{name}.log"
    return write_spec(tmp_path, LOGGING.format(name=name, log=log, sleep=sleep, count=count, attempts=attempts),
                      f"{name}.toml"), log


def task_states(state: Path, name: str) -> Counter[str]:
    store = Store(state / "state.db", readonly=True)
    try:
        return Counter(s for (s,) in store.db.execute("SELECT state FROM tasks WHERE sweep = ?", (name,)))
    finally:
        store.close()


def lines(log: Path, word: str) -> Counter[str]:
    return Counter(line.split()[1] for line in log.read_text().splitlines() if line.startswith(word))


def test_result_refused_for_an_unsafe_path_is_not_retried(master, start_slave, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, """
        name = "unsafe"
        command = "ln -s /etc/passwd out.txt"
        max_attempts = 3
        [parameters.grid]
        n = {range = [2]}
        [results]
        out = "file:out.txt"
    """)
    start_slave("careful", 2)
    master.submit(spec)
    status = master.wait_finished("unsafe", timeout=30)
    assert status["failed"] == 2, status
    store = Store(master.state / "state.db", readonly=True)
    try:
        assert store.db.execute("SELECT count(*) FROM tickets WHERE sweep = 'unsafe'").fetchone()[0] == 2
        reasons = [r for (r,) in store.db.execute("SELECT reason FROM tasks WHERE sweep = 'unsafe'")]
        assert all("result refused" in r and "not retried" in r for r in reasons), reasons
    finally:
        store.close()
