"""Reaching a running task for a client: its sandbox files and its own HTTP or websocket server, through its slave.

Asked of the slave (SANDBOX, RELAY) under a call id with a deadline; its answer goes back to the client as a REPLY.

The loop never waits: a call is a table entry; the answer, a deadline passing or the slave leaving settles it.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import structlog

from master.lifecycle import Lifecycle
from master.link import Link
from master.roster import Roster, SlaveSession
from master.sandbox import Staging
from master.scheduler import Ticket
from ticketfarm import messages
from ticketfarm.errors import TaskUnreachable
from ticketfarm.messages.client import RequestId
from ticketfarm.messages.fields import relative_path
from ticketfarm.messages.relay import RELAY_MAX_BODY, SANDBOX_CHUNK, SANDBOX_MAX_FILE, header_pairs

log = structlog.get_logger("ticketfarm.master")

Reply = tuple[dict[str, Any], list[bytes]]
#: A relayed op: its REPLY now, or None when the slave's answer will be relayed later.
LaterOp = Callable[[bytes, messages.Control], "Reply | None"]
#: Task states that take uploads (a settled task's sandbox is closed).
OPEN_STATES = ("queued", "paused", "running")


@dataclass
class Call:
    """One question to a slave on a client's behalf; a websocket (`channel`) lives until either side closes it."""

    client: bytes
    rid: RequestId
    slave: str
    ticket: int
    op: str
    deadline: float
    channel: bool = False
    opened: bool = False


class Relay:
    """The calls out to slaves, by id; the CONTROL ops that start them (`ops`) and the answers that end them."""

    def __init__(self, lifecycle: Lifecycle, roster: Roster, link: Link, staging: Staging, timeout: float,
                 max_channels: int):
        self.lifecycle = lifecycle
        self.roster = roster
        self.link = link
        self.staging = staging
        self.timeout = timeout
        self.max_channels = max_channels
        self.calls: dict[int, Call] = {}
        self._ids = itertools.count(1)
        self.ops: dict[str, LaterOp] = {name: self._refusing(op) for name, op in (
            ("sandbox_put", self.put), ("sandbox_list", self.listing), ("sandbox_get", self.get),
            ("relay_http", self.http), ("relay_ws_open", self.ws_open), ("relay_ws_send", self.ws_send),
            ("relay_ws_close", self.ws_close))}

    @staticmethod
    def _refusing(op: LaterOp) -> LaterOp:
        def run(identity: bytes, msg: messages.Control) -> Reply | None:
            try:
                return op(identity, msg)
            except TaskUnreachable as exc:
                return {"ok": False, "code": exc.code, "error": str(exc)}, []
        return run

    # -- finding the task's ticket ------------------------------------------------------------------
    def _task(self, msg: messages.Control) -> tuple[str, int, str]:
        args = msg.args()
        sweep, task = args.text("sweep", empty=False), args.count("task")
        state = self.lifecycle.task_state(sweep, task)
        if state is None:
            raise TaskUnreachable("not_found", f"sweep {sweep!r} has no task {task}")
        active = self.lifecycle.active(sweep)
        if active is not None and active.sweep.kind == "python":
            raise TaskUnreachable("conflict", f"{sweep!r} is a python sweep: its tasks have no work dir to reach")
        return sweep, task, state

    def _running(self, sweep: str, task: int, state: str) -> tuple[Ticket, SlaveSession] | None:
        """The task's newest ticket on a connected slave (a speculative copy may run beside it)."""
        tickets = [t for t in self.lifecycle.tickets_for(sweep, task) if self.roster.named(t.slave) is not None]
        if not tickets:
            return None
        ticket = max(tickets, key=lambda t: t.id)
        return ticket, self.roster.named(ticket.slave)  # type: ignore[return-value]

    def _target(self, msg: messages.Control) -> tuple[Ticket, SlaveSession]:
        sweep, task, state = self._task(msg)
        found = self._running(sweep, task, state)
        if found is None:
            raise TaskUnreachable("conflict", f"task {task} of {sweep!r} is {state}, not running: nothing to reach "
                                              "(its files after the end: GET .../sandbox, from its results)")
        return found

    def _ask(self, identity: bytes, msg: messages.Control, target: tuple[Ticket, SlaveSession],
             build: Callable[[int], messages.AnyMessage], channel: bool = False) -> None:
        ticket, session = target
        call = next(self._ids)
        self.calls[call] = Call(identity, msg.rid, session.name, ticket.id, msg.op,
                                math.inf if channel else time.time() + self.timeout, channel)
        self.link.send(session.identity, build(call))

    # -- sandbox ------------------------------------------------------------------------------------
    def put(self, identity: bytes, msg: messages.Control) -> Reply | None:
        """Staged for every later ticket of the task, and written into the running one's work dir (answered
        when the slave wrote it)."""
        sweep, task, state = self._task(msg)
        path = relative_path(f"CONTROL {msg.op}", "path", msg.fields.get("path"))
        data = msg.args().one_frame("the file's bytes")
        if len(data) > SANDBOX_MAX_FILE:
            raise TaskUnreachable("too_large", f"{path}: {len(data)} bytes, over the {SANDBOX_MAX_FILE} a sandbox file "
                                               "may have")
        if state not in OPEN_STATES:
            raise TaskUnreachable("conflict", f"task {task} of {sweep!r} is {state}: its sandbox takes no more files")
        self.staging.put(sweep, task, path, data)
        found = self._running(sweep, task, state)
        if found is None:
            return {"ok": True, "path": path, "size": len(data), "placed": "staged"}, []
        self._ask(identity, msg, found, lambda call: messages.Sandbox(call, found[0].id, "put", path, data=data))
        return None

    def listing(self, identity: bytes, msg: messages.Control) -> Reply | None:
        target = self._target(msg)
        self._ask(identity, msg, target, lambda call: messages.Sandbox(call, target[0].id, "list"))
        return None

    def get(self, identity: bytes, msg: messages.Control) -> Reply | None:
        args = msg.args()
        path = relative_path(f"CONTROL {msg.op}", "path", msg.fields.get("path"))
        offset, length = args.count("offset", 0), args.count("length", SANDBOX_CHUNK, maximum=SANDBOX_CHUNK)
        target = self._target(msg)
        self._ask(identity, msg, target, lambda call: messages.Sandbox(call, target[0].id, "get", path, offset, length))
        return None

    # -- the task's own server ----------------------------------------------------------------------
    def http(self, identity: bytes, msg: messages.Control) -> Reply | None:
        args = msg.args()
        method, path = args.text("method", limit=32, empty=False), args.text("path", limit=64 * 1024, empty=False)
        headers = header_pairs(args)
        body = args.one_frame("the request body")
        if len(body) > RELAY_MAX_BODY:
            raise TaskUnreachable("too_large", f"request body of {len(body)} bytes, over the {RELAY_MAX_BODY} relayed")
        target = self._target(msg)
        self._ask(identity, msg, target, lambda call: messages.Relay(
            call, target[0].id, "http", method, path, headers, body=body))
        return None

    def ws_open(self, identity: bytes, msg: messages.Control) -> Reply | None:
        args = msg.args()
        path, headers = args.text("path", limit=64 * 1024, empty=False), header_pairs(args)
        if sum(c.channel for c in self.calls.values()) >= self.max_channels:
            raise TaskUnreachable("unavailable", f"{self.max_channels} websockets are relayed already (relay_channels)")
        target = self._target(msg)
        self._ask(identity, msg, target, lambda call: messages.Relay(
            call, target[0].id, "ws_open", path=path, headers=headers), channel=True)
        return None

    def _channel(self, identity: bytes, msg: messages.Control) -> tuple[int, Call]:
        channel = msg.args().count("channel")
        call = self.calls.get(channel)
        if call is None or not call.channel or call.client != identity:
            raise TaskUnreachable("not_found", f"no relayed websocket {channel} (closed already?)")
        return channel, call

    def ws_send(self, identity: bytes, msg: messages.Control) -> Reply | None:
        """One message to the task's websocket; answered only when refused."""
        channel, call = self._channel(identity, msg)
        body = msg.args().one_frame("the message")
        session = self.roster.named(call.slave)
        if session is not None:
            self.link.send(session.identity, messages.Relay(channel, call.ticket, "ws_send",
                                                            text=msg.args().flag("text", False), body=body))
        return None

    def ws_close(self, identity: bytes, msg: messages.Control) -> Reply | None:
        """Close the task's websocket; its `closed` event ends the channel."""
        channel, call = self._channel(identity, msg)
        session = self.roster.named(call.slave)
        if session is None:
            self._end(channel, {"event": "closed", "status": 1001, "error": "the client closed it"})
        else:
            self.link.send(session.identity, messages.Relay(channel, call.ticket, "ws_close"))
        return None

    # -- answers ------------------------------------------------------------------------------------
    def _answered(self, identity: bytes, call_id: int) -> Call | None:
        call = self.calls.get(call_id)
        session = self.roster.get(identity)
        if call is None or session is None or session.name != call.slave:
            return None  # late (timed out meanwhile), or not this slave's to answer
        return call

    def _reply(self, call: Call, fields: dict[str, Any], payload: list[bytes] | None = None) -> None:
        ok = bool(fields.pop("ok", True))
        self.link.send(call.client, messages.Reply(ok, fields, call.rid, payload or []))

    def _end(self, call_id: int, fields: dict[str, Any], payload: list[bytes] | None = None) -> None:
        call = self.calls.pop(call_id, None)
        if call is not None:
            self._reply(call, fields, payload)

    def on_sandbox_reply(self, identity: bytes, msg: messages.SandboxReply) -> None:
        call = self._answered(identity, msg.call)
        if call is None:
            return
        if msg.error:
            self._end(msg.call, {"ok": False, "code": msg.code or "bad_gateway", "error": msg.error})
        elif call.op == "sandbox_list":
            self._end(msg.call, {"files": [{"path": f.path, "size": f.size, "mtime": f.mtime} for f in msg.files]})
        elif call.op == "sandbox_get":
            self._end(msg.call, {"offset": msg.offset, "size": msg.size}, [msg.data])
        else:
            self._end(msg.call, {"placed": "work dir", "size": msg.size})

    def on_relay_reply(self, identity: bytes, msg: messages.RelayReply) -> None:
        call = self._answered(identity, msg.call)
        if call is None:
            return
        if msg.event == "error":
            self._end(msg.call, {"ok": False, "code": msg.code or "bad_gateway", "error": msg.error})
        elif msg.event == "response":
            self._end(msg.call, {"status": msg.status, "headers": [list(h) for h in msg.headers]}, [msg.body])
        elif msg.event == "closed":
            self._end(msg.call, {"event": "closed", "status": msg.status, "error": msg.error})
        elif msg.event == "open":
            call.opened = True
            self._reply(call, {"event": "open", "channel": msg.call})
        else:
            self._reply(call, {"event": "message", "text": msg.text}, [msg.body])

    # -- calls that can no longer be answered -------------------------------------------------------
    def expire(self, now: float) -> None:
        for call_id in [i for i, c in self.calls.items() if c.deadline < now]:
            call = self.calls[call_id]
            log.warning("relay_timeout", slave=call.slave, op=call.op, ticket=call.ticket)
            self._end(call_id, {"ok": False, "code": "gateway_timeout",
                                "error": f"slave {call.slave} did not answer {call.op} within {self.timeout:g}s"})

    def slave_left(self, session: SlaveSession) -> None:
        reason = f"slave {session.name} disconnected"
        for call_id in [i for i, c in self.calls.items() if c.slave == session.name]:
            if self.calls[call_id].opened:
                self._end(call_id, {"event": "closed", "status": 1011, "error": reason})
            else:
                self._end(call_id, {"ok": False, "code": "bad_gateway", "error": reason})
