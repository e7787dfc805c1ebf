"""Security: CURVE on the wire, authorised and revoked keys, roles, hostile frames (fuzzed), forged results,
path traversal, shell quoting, and the HTTP API's tokens and TLS."""
from __future__ import annotations

import json
import os
import selectors
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from master.store import Store
from tests.conftest import (
    HEARTBEAT,
    MasterProcess,
    free_port,
    run_cli,
    slave_key_args,
    wait_for,
    write_spec,
)
from ticketfarm import keys, protocol
from ticketfarm.client.control import control
from ticketfarm.errors import MasterUnreachable
from ticketfarm.protocol import Command

ECHO_SPEC = """
    name = "{name}"
    command = "echo out-{{n}}"
    timeout = 30
    max_attempts = 5
    [parameters.grid]
    n = {{range = [{count}]}}
"""


def echo_spec(tmp_path: Path, name: str, count: int) -> Path:
    return write_spec(tmp_path, ECHO_SPEC.format(name=name, count=count), f"{name}.toml")


def start_slave_process(tmp_path: Path, endpoint: str, name: str, key_args: list[str]) -> subprocess.Popen[bytes]:
    log = open(tmp_path / f"slave-{name}.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "slave", "--master", endpoint, "--name", name, "--slots", "1",
                             "--work-root", str(tmp_path / "work" / name), "--heartbeat", str(HEARTBEAT),
                             "--log-level", "info", *key_args], stdout=log, stderr=log)
    log.close()
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def dealer(endpoint: str, creds: keys.ClientKeys | None) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if creds is not None:
        creds.apply(sock)
    sock.connect(endpoint)
    return sock


def answer(sock: zmq.Socket, timeout: float = 3.0, skip: tuple[Command, ...] = (Command.HEARTBEAT,)) -> protocol.Message:
    deadline = time.time() + timeout
    while sock.poll(max(1, int((deadline - time.time()) * 1000))):
        msg = protocol.decode(sock.recv_multipart())
        if msg.command not in skip:
            return msg
    raise AssertionError("no answer")


def stored_outputs(state: Path, sweep: str) -> dict[int, bytes]:
    store = Store(state / "state.db", readonly=True)
    try:
        return {idx: store.outputs(sweep, idx)["stdout"].data for idx, _ in store.done_tasks(sweep)}
    finally:
        store.close()


def assert_all_correct(state: Path, sweep: str, count: int) -> None:
    assert stored_outputs(state, sweep) == {n: f"out-{n}\n".encode() for n in range(count)}


# -- keys and roles ------------------------------------------------------------------------------
def test_init_writes_keys_0600_and_run_local_uses_curve(tmp_path: Path) -> None:
    state = tmp_path / "st"
    r = run_cli("--state", str(state), "init", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    files = sorted(p for p in (state / "keys").rglob("*") if p.is_file())
    assert {p.name for p in files} >= {"master.key", "master.key_secret", "client.key", "client.key_secret",
                                       "slave.key", "slave.key_secret"}
    for p in [*files, *(state / "authorized").rglob("*.key")]:
        assert p.stat().st_mode & 0o777 == 0o600, p
    assert "insecure = false" in (state / "master.toml").read_text()
    spec = echo_spec(tmp_path, "local-curve", 4)
    r = run_cli("--state", str(state), "--log-level", "info", "run", str(spec), "--local", "2",
                "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "peer_authenticated" in r.stderr and "insecure_transport" not in r.stderr
    assert_all_correct(state, "local-curve", 4)


def test_unknown_key_cannot_connect_nor_get_a_ticket(master: MasterProcess, tmp_path: Path) -> None:
    _, rogue_secret = keys.write_keypair(tmp_path / "rogue", "rogue")
    rogue = start_slave_process(tmp_path, master.endpoint, "rogue",
                                ["--master-key", str(master.state / "keys" / "master.key"),
                                 "--secret-key", str(rogue_secret)])
    try:
        master.submit(echo_spec(tmp_path, "no-rogue", 3))
        wait_for(lambda: "key not authorised" in master.log.read_text(), 10, "the refusal to be logged")
        time.sleep(1.0)
        status = master.sweep_status("no-rogue")
        assert status is not None and status["done"] == 0 and status["running"] == 0
        assert not (tmp_path / "work" / "rogue" / "no-rogue").exists()
        refusal = next(line for line in master.log.read_text().splitlines() if "key not authorised" in line)
        assert "address=127.0.0.1" in refusal and "peer_refused" in refusal
        # plain TCP, or CURVE with the wrong master key, gets no answer either
        with pytest.raises(MasterUnreachable):
            control(master.endpoint, "ping", timeout=0.5)
        impostor = keys.ClientKeys(zmq.curve_keypair()[0], *keys.load_keypair(master.state / "keys/client.key_secret"))
        with pytest.raises(MasterUnreachable):
            control(master.endpoint, "ping", timeout=0.5, keys=impostor)
    finally:
        stop(rogue)
    assert master.alive()


def test_roles_slave_key_cannot_submit_and_client_key_cannot_be_a_slave(master: MasterProcess, tmp_path: Path) -> None:
    as_slave = dealer(master.endpoint, master.slave_keys())
    as_client = dealer(master.endpoint, master.keys)
    try:
        spec = protocol.encode(Command.CONTROL, {"op": "submit", "rid": 7,
                                                 "sweep": "{}"})
        as_slave.send_multipart(spec)
        reply = answer(as_slave)
        assert reply.command == Command.REPLY and reply.header["code"] == "forbidden" and reply.header["rid"] == 7
        as_slave.send_multipart(protocol.encode(Command.CONTROL, {"op": "py_add", "sweep": "x"}))
        assert answer(as_slave).header["code"] == "forbidden"
        as_client.send_multipart(protocol.encode(Command.HELLO, {"protocol": 1, "name": "sneaky", "slots": 1}))
        reply = answer(as_client)
        assert reply.command == Command.DISCONNECT and reply.header["reconnect"] is False
    finally:
        as_slave.close()
        as_client.close()
    wait_for(lambda: "control_refused" in (log := master.log.read_text()) and "not a slave key" in log, 5,
             "both refusals to be logged")


def test_revoked_key_is_dropped_without_restart_and_a_new_key_works(master: MasterProcess, start_slave,
                                                                    tmp_path: Path) -> None:
    keys.add_slave(master.state, "h9")
    # a per-host key only registers under its own name
    impostor = dealer(master.endpoint, master.slave_keys("h9"))
    impostor.send_multipart(protocol.encode(Command.HELLO, {"protocol": 1, "name": "other", "slots": 1}))
    assert answer(impostor).command == Command.DISCONNECT
    impostor.close()
    start_slave("h9", 1, *slave_key_args(master.state, name="h9"))
    wait_for(lambda: master.control("ping")["slaves"] == 1, 10, "h9 to join")
    pid = master.proc.pid
    assert keys.revoke(master.state, keys.SLAVE, "h9")
    wait_for(lambda: "slave_revoked" in master.log.read_text(), 10, "the revocation")
    wait_for(lambda: master.control("ping")["slaves"] == 0, 5, "h9 to be dropped")
    master.submit(echo_spec(tmp_path, "after-revoke", 3))
    time.sleep(1.5)
    assert master.sweep_status("after-revoke")["done"] == 0  # the revoked slave gets nothing
    # rotation: a fresh key for h9, authorised while the master runs
    (master.state / "keys" / "slaves" / "h9.key_secret").unlink()
    keys.add_slave(master.state, "h9")
    start_slave("h9", 1, *slave_key_args(master.state, name="h9"))
    master.wait_finished("after-revoke", timeout=30)
    assert_all_correct(master.state, "after-revoke", 3)
    assert master.proc.pid == pid and master.proc.poll() is None


# -- the wire ------------------------------------------------------------------------------------
class Relay:
    """A TCP relay on loopback that forwards to `target_port` and records every byte in both directions."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.captured = bytearray()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        peers: dict[socket.socket, socket.socket] = {}
        while not self.stopping:
            for key, _ in sel.select(0.1):
                sock = key.fileobj
                if sock is self.listener:
                    inner, _ = self.listener.accept()
                    outer = socket.create_connection(self.target)
                    peers[inner], peers[outer] = outer, inner
                    sel.register(inner, selectors.EVENT_READ)
                    sel.register(outer, selectors.EVENT_READ)
                    continue
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                other = peers.get(sock)
                if not data or other is None:
                    for s in (sock, other):
                        if s is not None and s in peers:
                            sel.unregister(s)
                            peers.pop(s)
                            s.close()
                    continue
                self.captured += data
                other.sendall(data)
        for s in peers:
            s.close()
        self.listener.close()

    def close(self) -> None:
        self.stopping = True
        self.thread.join(5)


@pytest.mark.parametrize("insecure", [False, True], ids=["curve", "insecure"])
def test_traffic_on_the_wire_is_not_plaintext(tmp_path: Path, insecure: bool) -> None:
    secret_value = "Sesame-7d1c9e-open"
    port = free_port()
    master = MasterProcess(tmp_path / "state", f"tcp://127.0.0.1:{port}", insecure=insecure).start()
    relay = Relay(port)
    slave = start_slave_process(tmp_path, f"tcp://127.0.0.1:{relay.port}", "wired",
                                slave_key_args(master.state, insecure))
    try:
        spec = write_spec(tmp_path, f"""
            name = "wire"
            command = "echo {{word}}-{{n}}"
            timeout = 30
            [parameters.grid]
            word = ["{secret_value}"]
            n = {{range = [3]}}
        """)
        master.submit(spec)
        master.wait_finished("wire", timeout=30)
    finally:
        stop(slave)
        relay.close()
        master.stop()
    captured = bytes(relay.captured)
    assert len(captured) > 500  # the sweep really went through the relay
    if insecure:
        assert secret_value.encode() in captured and protocol.PROTOCOL in captured
        assert "insecure_transport" in master.log.read_text()
    else:
        assert secret_value.encode() not in captured and protocol.PROTOCOL not in captured
        assert b"CURVE" in captured  # the ZMTP greeting names the mechanism


# -- hostile input -------------------------------------------------------------------------------
FIELDS = ["protocol", "name", "slots", "ticket", "outputs", "credit", "op", "sweep", "tickets", "exit_code",
          "reason", "offset", "length", "hash", "running", "held", "waiting", "stream", "task", "rid", "elapsed"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)
headers = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), json_values, max_size=6)
outputs = st.lists(st.fixed_dictionaries({"name": st.sampled_from(["stdout", "../x", "/etc/passwd", "stdout/../..",
                                                                   "stdout/a", "", "stdout\x00"]),
                                          "size": st.integers(-5, 10**12), "inline": st.booleans()}), max_size=3)
structured = st.builds(
    lambda cmd, header, payload: protocol.encode(cmd, header, payload),
    st.sampled_from([c for c in Command if c != Command.CONTROL]),
    headers | st.fixed_dictionaries({"ticket": st.integers(0, 2**40), "outputs": outputs}),
    st.lists(st.binary(max_size=64), max_size=3))
raw = st.lists(st.binary(max_size=40), min_size=1, max_size=5)
tagged = st.builds(lambda cmd, body, rest: [protocol.PROTOCOL, cmd, body, *rest],
                   st.binary(min_size=0, max_size=3), st.binary(max_size=60), st.lists(st.binary(max_size=20), max_size=2))
messages = st.lists(structured | raw | tagged, min_size=1, max_size=10)


def test_fuzzed_frames_never_crash_the_master_and_every_result_is_right(master: MasterProcess, start_slave,
                                                                         tmp_path: Path) -> None:
    start_slave("steady", 2)
    count = 150
    master.submit(echo_spec(tmp_path, "fuzz-victim-7f3a", count))
    fuzzer = dealer(master.endpoint, master.slave_keys())
    fuzzer.setsockopt(zmq.SNDHWM, 0)
    client = dealer(master.endpoint, master.keys)
    fuzzer.send_multipart(protocol.encode(Command.HELLO, {"protocol": 1, "name": "fuzzer", "slots": 1}))
    sent = [0]

    @settings(max_examples=400, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(messages, st.lists(headers, max_size=2))
    def blast(batch: list[list[bytes]], controls: list[dict]) -> None:
        for frames in batch:
            fuzzer.send_multipart(frames)
        for header in controls:  # random control ops over the client key (names never match the sweep)
            client.send_multipart(protocol.encode(Command.CONTROL, {k: v for k, v in header.items()
                                                                   if k not in ("sweep", "slave")}))
        sent[0] += len(batch) + len(controls)
        while fuzzer.poll(0):
            fuzzer.recv_multipart()
        while client.poll(0):
            client.recv_multipart()

    try:
        blast()
        # an oversized message: ZeroMQ drops it (max_message_size) and the connection with it
        big = dealer(master.endpoint, master.slave_keys())
        big.send_multipart(protocol.encode(Command.HEARTBEAT, {}, [b"x" * (9 * 1024 * 1024)]))
        time.sleep(0.5)
        big.close()
        assert master.proc.poll() is None
        client.send_multipart(protocol.encode(Command.CONTROL, {"op": "ping", "rid": "last"}))
        while answer(client, 30).header.get("rid") != "last":  # the master has handled everything sent
            pass
    finally:
        fuzzer.close()
        client.close()
    print(f"fuzz: {sent[0]} hostile messages sent")
    assert sent[0] >= 1000, sent
    master.wait_finished("fuzz-victim-7f3a", timeout=60)
    assert master.alive() and master.proc.poll() is None
    assert_all_correct(master.state, "fuzz-victim-7f3a", count)
    assert "dropped_message" in master.log.read_text()


def _take_a_ticket(master: MasterProcess, name: str) -> tuple[zmq.Socket, protocol.Message]:
    """A hand-made slave that says HELLO, asks for one ticket and gets it."""
    sock = dealer(master.endpoint, master.slave_keys())
    sock.send_multipart(protocol.encode(Command.HELLO, {"protocol": 1, "name": name, "slots": 1}))
    assert answer(sock).command == Command.WELCOME
    sock.send_multipart(protocol.encode(Command.REQUEST, {"credit": 1}))
    ticket = answer(sock, 10)
    assert ticket.command == Command.TICKET
    return sock, ticket


def _result(tid: int, data: bytes, name: str = "stdout", inline: bool = True) -> list[bytes]:
    entry = {"ticket": tid, "exit_code": 0, "elapsed": 0.1,
             "outputs": [{"name": name, "size": len(data), "inline": inline}]}
    return protocol.encode(Command.RESULT, {"results": [entry]}, [data if inline else b""])


def _sync(sock: zmq.Socket) -> None:
    """Everything sent on `sock` before has been handled once the master answers this ping."""
    sock.send_multipart(protocol.encode(Command.CONTROL, {"op": "ping", "rid": "sync"}))
    answer(sock, 10, skip=(Command.HEARTBEAT, Command.ACK, Command.FETCH, Command.CANCEL))


def test_forged_replayed_and_traversing_results_are_refused(master: MasterProcess, start_slave,
                                                             tmp_path: Path) -> None:
    master.submit(echo_spec(tmp_path, "forgery", 2))
    hand, ticket = _take_a_ticket(master, "hand")
    tid, task = ticket.header["tickets"][0]["ticket"], ticket.header["tickets"][0]["task"]
    evil = [
        _result(tid, b"x", "../../../../tmp/evil"),
        _result(tid, b"x", "/etc/passwd"),
        _result(tid, b"x", "stdout/../../evil"),
        _result(tid, b"x", "stdout/./a"),
        _result(tid, b"x", "stdout\\..\\evil"),
        _result(tid, b"x" * 10, "..", inline=False),
        _result(tid, b"x", "stdout/", inline=False),
        _result(tid + 1000, b"forged"),  # a ticket id this slave does not hold
    ]
    for frames in evil:
        hand.send_multipart(frames)
    _sync(hand)
    assert master.sweep_status("forgery")["done"] == 0
    assert not list(master.state.rglob("evil")) and not Path("/tmp/evil").exists()
    hand.send_multipart(_result(tid, f"out-{task}\n".encode()))  # the honest answer is taken
    start_slave("honest", 1)
    master.wait_finished("forgery", timeout=30)
    before = stored_outputs(master.state, "forgery")
    assert before == {0: b"out-0\n", 1: b"out-1\n"}
    store = Store(master.state / "state.db", readonly=True)
    tickets = store.db.execute("SELECT id, slave FROM tickets WHERE sweep = 'forgery' AND state = 'done'").fetchall()
    store.close()
    # A hand-made slave sends no heartbeats: it may have been declared dead while the sweep finished, so it says
    # HELLO again, as a restarted slave would, before it replays.
    hand.send_multipart(protocol.encode(Command.HELLO, {"protocol": 1, "name": "hand", "slots": 1}))
    while answer(hand, 10, skip=()).command != Command.WELCOME:
        pass
    # replay: the same results again, from the slave that held them and from another one
    intruder = dealer(master.endpoint, master.slave_keys())
    intruder.send_multipart(protocol.encode(Command.HELLO, {"protocol": 1, "name": "intruder", "slots": 1}))
    for t, _ in tickets:
        hand.send_multipart(_result(t, b"replayed"))
        intruder.send_multipart(_result(t, b"foreign"))
        intruder.send_multipart(protocol.encode(Command.FAILURE, {"ticket": t, "exit_code": 1, "reason": "x"}))
    _sync(hand)
    _sync(intruder)
    hand.close()
    intruder.close()
    assert stored_outputs(master.state, "forgery") == before
    assert master.sweep_status("forgery")["failed"] == 0
    # the master's log is written by another process: wait for the lines rather than race them
    wanted = ("unsafe output name", "foreign_ticket", "duplicate_result")
    try:
        wait_for(lambda: all(w in master.log.read_text() for w in wanted), 10, f"{wanted} in the master log")
    except AssertionError:
        log = master.log.read_text()
        raise AssertionError(f"missing {[w for w in wanted if w not in log]} in the master log:\n{log[-4000:]}") from None
    assert master.alive()


def test_result_files_escaping_the_work_dir_are_refused_by_the_slave(master: MasterProcess, start_slave,
                                                                    tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("secret outside the work dir\n")
    spec = write_spec(tmp_path, f"""
        name = "escape"
        command = "ln -s {outside} link.txt; mkdir -p d; ln -s {tmp_path} d/up; echo ok > fine.txt"
        timeout = 30
        max_attempts = 1
        [parameters.grid]
        kind = ["link", "dirlink", "param"]
        [results]
        out = "file:{{kind}}.txt"
        all = "file:d/**/*.txt"
    """)
    slave = start_slave("careful", 1)
    master.submit(spec)
    status = wait_for(lambda: (s := master.sweep_status("escape")) and s["state"] == "finished" and s, 30,
                      "the sweep to end")
    assert status["done"] == 0 and status["failed"] == 3
    assert slave.proc.poll() is None  # the slave survived every one
    store = Store(master.state / "state.db", readonly=True)
    reasons = [r[0] for r in store.db.execute("SELECT reason FROM tasks WHERE sweep = 'escape'")]
    stored = store.db.execute("SELECT count(*) FROM results WHERE sweep = 'escape'").fetchone()[0]
    store.close()
    assert any("leaves the work dir" in r for r in reasons), reasons
    assert stored == 0
    assert not any(p.read_bytes() == outside.read_bytes() for p in master.state.rglob("*") if p.is_file()
                   and p != outside)


def test_shell_syntax_in_a_parameter_reaches_the_worker_as_one_argument(master: MasterProcess, start_slave,
                                                                       tmp_path: Path) -> None:
    home = tmp_path / "fakehome"
    home.mkdir()
    (home / "canary").write_text("alive")
    values = ["x; rm -rf ~", "$(touch pwned)", "`touch pwned`", "a'b\"c", "x && touch pwned", "*", "-n",
              "new\nline", "|| touch pwned", "{n}"]
    (tmp_path / "params.jsonl").write_text("".join(json.dumps({"v": v}) + "\n" for v in values))
    args = 'python3 -c "import sys, json; print(json.dumps(sys.argv[1:]))"'
    spec = write_spec(tmp_path, f"""
        name = "quoting"
        command = '{args} {{v}}'
        timeout = 30
        max_attempts = 1
        env = {{HOME = "{home}"}}
        [parameters]
        jsonl = "params.jsonl"
    """)
    start_slave("quoter", 2)
    master.submit(spec)
    master.wait_finished("quoting", timeout=30)
    got = {idx: json.loads(data) for idx, data in stored_outputs(master.state, "quoting").items()}
    assert got == {i: [v] for i, v in enumerate(values)}
    assert (home / "canary").read_text() == "alive"
    assert not list(tmp_path.rglob("pwned"))


# -- HTTP ------------------------------------------------------------------------------------------
def self_signed(cert: Path, key: Path, host: str = "127.0.0.1") -> None:
    """A self-signed certificate for `host` (cryptography comes with ansible-core)."""
    x509 = pytest.importorskip("cryptography.x509")
    import datetime
    import ipaddress

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), False)
                   .sign(private, hashes.SHA256()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    key.chmod(0o600)


@pytest.fixture(scope="module")
def http_cluster(tmp_path_factory: pytest.TempPathFactory):
    from tests.httpcluster import HttpCluster

    state = tmp_path_factory.mktemp("sec-http") / "state"
    state.mkdir(parents=True)
    self_signed(state / "tls.crt", state / "tls.key")
    c = HttpCluster(state, n=0, extra_config='http_tls_cert = "tls.crt"\nhttp_tls_key = "tls.key"\n',
                    cafile=state / "tls.crt")
    yield c
    c.close()


def _https(cluster, method: str, path: str, token: str | None = None, cafile: Path | None = None) -> int:
    url = cluster.url + path
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    req = urllib.request.Request(url, data=b"{}" if method != "GET" else None, headers=headers, method=method)
    ctx = ssl.create_default_context(cafile=str(cafile or cluster.state / "tls.crt"))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))
    try:
        with opener.open(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_http_every_mutating_route_needs_a_token_over_tls(http_cluster) -> None:
    document = json.loads((Path(__file__).resolve().parent.parent / "docs" / "openapi.json").read_text())
    mutating = [(method.upper(), path) for path, ops in document["paths"].items() for method in ops
                if method in ("post", "put", "patch", "delete")]
    assert len(mutating) >= 5
    for method, path in mutating:
        concrete = path.replace("{sweep}", "s").replace("{task}", "0").replace("{slave}", "s1") \
            .replace("{ticket}", "1").replace("{name}", "stdout")
        for token in (None, "wrong-token"):
            assert _https(http_cluster, method, concrete, token) == 401, (method, path, token)
    assert _https(http_cluster, "GET", "/api/v1/status") == 200
    # plain HTTP on the TLS port gets no API answer
    with pytest.raises(OSError):
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            http_cluster.url.replace("https:", "http:") + "/api/v1/status",
                                                                          timeout=5).read()
    # a client that does not trust the certificate refuses it
    other = http_cluster.state / "other.crt"
    self_signed(other, http_cluster.state / "other.key")
    with pytest.raises(urllib.error.URLError):
        _https(http_cluster, "GET", "/api/v1/status", cafile=other)


def test_keys_survive_hand_edits_of_the_authorised_dir(tmp_path: Path) -> None:
    """The ring ignores junk files and picks up added/removed keys (what the master reloads live)."""
    state = tmp_path / "st"
    keys.init_state_keys(state)
    ring = keys.KeyRing(keys.authorized_dir(state, keys.SLAVE), keys.authorized_dir(state, keys.CLIENT))
    assert len(ring) == 2
    (keys.authorized_dir(state, keys.SLAVE) / "junk.key").write_text("not a key\n")
    public, _ = keys.add_slave(state, "n1")
    assert ring.refresh() and len(ring) == 3
    peer = ring.lookup(keys.load_public(public))
    assert peer is not None and peer.role == keys.SLAVE and peer.may_be_slave("n1") and not peer.may_be_slave("n2")
    keys.revoke(state, keys.SLAVE, "n1")
    assert ring.refresh() and ring.lookup(keys.load_public(public)) is None
    assert not ring.refresh()  # nothing changed: nothing reloaded
    # init again keeps a revoked shared key revoked
    keys.revoke(state, keys.SLAVE, "slave")
    keys.init_state_keys(state)
    assert not (keys.authorized_dir(state, keys.SLAVE) / "slave.key").exists()
    assert os.stat(keys.keys_dir(state) / "master.key_secret").st_mode & 0o777 == 0o600


def test_oversized_parameters_are_refused_with_a_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ticketfarm import spec as spec_module
    from ticketfarm.errors import ConfigError

    def parse(text: str) -> None:
        spec_module.parse_spec(tomllib.loads(text), tmp_path, "s.toml")

    with pytest.raises(ConfigError, match="over the limit"):
        parse('name = "huge"\ncommand = "true"\n[parameters.grid]\nx = {range = [1000000]}\ny = {range = [1000]}\n')
    with pytest.raises(ConfigError, match="range"):
        parse('name = "zero"\ncommand = "true"\n[parameters.grid]\nx = {range = [0, 10, 0]}\n')
    (tmp_path / "p.csv").write_text("x\n" + "1\n" * 100)
    monkeypatch.setattr(spec_module, "MAX_PARAMETER_FILE", 100)
    with pytest.raises(ConfigError, match="p.csv is 202 bytes"):
        parse('name = "file"\ncommand = "true"\n[parameters]\ncsv = "p.csv"\n')


def test_a_sweep_too_large_for_one_message_is_refused_by_the_client(tmp_path: Path) -> None:
    master = MasterProcess(tmp_path / "state", f"tcp://127.0.0.1:{free_port()}",
                           extra_config="max_message_size = 65536\n").start()
    try:
        (tmp_path / "p.jsonl").write_text("".join(json.dumps({"v": "x" * 100}) + "\n" for _ in range(1000)))
        spec = write_spec(tmp_path, 'name = "big"\ncommand = "echo {v}"\n[parameters]\njsonl = "p.jsonl"\n')
        r = run_cli("--state", str(master.state), "submit", str(spec), cwd=tmp_path, timeout=30)
        assert r.returncode == 2 and "max_message_size" in r.stderr, r.stderr
        assert master.alive()
    finally:
        master.stop()


def test_hostile_bodies_are_dropped_by_a_real_master_without_a_traceback(master: MasterProcess) -> None:
    """Issue 11's crashes: a deeply nested header (RecursionError) and HELLO `running: ["a", null]` (ValueError)
    reached handlers; now each hostile body ends in `dropped_message`, and the master stays up."""
    hostile = [
        [protocol.PROTOCOL, bytes((Command.HEARTBEAT,)), b'{"a":' * 100_000 + b"1" + b"}" * 100_000],
        [protocol.PROTOCOL, bytes((Command.CONTROL,)), b'{"op":"status","x":' + b"[" * 50 + b"]" * 50 + b"}"],
        protocol.encode(Command.HELLO, {"protocol": 1, "name": "evil", "slots": 1, "running": ["a", None]}),
        protocol.encode(Command.HELLO, {"protocol": 1, "name": "evil", "slots": 1, "held": [-1]}),
        protocol.encode(Command.REQUEST, {"credit": 10**12}),
        protocol.encode(Command.HEARTBEAT, {"waiting": ["x", None]}),
        protocol.encode(Command.ACK, {"tickets": list(range(100_001))}),
        protocol.encode(Command.RESULT, {"results": [{"ticket": 1, "outputs": [{"name": "o", "size": 3,
                                                                                "inline": True}]}]}),
        protocol.encode(Command.RESULT, {"results": [{"ticket": 1, "outputs": [{"name": "o", "size": 3,
                                                                                "inline": True}]}]}, [b"ab"]),
        protocol.encode(Command.RESULT, {"results": []}, [b"", b"extra"]),
        protocol.encode(Command.RESULT, {"results": [{"ticket": 1, "outputs": [{"name": "o", "size": -5}]}]}, [b""]),
        protocol.encode(Command.CHUNK, {"ticket": 1, "name": "o", "offset": 0}),
        protocol.encode(Command.FAILURE, {"ticket": "1", "reason": "x"}),
        protocol.encode(Command.CONTROL, {"op": "py_add", "sweep": "p", "first": 0, "fns": ["f"], "functions": [],
                                          "sizes": [10**9]}, [b"abc"]),
    ]
    sock = dealer(master.endpoint, master.slave_keys())
    client = dealer(master.endpoint, master.keys)
    try:
        sock.send_multipart(protocol.encode(Command.HELLO, {"protocol": 1, "name": "hostile", "slots": 1}))
        assert answer(sock).command == Command.WELCOME
        for frames in hostile:
            sock.send_multipart(frames)
        client.send_multipart(protocol.encode(Command.CONTROL, {"op": "py_add", "rid": 1, "sweep": "p", "first": 0,
                                                                "fns": ["f"], "functions": [], "sizes": [5]}, [b"ab"]))
        reply = answer(client, 10)
        assert reply.command == Command.REPLY and reply.header["ok"] is False and "sizes" in reply.header["error"]
        _sync(sock)
    finally:
        sock.close()
        client.close()
    log = master.log.read_text()
    assert log.count("dropped_message") >= len(hostile) - 1, log  # the py_add over a slave key is refused instead
    assert "running[0]" in log and "nested deeper" in log and "'credit'" in log
    assert "Traceback" not in log and "message_handler_failed" not in log, log
    assert master.alive()
