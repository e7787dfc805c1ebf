"""Codecs of a running ticket reached for a client: SANDBOX, RELAY and their answers SANDBOX_REPLY, RELAY_REPLY.

SANDBOX puts, lists and gets the ticket's work dir files; RELAY carries HTTP requests and websockets to the task's
own server.

Each request carries a `call` id chosen by the master; the slave echoes it in every answer (a websocket's channel
is its `call`: every later message of that websocket, either way, names it). Paths are relative to the ticket's
work dir and never leave it (checked here, and again on the slave against symlinks).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ticketfarm import protocol
from ticketfarm.messages.fields import Header, bad, items, relative_path
from ticketfarm.protocol import Command, Message

#: Largest piece of a sandbox file one SANDBOX get returns, and largest file one put writes.
SANDBOX_CHUNK = 1024 * 1024
SANDBOX_MAX_FILE = 4 * 1024 * 1024
#: Largest relayed body (a request, a response, one websocket message), and most headers on one.
RELAY_MAX_BODY = 4 * 1024 * 1024
MAX_HEADERS = 200
#: Entries one sandbox listing holds at most.
MAX_LISTING = 10_000
SANDBOX_ACTIONS = ("put", "list", "get")
RELAY_ACTIONS = ("http", "ws_open", "ws_send", "ws_close")
#: What a RELAY_REPLY says: an HTTP response, a websocket opened, a message from it, it closed, or a failure.
RELAY_EVENTS = ("response", "open", "message", "closed", "error")
#: Codes an answer's `code` may carry (the HTTP API maps them to statuses).
CODES = ("", "not_found", "conflict", "bad_request", "too_large", "bad_gateway", "gateway_timeout", "unavailable")

Headers = list[tuple[str, str]]


def header_pairs(h: Header, name: str = "headers") -> Headers:
    raw = items(h.command, name, h.fields.get(name) or [])
    if len(raw) > MAX_HEADERS:
        bad(h.command, name, f"a list of at most {MAX_HEADERS} [name, value] pairs")
    out = []
    for i, pair in enumerate(raw):
        if type(pair) is not list or len(pair) != 2 or type(pair[0]) is not str or type(pair[1]) is not str:
            bad(h.command, f"{name}[{i}]", "a [name, value] pair of strings")
        out.append((pair[0], pair[1]))
    return out


def _body(h: Header, limit: int = RELAY_MAX_BODY) -> bytes:
    body = h.one_frame("the body (empty when none)")
    if len(body) > limit:
        bad(h.command, "payload", f"at most {limit} bytes")
    return body


@dataclass(slots=True)
class Sandbox:
    """SANDBOX M->S: `put` bytes at `path` (payload), `list` the work dir, or `get` [offset, offset+length) of
    `path`."""

    COMMAND: ClassVar[Command] = Command.SANDBOX
    call: int
    ticket: int
    action: str
    path: str = ""
    offset: int = 0
    length: int = 0
    data: bytes = b""

    def encode(self) -> list[bytes]:
        header: dict[str, Any] = {"call": self.call, "ticket": self.ticket, "action": self.action}
        if self.action != "list":
            header["path"] = self.path
        if self.action == "get":
            header.update(offset=self.offset, length=self.length)
        return protocol.encode(self.COMMAND, header, [self.data])

    @classmethod
    def decode(cls, msg: Message) -> "Sandbox":
        h = Header(msg)
        call, ticket, action = h.count("call"), h.count("ticket"), h.choice("action", SANDBOX_ACTIONS)
        data = _body(h, SANDBOX_MAX_FILE)
        if action == "list":
            return cls(call, ticket, action)
        path = relative_path(h.command, "path", h.fields.get("path"))
        if action == "get":
            return cls(call, ticket, action, path, h.count("offset"), h.count("length", maximum=SANDBOX_CHUNK))
        return cls(call, ticket, action, path, data=data)


@dataclass(slots=True)
class SandboxFile:
    """One file of a sandbox listing: its path in the work dir, size and modification time."""

    path: str
    size: int
    mtime: float


@dataclass(slots=True)
class SandboxReply:
    """SANDBOX_REPLY S->M: the answer to SANDBOX `call`: an `error` (with its `code`), or the listing (`files`),
    or a piece of a file (`offset`, the file's `size`, the bytes as payload); always one payload frame."""

    COMMAND: ClassVar[Command] = Command.SANDBOX_REPLY
    call: int
    error: str = ""
    code: str = ""
    files: list[SandboxFile] = field(default_factory=list)
    offset: int = 0
    size: int = 0
    data: bytes = b""

    def encode(self) -> list[bytes]:
        header: dict[str, Any] = {"call": self.call}
        if self.error:
            header.update(error=self.error, code=self.code)
        else:
            header.update(files=[{"path": f.path, "size": f.size, "mtime": f.mtime} for f in self.files],
                          offset=self.offset, size=self.size)
        return protocol.encode(self.COMMAND, header, [self.data])

    @classmethod
    def decode(cls, msg: Message) -> "SandboxReply":
        h = Header(msg)
        call, error = h.count("call"), h.reason("error", "")
        data = _body(h, SANDBOX_CHUNK)
        if error:
            return cls(call, error, h.choice("code", CODES, ""))
        raw = items(h.command, "files", h.fields.get("files") or [])
        if len(raw) > MAX_LISTING:
            bad(h.command, "files", f"a list of at most {MAX_LISTING} files")
        files = []
        for i, f in enumerate(raw):
            if type(f) is not dict or type(f.get("size")) is not int or f["size"] < 0 \
                    or type(f.get("mtime")) not in (int, float):
                bad(h.command, f"files[{i}]", "an object with a 'path', a non-negative 'size' and an 'mtime'")
            path = relative_path(h.command, f"files[{i}].path", f.get("path"))
            files.append(SandboxFile(path, f["size"], f["mtime"]))
        offset, size = h.count("offset", 0), h.count("size", 0)
        if offset + len(data) > size:
            h.fail("size", f"at least offset + the piece's length ({offset + len(data)})")
        return cls(call, files=files, offset=offset, size=size, data=data)


@dataclass(slots=True)
class Relay:
    """RELAY M->S: an HTTP request for the task's own server (`http`: `method`, `path` with its query string,
    `headers`, the body as payload), or a websocket to it: `ws_open` (`path`, `headers`), `ws_send` (one message,
    `text` or binary), `ws_close`. Always one payload frame (empty when there is no body)."""

    COMMAND: ClassVar[Command] = Command.RELAY
    call: int
    ticket: int
    action: str
    method: str = "GET"
    path: str = "/"
    headers: Headers = field(default_factory=list)
    text: bool = False
    body: bytes = b""

    def encode(self) -> list[bytes]:
        header: dict[str, Any] = {"call": self.call, "ticket": self.ticket, "action": self.action}
        if self.action == "http":
            header["method"] = self.method
        if self.action in ("http", "ws_open"):
            header.update(path=self.path, headers=[list(p) for p in self.headers])
        if self.action == "ws_send":
            header["text"] = self.text
        return protocol.encode(self.COMMAND, header, [self.body])

    @classmethod
    def decode(cls, msg: Message) -> "Relay":
        h = Header(msg)
        call, ticket, action = h.count("call"), h.count("ticket"), h.choice("action", RELAY_ACTIONS)
        body = _body(h)
        if action in ("http", "ws_open"):
            method = h.text("method", limit=32, empty=False) if action == "http" else "GET"
            path = h.text("path", limit=64 * 1024, empty=False)
            if not path.startswith("/"):
                h.fail("path", "a path starting with '/'")
            return cls(call, ticket, action, method, path, header_pairs(h), body=body)
        return cls(call, ticket, action, text=h.flag("text", False), body=body)


@dataclass(slots=True)
class RelayReply:
    """RELAY_REPLY S->M: for RELAY `call`: the HTTP `response` (`status`, `headers`, body as payload), the
    websocket `open`ed, a `message` from it (`text` or binary, payload), `closed` (`status` = its close code,
    `error` its reason), or an `error` (`code` and `error`: no port announced, connection refused, ...)."""

    COMMAND: ClassVar[Command] = Command.RELAY_REPLY
    call: int
    event: str
    status: int = 0
    headers: Headers = field(default_factory=list)
    text: bool = False
    code: str = ""
    error: str = ""
    body: bytes = b""

    def encode(self) -> list[bytes]:
        header: dict[str, Any] = {"call": self.call, "event": self.event}
        if self.event in ("response", "closed"):
            header["status"] = self.status
        if self.event == "response":
            header["headers"] = [list(p) for p in self.headers]
        if self.event == "message":
            header["text"] = self.text
        if self.event in ("closed", "error"):
            header.update(error=self.error, code=self.code)
        return protocol.encode(self.COMMAND, header, [self.body])

    @classmethod
    def decode(cls, msg: Message) -> "RelayReply":
        h = Header(msg)
        call, event = h.count("call"), h.choice("event", RELAY_EVENTS)
        body = _body(h)
        if event == "response":
            return cls(call, event, h.count("status", maximum=999), header_pairs(h), body=body)
        if event == "message":
            return cls(call, event, text=h.flag("text", False), body=body)
        if event in ("closed", "error"):
            return cls(call, event, h.count("status", 0, maximum=4999), code=h.choice("code", CODES, ""),
                       error=h.reason("error", ""))
        return cls(call, event)
