"""Unit tests of the message codecs: every command round-trips; hostile bodies end in ProtocolError naming the field."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ticketfarm import messages, protocol
from ticketfarm.errors import ProtocolError
from ticketfarm.messages import (
    Ack,
    Cancel,
    Chunk,
    Code,
    CodeRequest,
    Control,
    Disconnect,
    Failure,
    Fetch,
    Heartbeat,
    Hello,
    InputFile,
    NoWork,
    Recall,
    Notify,
    Progress,
    PyAdd,
    PyCall,
    Refused,
    Relay,
    RelayReply,
    Reply,
    Request,
    Result,
    ResultEntry,
    ResultOutput,
    Sandbox,
    SandboxFile,
    SandboxReply,
    Settled,
    SlavePolicy,
    Ticket,
    TicketEntry,
    TicketSweep,
    Welcome,
    Worker,
    WorkerFile,
    WorkerRequest,
)
from ticketfarm.protocol import Command

SHA = "ab" * 32

EXAMPLES = [
    Hello(name="n1", slots=4, platform="linux-x86_64", cpus=8, memory_mb=1024, version="1.0", pid=7,
          running=[1, 2], held=[3]),
    Welcome(0.2, 5, 9, SlavePolicy("exit", True, "exit")),
    Welcome(1.0, 3, 0),
    Request(3),
    Request(0, [5, 6]),
    Ticket(TicketSweep("s", 30.0, {"stdout": "stdout"}, command="echo {n}", env={"A": "1"},
                       inputs=[InputFile("in.txt", frame=0), InputFile("t.txt", template="{n}")],
                       workers={"linux-x86_64": WorkerFile("w", SHA, 10)}, memory=64, cpus=2, frames=[b"lit"]),
           [TicketEntry(5, 0, 1, {"n": 0}), TicketEntry(6, 1, 2, {"n": 1})]),
    Ticket(TicketSweep("s", 5, {"stdout": "stdout"}, argv=["echo", "{n}"]), [TicketEntry(1, 0, 1, {"n": 0})]),
    Ticket(TicketSweep("p", 10.0, {"result": "python"}, kind="python"),
           [TicketEntry(7, 0, 1, fn=SHA, args=b"abc"), TicketEntry(8, 1, 1, fn=SHA, args=b"")]),
    Progress(5, "stderr", b"oops\n"),
    Result([ResultEntry(5, 0, 0.5, [ResultOutput("stdout", 3, b"out"), ResultOutput("big", 10**6)]),
            ResultEntry(6, None, None, [ResultOutput("exit", 2, b"0\n")])]),
    Fetch(5, "big", 0, protocol.CHUNK_SIZE),
    Chunk(5, "big", 262144, b"\x00\xff"),
    Failure(5, 1, "exit code 1: boom", 0.25),
    Failure(6, None, "timeout after 1s"),
    Failure(7, 0, "result refused: 'out' leaves the work dir", 0.1, final=True),
    Failure(8, None, "handed back: the allocation ends in 30s", 0.0, handback=True),
    Ack([1, 2, 3]),
    Heartbeat([1], [2], 0.5, 40.0, 10.5, 1),
    Heartbeat(),
    Cancel(5, "deadline"),
    Recall([5, 6], "sweep paused"),
    Disconnect(messages.SHUTDOWN, "master shutting down"),
    Disconnect(messages.UNKNOWN_PEER, "unknown slave: send HELLO", reconnect=True),
    Control("status", {}, None),
    Control("submit", {"sweep": "{}"}, "r1", [b"x"]),
    Reply(True, {"epoch": 3}, 7, [b"piece"]),
    Sandbox(1, 5, "put", "in/data.bin", data=b"\x00\xff"),
    Sandbox(2, 5, "list"),
    Sandbox(3, 5, "get", "out.txt", 1024, 4096),
    SandboxReply(1, size=2),
    SandboxReply(2, files=[SandboxFile("out.txt", 3, 1.5), SandboxFile("d/e", 0, 2)]),
    SandboxReply(3, offset=1024, size=2000, data=b"x" * 976),
    SandboxReply(4, "no file 'x' in the work dir", "not_found"),
    Relay(4, 5, "http", "POST", "/api/x?y=1", [("Content-Type", "text/plain")], body=b"hi"),
    Relay(5, 5, "ws_open", path="/ws", headers=[("Origin", "http://x")]),
    Relay(5, 5, "ws_send", text=True, body=b"hello"),
    Relay(5, 5, "ws_close"),
    RelayReply(4, "response", 200, [("Content-Type", "text/plain")], body=b"ok"),
    RelayReply(5, "open"),
    RelayReply(5, "message", text=False, body=b"\x00"),
    RelayReply(5, "closed", 1000, error="bye"),
    RelayReply(6, "error", code="bad_gateway", error="connection refused"),
    Reply(False, {"error": "no", "code": "forbidden"}),
    CodeRequest(SHA),
    Code(SHA, b"body"),
    Code(SHA, None, "unknown function"),
    Notify("p", [Settled(0, "done", "result", 3, b"abc"), Settled(1, "done", "result", 10**6),
                 Settled(2, "failed", reason="worker died"), Settled(3, "cancelled")]),
    WorkerRequest(SHA, 0, 1024),
    Worker(SHA, 0, 3, b"abc"),
    Worker(SHA, error="no active sweep ships this worker"),
    Refused("s", "linux-x86_64", "no worker for this platform"),
    NoWork(),
]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(example) -> None:
    frames = example.encode()
    assert frames[0] == protocol.PROTOCOL and frames[1] == bytes((example.COMMAND,))
    assert messages.decode(frames) == example


def test_every_command_has_a_codec_and_an_example() -> None:
    assert set(messages.CODECS) == set(Command)
    assert {type(m).COMMAND for m in EXAMPLES} == set(Command)


def test_py_add_round_trips_through_control() -> None:
    add = PyAdd("p", 10, [PyCall(SHA, b"a1", "f(1)"), PyCall(SHA, b"", "f()")], {SHA: b"body"}, "{}")
    control = messages.decode(add.control(rid=4).encode())
    assert isinstance(control, Control) and control.op == "py_add" and control.rid == 4
    assert PyAdd.from_control(control) == add


def test_other_protocol_version_hello_decodes_to_its_version_only() -> None:
    msg = messages.decode(protocol.encode(Command.HELLO, {"protocol": 99, "name": 5}))
    assert isinstance(msg, Hello) and msg.protocol == 99


def frames(command: Command, header: dict, payload: list[bytes] | None = None) -> list[bytes]:
    return protocol.encode(command, header, payload)


RESULT_OK = {"ticket": 1, "exit_code": 0, "elapsed": 0.1, "outputs": [{"name": "stdout", "size": 2, "inline": True}]}
PY_TICKET = {"sweep": "p", "kind": "python", "timeout": 5, "results": {"result": "python"},
             "tickets": [{"ticket": 1, "task": 0, "attempt": 1, "fn": SHA, "size": 2}]}

HOSTILE = {
    "hello running with null": (frames(Command.HELLO, {"protocol": 1, "name": "a", "slots": 1,
                                                       "running": ["a", None]}), "running[0]"),
    "hello held not a list": (frames(Command.HELLO, {"protocol": 1, "name": "a", "slots": 1, "held": 5}), "held"),
    "hello negative ticket": (frames(Command.HELLO, {"protocol": 1, "name": "a", "slots": 1, "held": [-1]}),
                              "held[0]"),
    "hello no name": (frames(Command.HELLO, {"protocol": 1, "name": "", "slots": 1}), "name"),
    "hello zero slots": (frames(Command.HELLO, {"protocol": 1, "name": "a", "slots": 0}), "slots"),
    "hello slots bool": (frames(Command.HELLO, {"protocol": 1, "name": "a", "slots": True}), "slots"),
    "hello protocol missing": (frames(Command.HELLO, {"name": "a", "slots": 1}), "protocol"),
    "hello with payload": (frames(Command.HELLO, {"protocol": 1, "name": "a", "slots": 1}, [b"x"]), "payload"),
    "request negative credit": (frames(Command.REQUEST, {"credit": -1}), "credit"),
    "request huge credit": (frames(Command.REQUEST, {"credit": 10**9}), "credit"),
    "request credit float": (frames(Command.REQUEST, {"credit": 1.5}), "credit"),
    "ack too many": (frames(Command.ACK, {"tickets": list(range(100_001))}), "tickets"),
    "ack strings": (frames(Command.ACK, {"tickets": ["1"]}), "tickets[0]"),
    "heartbeat waiting nulls": (frames(Command.HEARTBEAT, {"waiting": [None]}), "waiting[0]"),
    "heartbeat load text": (frames(Command.HEARTBEAT, {"load": "high"}), "load"),
    "result no payload": (frames(Command.RESULT, {"results": [RESULT_OK]}), "payload"),
    "result extra payload": (frames(Command.RESULT, {"results": [RESULT_OK]}, [b"ok", b"more"]), "payload"),
    "result sizes disagree": (frames(Command.RESULT, {"results": [RESULT_OK]}, [b"toolong"]), "sizes"),
    "result negative size": (frames(Command.RESULT, {"results": [
        dict(RESULT_OK, outputs=[{"name": "x", "size": -2, "inline": True}])]}, [b""]), "outputs[0]"),
    "result ticket string": (frames(Command.RESULT, {"results": [dict(RESULT_OK, ticket="1")]}, [b"ok"]),
                             "results[0].ticket"),
    "result exit code text": (frames(Command.RESULT, {"results": [dict(RESULT_OK, exit_code="0")]}, [b"ok"]),
                              "exit_code"),
    "result entry not object": (frames(Command.RESULT, {"results": [7]}, [b""]), "results[0]"),
    "result outputs null": (frames(Command.RESULT, {"results": [dict(RESULT_OK, outputs=None)]}, [b""]), "outputs"),
    "failure ticket missing": (frames(Command.FAILURE, {"reason": "x"}), "ticket"),
    "chunk no frame": (frames(Command.CHUNK, {"ticket": 1, "name": "x", "offset": 0}), "payload"),
    "chunk negative offset": (frames(Command.CHUNK, {"ticket": 1, "name": "x", "offset": -5}, [b""]), "offset"),
    "fetch too long": (frames(Command.FETCH, {"ticket": 1, "name": "x", "offset": 0, "length": 10**9}), "length"),
    "progress two frames": (frames(Command.PROGRESS, {"ticket": 1, "stream": "stdout"}, [b"a", b"b"]), "payload"),
    "progress bad stream": (frames(Command.PROGRESS, {"ticket": 1, "stream": "stdin"}, [b"a"]), "stream"),
    "python ticket sizes disagree": (frames(Command.TICKET, PY_TICKET, [b"abc"]), "size"),
    "python ticket no frame": (frames(Command.TICKET, PY_TICKET), "payload"),
    "python ticket extra frame": (frames(Command.TICKET, PY_TICKET, [b"ab", b"cd"]), "payload"),
    "command ticket frame out of range": (frames(Command.TICKET, {
        "sweep": "s", "timeout": 5, "results": {}, "command": "true", "inputs": [{"name": "a", "frame": 1}],
        "tickets": [{"ticket": 1, "task": 0, "attempt": 1, "params": {}}]}, [b"x"]), "inputs[0].frame"),
    "command ticket params list": (frames(Command.TICKET, {
        "sweep": "s", "timeout": 5, "results": {}, "command": "true",
        "tickets": [{"ticket": 1, "task": 0, "attempt": 1, "params": []}]}), "params"),
    "command ticket no command": (frames(Command.TICKET, {
        "sweep": "s", "timeout": 5, "results": {}, "tickets": []}), "command"),
    "ticket negative task": (frames(Command.TICKET, {
        "sweep": "s", "timeout": 5, "results": {}, "argv": ["true"],
        "tickets": [{"ticket": 1, "task": -1, "attempt": 1, "params": {}}]}), "tickets[0]"),
    "ticket env not strings": (frames(Command.TICKET, {
        "sweep": "s", "timeout": 5, "results": {}, "argv": ["true"], "env": {"A": 1}, "tickets": []}), "env.A"),
    "ticket upload escapes": (frames(Command.TICKET, {
        "sweep": "s", "timeout": 5, "results": {}, "argv": ["true"],
        "tickets": [{"ticket": 1, "task": 0, "attempt": 1, "params": {}, "files": [{"name": "../x", "frame": 0}]}]},
        [b"x"]), "tickets[0].files[0].name"),
    "sandbox put absolute": (frames(Command.SANDBOX, {"call": 1, "ticket": 1, "action": "put", "path": "/etc/x"},
                                    [b"x"]), "path"),
    "sandbox get dotdot": (frames(Command.SANDBOX, {"call": 1, "ticket": 1, "action": "get", "path": "a/../../b",
                                                    "offset": 0, "length": 10}, [b""]), "path"),
    "sandbox get too long": (frames(Command.SANDBOX, {"call": 1, "ticket": 1, "action": "get", "path": "a",
                                                      "offset": 0, "length": 10**9}, [b""]), "length"),
    "sandbox unknown action": (frames(Command.SANDBOX, {"call": 1, "ticket": 1, "action": "rm"}, [b""]), "action"),
    "sandbox reply escaping listing": (frames(Command.SANDBOX_REPLY, {"call": 1, "files": [
        {"path": "../etc", "size": 1, "mtime": 0}]}, [b""]), "files[0].path"),
    "relay path without slash": (frames(Command.RELAY, {"call": 1, "ticket": 1, "action": "http", "method": "GET",
                                                        "path": "x", "headers": []}, [b""]), "path"),
    "relay header not a pair": (frames(Command.RELAY, {"call": 1, "ticket": 1, "action": "http", "method": "GET",
                                                       "path": "/", "headers": [["a"]]}, [b""]), "headers[0]"),
    "relay reply bad event": (frames(Command.RELAY_REPLY, {"call": 1, "event": "maybe"}, [b""]), "event"),
    "disconnect without why": (frames(Command.DISCONNECT, {"reason": "bye", "reconnect": False}), "why"),
    "disconnect unknown why": (frames(Command.DISCONNECT, {"why": "whim"}), "why"),
    "disconnect reconnect text": (frames(Command.DISCONNECT, {"why": "shutdown", "reconnect": "no"}), "reconnect"),
    "control op not text": (frames(Command.CONTROL, {"op": ["status"]}), "op"),
    "control rid object": (frames(Command.CONTROL, {"op": "ping", "rid": {"a": 1}}), "rid"),
    "reply ok missing": (frames(Command.REPLY, {"rid": 1}), "ok"),
    "notify sizes disagree": (frames(Command.NOTIFY, {"sweep": "p", "tasks": [
        {"task": 0, "state": "done", "output": "result", "size": 5, "inline": True}]}, [b"abc"]), "sizes"),
    "notify task null": (frames(Command.NOTIFY, {"sweep": "p", "tasks": [None]}, [b""]), "tasks[0]"),
    "code no body": (frames(Command.CODE, {"hash": SHA}), "payload"),
    "code short hash": (frames(Command.CODE_REQUEST, {"hash": "abc"}), "hash"),
    "worker chunk past size": (frames(Command.WORKER, {"sha256": SHA, "offset": 2, "size": 3}, [b"ab"]), "size"),
    "worker request zero length": (frames(Command.WORKER_REQUEST, {"sha256": SHA, "offset": 0, "length": 0}),
                                   "length"),
    "welcome liveness zero": (frames(Command.WELCOME, {"heartbeat_interval": 1, "liveness": 0, "epoch": 1}),
                              "liveness"),
    "welcome bad policy": (frames(Command.WELCOME, {"heartbeat_interval": 1, "liveness": 1, "epoch": 1,
                                                    "policy": {"on_no_work": "dance"}}), "on_no_work"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_bodies_raise_protocol_error_naming_the_field(case: str) -> None:
    raw, field = HOSTILE[case]
    with pytest.raises(ProtocolError) as err:
        messages.decode(raw)
    assert field in str(err.value), str(err.value)
    command = Command(raw[1][0]).name
    assert str(err.value).startswith(command) or "payload" in field, str(err.value)


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


@pytest.mark.parametrize("depth", [33, 1000, 100_000])
def test_deep_nesting_is_refused_before_parsing(depth: int) -> None:
    body = '{"op":"status","x":' + nested(depth) + "}"
    with pytest.raises(ProtocolError, match="nested"):
        protocol.decode([protocol.PROTOCOL, bytes((Command.CONTROL,)), body.encode()])


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    body = json.dumps({"op": "submit", "sweep": "[" * 10_000 + '\\"{' * 50}).encode()
    assert protocol.decode([protocol.PROTOCOL, bytes((Command.CONTROL,)), body]).header["op"] == "submit"
    ok = '{"x":' + nested(protocol.MAX_DEPTH - 1) + "}"
    assert protocol.decode([protocol.PROTOCOL, bytes((Command.CONTROL,)), ok.encode()]).header["x"]
    many = {"op": "x", "quoted": 'a"b\\', "plain": "[{", "other": "}]", "rows": [[{"a": [1]}]] * 40}
    assert protocol.decode([protocol.PROTOCOL, bytes((Command.CONTROL,)), json.dumps(many).encode()]).header == many
    many["plain"] = many["quoted"] = "no escapes"
    assert protocol.decode([protocol.PROTOCOL, bytes((Command.CONTROL,)), json.dumps(many).encode()]).header == many
    deep = dict(many, rows=json.loads(nested(protocol.MAX_DEPTH)))
    with pytest.raises(ProtocolError, match="nested"):
        protocol.decode([protocol.PROTOCOL, bytes((Command.CONTROL,)), json.dumps(deep).encode()])


def test_py_add_sizes_must_match_calls_and_frames() -> None:
    good = PyAdd("p", 0, [PyCall(SHA, b"ab")], {}, "{}").control()
    with pytest.raises(ProtocolError, match="sizes"):
        PyAdd.from_control(Control("py_add", dict(good.fields, sizes=[1]), None, good.payload))
    with pytest.raises(ProtocolError, match="sizes"):
        PyAdd.from_control(Control("py_add", dict(good.fields, sizes=[1, 1]), None, good.payload))
    with pytest.raises(ProtocolError, match="payload"):
        PyAdd.from_control(Control("py_add", good.fields, None, [b"body", *good.payload]))
    with pytest.raises(ProtocolError, match="CONTROL py_add: field 'first'"):
        PyAdd.from_control(Control("py_add", dict(good.fields, first=-1), None, good.payload))


def test_control_args_name_the_op_and_field() -> None:
    control = messages.decode(frames(Command.CONTROL, {"op": "cancel_task", "sweep": "s", "task": "x"}))
    assert control.args().text("sweep") == "s"
    with pytest.raises(ProtocolError, match="CONTROL cancel_task: field 'task'"):
        control.args().count("task")


def documented_rows() -> dict[str, str]:
    """docs/PROTOCOL.md's command table: name -> the row's text, checked against its code."""
    rows = {}
    for line in (Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md").read_text().splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 3 and cells[1].startswith("0x"):
            assert Command[cells[2]] == int(cells[1], 16), line
            rows[cells[2]] = line
    return rows


def test_protocol_doc_lists_every_command_and_every_field_its_codec_writes() -> None:
    rows = documented_rows()
    assert set(rows) == {c.name for c in Command}
    for example in EXAMPLES:
        msg = protocol.decode(example.encode())
        if isinstance(example, (Control, Reply)):
            names = {"op", "ok", "rid"} & set(msg.header)  # the other fields are the op's
        else:
            names = set(msg.header)
            for value in msg.header.values():  # the fields of list entries (tickets, results, tasks) too
                if isinstance(value, list):
                    names.update(k for entry in value if isinstance(entry, dict) for k in entry)
        row = rows[example.COMMAND.name]
        missing = [n for n in sorted(names) if not re.search(rf"\b{n}\b", row)]
        assert not missing, f"{example.COMMAND.name}: {missing} not in docs/PROTOCOL.md"


def test_escapes_before_a_closing_quote_keep_strings_apart() -> None:
    """`\\n` or `\\\\` just before a closing quote: the quote still ends the string (a submit's JSON-lines rows)."""
    rows = "".join(json.dumps({"i": i, "s": "a\\"}) + "\n" for i in range(200))
    body = json.dumps({"op": "submit", "params": rows, "tail": "x\n"})
    assert protocol.decode([protocol.PROTOCOL, bytes((Command.CONTROL,)), body.encode()]).header["params"] == rows
    deep = json.dumps({"op": "submit", "params": rows, "after": json.loads(nested(protocol.MAX_DEPTH + 1))})
    with pytest.raises(ProtocolError, match="nested"):
        protocol.decode([protocol.PROTOCOL, bytes((Command.CONTROL,)), deep.encode()])
