"""Running sweeps end to end: every task once, in order, with inputs, outputs, failures, timeouts and collection."""
from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import psutil
import pytest

from master.store import Store
from tests.conftest import free_port, run_cli, wait_for, write_spec
from ticketfarm.client.control import control
from ticketfarm.errors import MasterUnreachable


def read_table(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_200_tasks_over_2_local_slaves_collect_exactly_200_in_order(tmp_path: Path) -> None:
    write_spec(tmp_path, """
        name = "two-hundred"
        command = "echo $(( {n} * {n} ))"
        [parameters.grid]
        n = {range = [200]}
        [results]
        square = "stdout"
        [[collect]]
        mode = "table"
        path = "squares.csv"
        [[collect]]
        mode = "concat"
        path = "squares.txt"
    """)
    result = run_cli("--state", "st", "run", "spec.toml", "--local", "2", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = read_table(tmp_path / "out" / "squares.csv")
    assert [int(r["task"]) for r in rows] == list(range(200))
    assert all(int(r["square"]) == int(r["n"]) ** 2 for r in rows)
    assert (tmp_path / "out" / "squares.txt").read_text().split() == [str(n * n) for n in range(200)]
    assert "local-1" in result.stdout and "local-2" in result.stdout  # per-slave statistics printed
    assert "finished" in result.stdout


def test_running_again_resumes_instead_of_redoing(tmp_path: Path) -> None:
    write_spec(tmp_path, f"""
        name = "once"
        command = "echo {{n}} >> {tmp_path}/runs.log; echo {{n}}"
        [parameters.grid]
        n = {{range = [20]}}
    """)
    first = run_cli("--state", "st", "run", "spec.toml", "--local", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = run_cli("--state", "st", "run", "spec.toml", "--local", "2", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "resuming sweep once (finished)" in second.stderr
    assert sorted(int(x) for x in (tmp_path / "runs.log").read_text().split()) == list(range(20))


def test_inputs_stdin_templates_and_file_results(tmp_path: Path) -> None:
    (tmp_path / "words.txt").write_text("alpha\nbeta\n")
    write_spec(tmp_path, """
        name = "files"
        command = "mkdir -p out && wc -l < words.txt > out/count.txt && cat config.ini > out/cfg.txt && cat > out/stdin.txt && echo {k} > out/extra-{k}.dat"
        [parameters.grid]
        k = ["a", "b"]
        [[inputs]]
        name = "words.txt"
        source = "words.txt"
        [[inputs]]
        name = "config.ini"
        template = "key={k}\\nticket={ticket}\\n"
        [[inputs]]
        name = "stdin"
        template = "from stdin {k}"
        [results]
        count = "file:out/count.txt"
        cfg = "file:out/cfg.txt"
        fed = "file:out/stdin.txt"
        extras = "file:out/*.dat"
        [[collect]]
        mode = "folders"
        path = "per-task"
        [[collect]]
        mode = "blockwise"
        path = "cfg.txt"
        result = "cfg"
        [[collect]]
        mode = "table"
        format = "jsonl"
        path = "t.jsonl"
    """)
    result = run_cli("--state", "st", "run", "spec.toml", "--local", "1", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    folder = tmp_path / "out" / "per-task"
    assert (folder / "0" / "count").read_text().strip() == "2"
    assert (folder / "1" / "fed").read_text() == "from stdin b"
    assert (folder / "1" / "extras" / "out" / "extra-b.dat").read_text() == "b\n"
    assert json.loads((folder / "0" / "params.json").read_text()) == {"k": "a"}
    blocks = (tmp_path / "out" / "cfg.txt").read_text()
    assert blocks.startswith("# task=0 k=a\nkey=a\nticket=")
    assert "# task=1 k=b\nkey=b\n" in blocks
    lines = [json.loads(x) for x in (tmp_path / "out" / "t.jsonl").read_text().splitlines()]
    assert [x["results"]["fed"] for x in lines] == ["from stdin a", "from stdin b"]


def test_nonzero_exit_is_retried_then_failed_with_the_exit_code(tmp_path: Path) -> None:
    write_spec(tmp_path, """
        name = "exits"
        command = "if [ {n} = 3 ]; then echo broken >&2; exit 7; fi; echo ok {n}"
        max_attempts = 2
        [parameters.grid]
        n = {range = [6]}
    """)
    result = run_cli("--state", "st", "run", "spec.toml", "--local", "2", "--out", "out", cwd=tmp_path)
    assert result.returncode == 1
    failed = read_table(tmp_path / "out" / "exits-failed.csv")
    assert [r["n"] for r in failed] == ["3"]
    assert "exit code 7: broken" in failed[0]["reason"] and "after 2 attempts" in failed[0]["reason"]
    done = read_table(tmp_path / "out" / "exits-results.csv")
    assert [r["n"] for r in done] == ["0", "1", "2", "4", "5"]  # the failed task never mixes in
    store = Store(tmp_path / "st" / "state.db", readonly=True)
    attempts = store.attempts_of("exits", 3)
    assert [(a["state"], a["exit_code"]) for a in attempts] == [("failed", 7), ("failed", 7)]


def test_timeout_kills_the_whole_process_tree_retries_then_fails(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    write_spec(tmp_path, f"""
        name = "slow"
        command = "sleep 30 & echo $! > {pids}/child-{{attempt}}; sleep 30"
        timeout = 1
        max_attempts = 2
        [parameters.grid]
        n = [1]
    """)
    started = time.time()
    result = run_cli("--state", "st", "run", "spec.toml", "--local", "1", "--out", "out", cwd=tmp_path)
    assert result.returncode == 1
    assert time.time() - started < 20
    failed = read_table(tmp_path / "out" / "slow-failed.csv")
    assert failed[0]["reason"].startswith("timeout after 1s")
    children = [int(p.read_text()) for p in pids.iterdir()]
    assert len(children) == 2  # retried once
    for pid in children:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_short_local_sweep_ends_quietly_and_status_reads_the_store_without_a_master(tmp_path: Path) -> None:
    write_spec(tmp_path, """
        name = "six"
        command = "echo {n}"
        [parameters.grid]
        n = {range = [6]}
    """)
    # 4 slaves for 6 tiny tasks: some are still starting when the sweep is over, and must not wait for a master
    # that is gone (master_silent, master_unreachable).
    result = run_cli("--state", "st", "run", "spec.toml", "--local", "4", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr and "error" not in result.stderr, result.stderr
    assert len((tmp_path / "out" / "six-results.csv").read_text().splitlines()) == 7
    status = run_cli("--state", "st", "status", cwd=tmp_path)
    assert status.returncode == 0 and status.stderr == ""
    assert status.stdout.splitlines()[2].split()[:4] == ["six", "finished", "6", "6"]


def test_a_client_says_at_once_when_nothing_listens_at_the_master_address(tmp_path: Path) -> None:
    port = free_port()
    with pytest.raises(MasterUnreachable, match="nothing listens"):
        control(f"tcp://127.0.0.1:{port}", "ping", timeout=600)
    status = run_cli("--master", f"tcp://127.0.0.1:{port}", "status", cwd=tmp_path)
    assert status.returncode == 3 and "nothing listens" in status.stderr


def test_status_and_stats_against_a_running_master(master, start_slave, tmp_path: Path) -> None:
    write_spec(tmp_path, """
        name = "watch"
        command = "sleep 0.05; echo {n}"
        [parameters.grid]
        n = {range = [40]}
    """)
    start_slave("s1", 2)
    assert master.submit(tmp_path / "spec.toml") == "submitted"
    master.wait_finished("watch")
    status = run_cli("--state", str(master.state), "status", cwd=tmp_path)
    assert status.returncode == 0 and "watch" in status.stdout and "finished" in status.stdout
    stats = run_cli("--state", str(master.state), "stats", cwd=tmp_path)
    assert "s1" in stats.stdout and "40" in stats.stdout
    collect = run_cli("--state", str(master.state), "collect", "watch", "--out", "o", cwd=tmp_path)
    assert collect.returncode == 0
    assert len(read_table(tmp_path / "o" / "watch-results.csv")) == 40


def test_first_master_start_writes_default_config_and_exits(tmp_path: Path) -> None:
    result = run_cli("--state", "fresh", "master", cwd=tmp_path)
    assert result.returncode == 2
    assert "review" in result.stderr
    text = (tmp_path / "fresh" / "master.toml").read_text()
    assert "heartbeat_interval = 1.0" in text and "# Seconds between heartbeats" in text


def test_slave_workdirs_are_per_ticket_and_removed_after_ack(master, start_slave, tmp_path: Path) -> None:
    write_spec(tmp_path, """
        name = "wd"
        command = "pwd"
        [parameters.grid]
        n = {range = [5]}
    """)
    slave = start_slave("w1", 1)
    master.submit(tmp_path / "spec.toml")
    master.wait_finished("wd")
    store = Store(master.state / "state.db", readonly=True)
    dirs = [store.outputs("wd", i)["stdout"].data.decode().strip() for i in range(5)]
    assert len(set(dirs)) == 5
    assert all(d.startswith(str(slave.work_root / "wd")) for d in dirs)
    wait_for(lambda: not any(os.path.exists(d) for d in dirs), 5, "work dirs removed after ACK")


def test_running_ticket_streams_stdout_and_stderr_progress(master, start_slave, tmp_path: Path) -> None:
    write_spec(tmp_path, """
        name = "chatty"
        command = "echo to-stdout; echo to-stderr >&2; sleep 3"
        [parameters.grid]
        n = [1]
    """)
    start_slave("talker", 1)
    master.submit(tmp_path / "spec.toml")
    store = Store(master.state / "state.db", readonly=True)
    ticket = wait_for(lambda: [t.id for t in store.running_tickets()], 10, "a running ticket")[0]

    def output() -> str:
        return master.control("progress", ticket=ticket)["output"]

    wait_for(lambda: "to-stdout" in output() and "to-stderr" in output(), 5, "both streams in the progress view")
