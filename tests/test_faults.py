"""Faults: killed slaves, a killed master, hostile frames — every result still collected exactly once."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import zmq

from master.store import Store
from tests.conftest import HEARTBEAT, LIVENESS, MasterProcess, wait_for, write_spec
from ticketfarm import protocol
from ticketfarm.protocol import Command

SLOW_SPEC = """
    name = "{name}"
    command = "echo {{n}} >> {log}; sleep {sleep}; echo result-{{n}}"
    timeout = 30
    max_attempts = 5
    [parameters.grid]
    n = {{range = [{count}]}}
"""


def slow_spec(tmp_path: Path, name: str, count: int, sleep: float) -> Path:
    return write_spec(tmp_path, SLOW_SPEC.format(name=name, log=tmp_path / "executions.log", sleep=sleep,
                                                 count=count), f"{name}.toml")


def collected_once(state: Path, name: str, count: int) -> None:
    """Every task done exactly once, with its own result."""
    store = Store(state / "state.db", readonly=True)
    try:
        done = list(store.done_tasks(name))
        assert [idx for idx, _ in done] == list(range(count))
        for idx, params in done:
            assert store.outputs(name, idx)["stdout"].data == f"result-{params['n']}\n".encode()
    finally:
        store.close()


def test_slave_killed_mid_ticket_its_tickets_are_reassigned(master, start_slave, tmp_path: Path) -> None:
    victim = start_slave("victim", 2)
    start_slave("survivor", 1)
    spec = slow_spec(tmp_path, "kill-slave", 30, 0.3)
    master.submit(spec)
    # wait until the victim is running something, then kill it without warning
    wait_for(lambda: any(victim.work_root.glob("kill-slave/*/.tf-stdout")), 10, "victim to run a ticket")
    victim.kill()
    master.wait_finished("kill-slave", timeout=60)
    collected_once(master.state, "kill-slave", 30)
    store = Store(master.state / "state.db", readonly=True)
    lost = store.db.execute("SELECT count(*) FROM tickets WHERE slave = 'victim' AND state = 'lost'").fetchone()[0]
    assert lost >= 1
    executions = (tmp_path / "executions.log").read_text().split()
    assert set(executions) == {str(n) for n in range(30)}  # at-least-once execution


def test_master_killed_and_restarted_mid_sweep_completes_exactly_once(master, start_slave, tmp_path: Path) -> None:
    start_slave("a", 2)
    start_slave("b", 2)
    spec = slow_spec(tmp_path, "kill-master", 60, 0.1)
    master.submit(spec)
    wait_for(lambda: (s := master.sweep_status("kill-master")) and s["done"] >= 10, 30, "some progress")
    master.kill()
    time.sleep(HEARTBEAT * 3)  # slaves keep working and keep finished results in their outboxes
    master.start()
    status = master.wait_finished("kill-master", timeout=90)
    assert status["done"] == 60 and status["failed"] == 0
    collected_once(master.state, "kill-master", 60)
    # resubmitting the same spec resumes (nothing redone), it does not start over
    assert master.submit(spec) == "finished"


def test_results_finished_while_master_is_down_are_delivered(tmp_path: Path, start_slave, master) -> None:
    spec = slow_spec(tmp_path, "while-down", 4, 1.5)
    start_slave("keeper", 4)
    master.submit(spec)
    # once the master reports them running, the 4 tickets are committed (control replies follow a commit)
    wait_for(lambda: (s := master.sweep_status("while-down")) and s["running"] == 4, 10, "all 4 running")
    master.kill()
    time.sleep(2.5)  # the workers finish while no master is listening
    master.start()
    master.wait_finished("while-down", timeout=30)
    collected_once(master.state, "while-down", 4)
    assert len((tmp_path / "executions.log").read_text().split()) == 4  # delivered, not re-run


def test_malformed_frames_never_stop_the_master(master, start_slave, tmp_path: Path) -> None:
    start_slave("steady", 2)
    spec = slow_spec(tmp_path, "hostile", 40, 0.02)
    master.submit(spec)
    ctx = zmq.Context.instance()
    attacker = ctx.socket(zmq.DEALER)
    attacker.setsockopt(zmq.LINGER, 0)
    master.slave_keys().apply(attacker)  # the worst case: hostile frames over an authorised key
    attacker.connect(master.endpoint)
    garbage = [
        [b""], [b"junk"], [protocol.PROTOCOL], [protocol.PROTOCOL, b"\x99", b"{}"],
        [protocol.PROTOCOL, b"\x06\x06", b"{}"], [b"TFP9", bytes([Command.HELLO]), b"{}"],
        [protocol.PROTOCOL, bytes([Command.HELLO]), b"not json"],
        [protocol.PROTOCOL, bytes([Command.HELLO]), b"[1,2]"],
        protocol.encode(Command.HELLO, {"protocol": 99, "name": "x", "slots": 1}),
        protocol.encode(Command.HELLO, {"protocol": 1, "name": "", "slots": "many"}),
        protocol.encode(Command.RESULT, {"ticket": 1, "outputs": []}),
        protocol.encode(Command.RESULT, {"results": [{"ticket": 1, "outputs": []}]}),  # no payload frame
        protocol.encode(Command.ACK, {"tickets": [1]}),
        protocol.encode(Command.CONTROL, {"op": "explode"}),
        protocol.encode(Command.CONTROL, {"op": "submit", "sweep": "{broken"}),
    ]
    for _ in range(20):
        for frames in garbage:
            attacker.send_multipart(frames)
    # a "slave" that says hello properly, then sends a result for a ticket it never held
    attacker.send_multipart(protocol.encode(Command.HELLO, {"protocol": 1, "name": "intruder", "slots": 1}))
    attacker.send_multipart(protocol.encode(Command.RESULT, {"results": [{"ticket": (1 << 32) + 1, "outputs": [
        {"name": "stdout", "size": 6, "inline": True}]}]}, [b"forged"]))
    attacker.send_multipart(protocol.encode(Command.RESULT, {"results": [{"ticket": 5, "outputs": [
        {"name": "../../etc/passwd", "size": 1, "inline": True}]}]}, [b"x"]))
    attacker.send_multipart(protocol.encode(Command.RESULT, {"results": [{"ticket": 5, "outputs": [
        {"name": "stdout", "size": 99, "inline": True}]}]}, [b"short"]))  # sizes do not add up
    # one connection keeps order: once the ping is answered, everything above has been handled
    attacker.send_multipart(protocol.encode(Command.CONTROL, {"op": "ping"}))
    while attacker.poll(5000):
        if "epoch" in protocol.decode(attacker.recv_multipart()).header:
            break
    attacker.close()
    master.wait_finished("hostile", timeout=60)
    assert master.alive()
    collected_once(master.state, "hostile", 40)
    log = master.log.read_text()
    assert "dropped_message" in log and "foreign_ticket" in log


def test_slave_reconnects_by_itself_after_master_restart(master, start_slave, tmp_path: Path) -> None:
    start_slave("phoenix", 1)
    wait_for(lambda: "phoenix" in (master.state / "master.log").read_text(), 10, "slave to join")
    master.kill()
    time.sleep(HEARTBEAT * LIVENESS + 0.5)  # the slave presumes the master dead and backs off
    master.start()
    spec = slow_spec(tmp_path, "after-restart", 5, 0.01)
    master.submit(spec)
    master.wait_finished("after-restart", timeout=30)
    store = Store(master.state / "state.db", readonly=True)
    slaves = {r[0] for r in store.db.execute("SELECT DISTINCT slave FROM tickets")}
    assert slaves == {"phoenix"}


def test_sigterm_stops_slave_cleanly_and_its_ticket_is_requeued(master, start_slave, tmp_path: Path) -> None:
    quitter = start_slave("quitter", 1)
    spec = slow_spec(tmp_path, "handover", 3, 1.0)
    master.submit(spec)
    wait_for(lambda: any(quitter.work_root.glob("handover/*/.tf-stdout")), 10, "quitter to start a ticket")
    os.kill(quitter.proc.pid, signal.SIGTERM)
    assert quitter.proc.wait(10) == 0
    start_slave("heir", 1)
    master.wait_finished("handover", timeout=30)
    collected_once(master.state, "handover", 3)


def test_unknown_command_from_known_slave_is_dropped(master: MasterProcess) -> None:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    master.slave_keys().apply(sock)
    sock.connect(master.endpoint)
    sock.send_multipart(protocol.encode(Command.HELLO, {"protocol": 1, "name": "odd", "slots": 1}))
    assert sock.poll(3000)
    assert protocol.decode(sock.recv_multipart()).command == Command.WELCOME
    sock.send_multipart(protocol.encode(Command.TICKET, {"ticket": 1}))  # a master->slave command
    sock.close()
    wait_for(lambda: "is not a command a master accepts" in master.log.read_text(), 5, "refusal logged")
    assert master.alive()
