"""Codec of TICKET: a batch of tickets of one sweep, the sweep's shared part written once per message."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ticketfarm import protocol
from ticketfarm.messages.fields import MAX_ITEMS, Header, bad, count, items, relative_path, text
from ticketfarm.protocol import Command, Message, split_frame

KINDS = ("command", "python")


@dataclass(slots=True)
class InputFile:
    """An input a command ticket writes into its work dir: a literal payload frame, or a template rendered there."""

    name: str
    frame: int | None = None
    template: str | None = None

    def fields(self) -> dict[str, Any]:
        if self.frame is not None:
            return {"name": self.name, "frame": self.frame}
        return {"name": self.name, "template": self.template}


@dataclass(slots=True)
class WorkerFile:
    """A shipped worker executable of one platform: its file name, SHA-256 (hex) and size."""

    name: str
    sha256: str
    size: int

    def fields(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "size": self.size}


@dataclass(slots=True)
class TicketSweep:
    """What every ticket of a sweep shares; a master builds it once per sweep and reuses its header."""

    sweep: str
    timeout: float
    results: dict[str, str]
    kind: str = "command"
    command: str | None = None
    argv: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    inputs: list[InputFile] = field(default_factory=list)
    workers: dict[str, WorkerFile] = field(default_factory=dict)
    """Per platform tag; empty = the sweep ships none."""
    memory: int = 0
    """MiB limit per task (0 = none)."""
    cpus: int = 0
    cwd: str = ""
    """The workers' working directory, an absolute path; "" = each ticket's own work dir."""
    frames: list[bytes] = field(default_factory=list)
    """A command sweep's literal input contents, the payload frames its `inputs` refer to by index."""
    _header: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def header(self) -> dict[str, Any]:
        """The shared header fields (computed once: the object is not changed after it is built)."""
        if self._header is None:
            header: dict[str, Any] = {"sweep": self.sweep, "timeout": self.timeout, "results": self.results}
            if self.kind != "command":
                header["kind"] = self.kind
            if self.command is not None:
                header["command"] = self.command
            if self.argv is not None:
                header["argv"] = self.argv
            if self.env:
                header["env"] = self.env
            if self.inputs:
                header["inputs"] = [i.fields() for i in self.inputs]
            if self.workers:
                header["workers"] = {tag: w.fields() for tag, w in self.workers.items()}
            if self.memory:
                header["memory"] = self.memory
            if self.cpus:
                header["cpus"] = self.cpus
            if self.cwd:
                header["cwd"] = self.cwd
            self._header = header
        return self._header

    @classmethod
    def decode(cls, h: Header) -> "TicketSweep":
        timeout = h.number("timeout")
        if not timeout > 0:
            h.fail("timeout", "a positive number")
        kind = h.choice("kind", KINDS, "command")
        command, argv = h.text("command", None, limit=1 << 20), _argv(h)
        if kind == "command" and (command is None) == (argv is None):
            h.fail("command", "given, or else argv (exactly one of them)")
        return cls(h.text("sweep", empty=False), timeout, h.text_map("results"), kind, command, argv,
                   h.text_map("env", {}), _inputs(h), _workers(h), h.count("memory", 0), h.count("cpus", 0),
                   _cwd(h), h.payload if kind == "command" else [])


def _cwd(h: Header) -> str:
    cwd = h.text("cwd", "", limit=4096)
    if cwd and not cwd.startswith("/"):
        h.fail("cwd", "an absolute path")
    return cwd


def _argv(h: Header) -> list[str] | None:
    argv = h.fields.get("argv")
    if argv is None:
        return None
    if type(argv) is not list or not all(type(a) is str for a in argv):
        h.fail("argv", "a list of strings")
    return argv


def _inputs(h: Header) -> list[InputFile]:
    out = []
    for i, item in enumerate(items(h.command, "inputs", h.fields.get("inputs") or [])):
        where = f"inputs[{i}]"
        if type(item) is not dict:
            h.fail(where, "an object")
        name = text(h.command, f"{where}.name", item.get("name"), empty=False)
        if "frame" in item:
            frame = count(h.command, f"{where}.frame", item["frame"], maximum=len(h.payload) - 1)
            out.append(InputFile(name, frame=frame))
        else:
            out.append(InputFile(name, template=text(h.command, f"{where}.template", item.get("template"),
                                                     limit=1 << 20)))
    return out


def _workers(h: Header) -> dict[str, WorkerFile]:
    out = {}
    workers = h.obj("workers", {})
    if len(workers) > MAX_ITEMS:
        h.fail("workers", f"an object of at most {MAX_ITEMS} platforms")
    for tag, entry in workers.items():
        where = f"workers.{tag}"
        if type(entry) is not dict:
            h.fail(where, "an object")
        sha = text(h.command, f"{where}.sha256", entry.get("sha256"), limit=64)
        if len(sha) != 64:
            h.fail(f"{where}.sha256", "64 hex digits")
        out[tag] = WorkerFile(text(h.command, f"{where}.name", entry.get("name"), empty=False), sha,
                              count(h.command, f"{where}.size", entry.get("size")))
    return out


@dataclass(slots=True)
class TicketEntry:
    """One ticket of a batch: a command ticket's `params`, or a python ticket's function hash and pickled args."""

    ticket: int
    task: int
    attempt: int
    params: dict[str, Any] = field(default_factory=dict)
    fn: str = ""
    args: bytes = b""
    files: list[InputFile] = field(default_factory=list)
    """Files uploaded into this task's sandbox (a command ticket's): literal frames of the message, by index."""


@dataclass(slots=True)
class Ticket:
    """TICKET M->S: tickets of one sweep. Payload: a command sweep's input frames, then the frames of files
    uploaded into its tasks' sandboxes (`extra`); for python, ONE frame with every ticket's pickled arguments back
    to back in ticket order (each entry's `size` says how many bytes)."""

    COMMAND: ClassVar[Command] = Command.TICKET
    sweep: TicketSweep
    tickets: list[TicketEntry]
    extra: list[bytes] = field(default_factory=list)

    def encode(self) -> list[bytes]:
        shared = self.sweep
        if shared.kind == "python":
            entries = [{"ticket": t.ticket, "task": t.task, "attempt": t.attempt, "fn": t.fn, "size": len(t.args)}
                       for t in self.tickets]
            payload = [b"".join(t.args for t in self.tickets)]
        else:
            entries = [{"ticket": t.ticket, "task": t.task, "attempt": t.attempt, "params": t.params}
                       for t in self.tickets]
            for entry, t in zip(entries, self.tickets):
                if t.files:
                    entry["files"] = [f.fields() for f in t.files]
            payload = [*shared.frames, *self.extra] if self.extra else shared.frames
        return protocol.encode(self.COMMAND, dict(shared.header(), tickets=entries), payload)

    @classmethod
    def decode(cls, msg: Message) -> "Ticket":
        h = Header(msg)
        shared = TicketSweep.decode(h)
        raw = h.items("tickets")
        command = h.command
        python = shared.kind == "python"
        if python:
            frame = h.one_frame("every ticket's pickled arguments")
            sizes = [t.get("size") if type(t) is dict else None for t in raw]
            args = split_frame(frame, sizes, "TICKET: field 'tickets[].size'")
        tickets = []
        for i, t in enumerate(raw):
            if type(t) is not dict:
                bad(command, f"tickets[{i}]", "an object")
            ticket, task, attempt = t.get("ticket"), t.get("task"), t.get("attempt")
            if type(ticket) is not int or type(task) is not int or type(attempt) is not int \
                    or ticket < 0 or task < 0 or attempt < 0:
                bad(command, f"tickets[{i}]", "an object with non-negative integers 'ticket', 'task', 'attempt'")
            if python:
                fn = t.get("fn")
                if type(fn) is not str or not fn:
                    bad(command, f"tickets[{i}].fn", "a function hash")
                tickets.append(TicketEntry(ticket, task, attempt, fn=fn, args=args[i]))
            else:
                params = t.get("params")
                if type(params) is not dict:
                    bad(command, f"tickets[{i}].params", "an object")
                tickets.append(TicketEntry(ticket, task, attempt, params, files=_files(h, t, i)))
        return cls(shared, tickets)


def _files(h: Header, entry: dict[str, Any], i: int) -> list[InputFile]:
    """A command ticket's sandbox uploads: `{name, frame}` each, the name a relative path."""
    out = []
    for n, item in enumerate(items(h.command, f"tickets[{i}].files", entry.get("files") or [])):
        where = f"tickets[{i}].files[{n}]"
        if type(item) is not dict:
            h.fail(where, "an object")
        out.append(InputFile(relative_path(h.command, f"{where}.name", item.get("name")),
                             frame=count(h.command, f"{where}.frame", item.get("frame"), maximum=len(h.payload) - 1)))
    return out
