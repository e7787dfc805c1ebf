"""DISCONNECT: the slave acts on its `why` field: it exits when a master it was told to follow shuts down, keeps
reconnecting otherwise, and exits with its documented code when the master speaks another protocol version."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import zmq

from slave.daemon import EXIT_PROTOCOL_VERSION
from tests.conftest import HEARTBEAT, MasterProcess, free_port, wait_for
from ticketfarm import messages, protocol
from ticketfarm.protocol import Command


def slave_log(tmp_path: Path, name: str) -> str:
    return (tmp_path / f"slave-{name}.log").read_text()


def test_exit_on_shutdown_slave_exits_when_the_master_stops_and_others_keep_reconnecting(
        master: MasterProcess, start_slave, tmp_path: Path) -> None:
    leaving = start_slave("leaving", 1, "--exit-on-shutdown")
    staying = start_slave("staying", 1)
    wait_for(lambda: master.control("ping")["slaves"] == 2, 15, "both slaves to join")
    master.stop()
    assert master.proc.returncode == 0
    assert leaving.proc.wait(10) == 0
    assert "master_says_goodbye" in slave_log(tmp_path, "leaving")
    wait_for(lambda: "master_ends_session" in slave_log(tmp_path, "staying"), 10, "the staying slave to hear it")
    assert staying.proc.poll() is None, "a slave without --exit-on-shutdown keeps trying to reconnect"
    assert "master_asks_hello" not in slave_log(tmp_path, "staying")


def test_a_slave_drops_hostile_bodies_and_exits_with_its_code_for_another_protocol_version(tmp_path: Path) -> None:
    """A hand-made master sends the slave hostile bodies (it logs them and stays), then DISCONNECT
    why=protocol_version with a reason that never says so: the slave exits with its documented code."""
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = free_port()
    router.bind(f"tcp://127.0.0.1:{port}")
    log = tmp_path / "slave.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "slave", "--master", f"tcp://127.0.0.1:{port}", "--name", "old",
                                 "--work-root", str(tmp_path / "work"), "--heartbeat", str(HEARTBEAT), "--insecure",
                                 "--log-level", "info"], stdout=out, stderr=out)
    hostile = [
        protocol.encode(Command.WELCOME, {"heartbeat_interval": 0.2, "liveness": 5, "epoch": 1,
                                          "policy": {"on_no_work": ["exit"]}}),
        protocol.encode(Command.TICKET, {"sweep": "s", "timeout": 5, "results": {}, "argv": ["true"],
                                         "tickets": [None]}),
        protocol.encode(Command.TICKET, {"sweep": "s", "kind": "python", "timeout": 5, "results": {},
                                         "tickets": [{"ticket": 1, "task": 0, "attempt": 1, "fn": "f", "size": 9}]},
                        [b"short"]),
        protocol.encode(Command.ACK, {"tickets": ["1", None]}),
        [protocol.PROTOCOL, bytes((Command.CANCEL,)), b'{"ticket":' + b"[" * 5000 + b"]" * 5000 + b"}"],
    ]
    try:
        assert router.poll(10_000)
        identity, *frames = router.recv_multipart()
        assert isinstance(messages.decode(frames), messages.Hello)
        for frames in hostile:
            router.send_multipart([identity, *frames])
        wait_for(lambda: log.read_text().count("dropped_message") == len(hostile), 10, "each body to be dropped")
        assert proc.poll() is None and "Traceback" not in log.read_text()
        router.send_multipart([identity, *messages.Disconnect(messages.PROTOCOL_VERSION, "go away").encode()])
        assert proc.wait(10) == EXIT_PROTOCOL_VERSION == 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        router.close()


def test_the_master_says_why_it_refuses_a_hello_of_another_version(master: MasterProcess) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    master.slave_keys().apply(sock)
    sock.connect(master.endpoint)
    try:
        sock.send_multipart(protocol.encode(Command.HELLO, {"protocol": 99, "name": "future"}))
        assert sock.poll(5000)
        answer = messages.decode(sock.recv_multipart())
        assert answer == messages.Disconnect(messages.PROTOCOL_VERSION, answer.reason, reconnect=False)
        assert "99" in answer.reason
    finally:
        sock.close()
