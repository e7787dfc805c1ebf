"""Codecs of the control clients' messages: CONTROL and REPLY (any op), NOTIFY, and the py_add op's body."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ticketfarm import protocol
from ticketfarm.errors import ProtocolError
from ticketfarm.messages.fields import Header, bad, text
from ticketfarm.protocol import Command, Message, split_frame

RequestId = str | int | None


def _rid(h: Header) -> RequestId:
    rid = h.fields.get("rid")
    if rid is not None and type(rid) is not str and type(rid) is not int:
        h.fail("rid", "a string or an integer")
    return rid


@dataclass(slots=True)
class Control:
    """CONTROL C->M: operation `op` with its own fields (read them with `args()`); `rid` is echoed in the REPLY."""

    COMMAND: ClassVar[Command] = Command.CONTROL
    op: str
    fields: dict[str, Any] = field(default_factory=dict)
    rid: RequestId = None
    payload: list[bytes] = field(default_factory=list)

    def args(self) -> Header:
        """The op's fields, read with checks that name "CONTROL <op>" and the field."""
        return Header.of(f"CONTROL {self.op}", self.fields, self.payload)

    def encode(self) -> list[bytes]:
        header = {"op": self.op, **self.fields}
        if self.rid is not None:
            header["rid"] = self.rid
        return protocol.encode(self.COMMAND, header, self.payload)

    @classmethod
    def decode(cls, msg: Message) -> "Control":
        h = Header(msg)
        op = h.text("op", limit=64)
        rid = _rid(h)
        fields = {k: v for k, v in msg.header.items() if k != "op" and k != "rid"}
        return cls(op, fields, rid, msg.payload)


@dataclass(slots=True)
class Reply:
    """REPLY M->C: `ok`, the op's answer fields (or `error`, and `code` for the HTTP API), `rid` echoed."""

    COMMAND: ClassVar[Command] = Command.REPLY
    ok: bool
    fields: dict[str, Any] = field(default_factory=dict)
    rid: RequestId = None
    payload: list[bytes] = field(default_factory=list)

    @property
    def error(self) -> str:
        return str(self.fields.get("error", ""))

    def as_dict(self) -> dict[str, Any]:
        """The whole header as one dict (ok, rid and the answer fields), as control clients return it."""
        out = {"ok": self.ok, **self.fields}
        if self.rid is not None:
            out["rid"] = self.rid
        return out

    def encode(self) -> list[bytes]:
        return protocol.encode(self.COMMAND, self.as_dict(), self.payload)

    @classmethod
    def decode(cls, msg: Message) -> "Reply":
        h = Header(msg)
        ok = h.flag("ok")
        rid = _rid(h)
        fields = {k: v for k, v in msg.header.items() if k != "ok" and k != "rid"}
        return cls(ok, fields, rid, msg.payload)


@dataclass(slots=True)
class Settled:
    """One task of a NOTIFY: its final state; a done one names its result (`output`, `size`, inline `data`)."""

    task: int
    state: str
    output: str = ""
    size: int = 0
    data: bytes | None = None
    reason: str = ""


@dataclass(slots=True)
class Notify:
    """NOTIFY M->C: settled tasks of a watched sweep; ONE payload frame holds the inline results back to back."""

    COMMAND: ClassVar[Command] = Command.NOTIFY
    sweep: str
    tasks: list[Settled]

    def encode(self) -> list[bytes]:
        entries, inline = [], []
        for t in self.tasks:
            entry: dict[str, Any] = {"task": t.task, "state": t.state}
            if t.state == "done":
                if t.data is not None:
                    entry.update(output=t.output, size=len(t.data), inline=True)
                    inline.append(t.data)
                else:
                    entry.update(output=t.output, size=t.size, inline=False)
            else:
                entry["reason"] = t.reason
            entries.append(entry)
        return protocol.encode(self.COMMAND, {"sweep": self.sweep, "tasks": entries}, [b"".join(inline)])

    @classmethod
    def decode(cls, msg: Message) -> "Notify":
        h = Header(msg)
        sweep, raw = h.text("sweep"), h.items("tasks")
        frame = h.one_frame("the inline results")
        command = h.command
        tasks, offset = [], 0
        for i, item in enumerate(raw):
            if type(item) is not dict or type(item.get("task")) is not int or type(item.get("state")) is not str:
                bad(command, f"tasks[{i}]", "an object with an integer 'task' and a string 'state'")
            if item["state"] != "done":
                tasks.append(Settled(item["task"], item["state"], reason=str(item.get("reason") or "")))
                continue
            output, size, inline = item.get("output"), item.get("size"), item.get("inline", False)
            if type(output) is not str or type(size) is not int or size < 0 or type(inline) is not bool:
                bad(command, f"tasks[{i}]", "a done task with an 'output', a non-negative 'size' and 'inline'")
            if inline:
                end = offset + size
                tasks.append(Settled(item["task"], "done", output, size, frame[offset:end]))
                offset = end
            else:
                tasks.append(Settled(item["task"], "done", output, size))
        if offset != len(frame):
            raise ProtocolError(f"NOTIFY: the inline results' sizes add up to {offset} bytes, "
                                f"but the frame holds {len(frame)}")
        return cls(sweep, tasks)


@dataclass(slots=True)
class PyCall:
    """One task of a py_add: its function's hash, pickled (args, kwargs) and a short readable repr."""

    fn: str
    args: bytes
    repr: str = ""


@dataclass(slots=True)
class PyAdd:
    """The py_add CONTROL op: tasks first..first+len(calls)-1 of a python sweep, and new function bodies.

    Payload: one frame per body of `functions` (in order), then ONE frame with every call's pickled arguments
    back to back (`sizes[i]` bytes for call i).
    """

    sweep: str
    first: int
    calls: list[PyCall]
    functions: dict[str, bytes] = field(default_factory=dict)
    spec: str = ""
    """The sweep's spec (JSON), needed when the master has no sweep of that name yet."""

    def control(self, rid: RequestId = None) -> Control:
        fields = {"sweep": self.sweep, "spec": self.spec, "first": self.first,
                  "fns": [c.fn for c in self.calls], "reprs": [c.repr for c in self.calls],
                  "functions": list(self.functions), "sizes": [len(c.args) for c in self.calls]}
        return Control("py_add", fields, rid, [*self.functions.values(), b"".join(c.args for c in self.calls)])

    @classmethod
    def from_control(cls, control: Control) -> "PyAdd":
        h = control.args()
        name, first, spec = h.text("sweep", empty=False), h.count("first"), h.text("spec", "", limit=1 << 24)
        fns, functions = h.items("fns"), h.items("functions")
        reprs = h.fields.get("reprs") or [""] * len(fns)
        if type(reprs) is not list or len(reprs) != len(fns):
            h.fail("reprs", f"a list of {len(fns)} strings, one per entry of 'fns'")
        sizes = h.counts("sizes")
        if len(sizes) != len(fns):
            h.fail("sizes", f"a list of {len(fns)} sizes, one per entry of 'fns' (got {len(sizes)})")
        if len(control.payload) != len(functions) + 1:
            raise ProtocolError(f"{h.command}: payload must hold each new function body, then one frame of "
                                f"arguments ({len(functions) + 1} frames), got {len(control.payload)}")
        args = split_frame(control.payload[-1], sizes, f"{h.command}: field 'sizes'")
        calls = [PyCall(text(h.command, f"fns[{i}]", fn, limit=64), a, str(r)[:200])
                 for i, (fn, a, r) in enumerate(zip(fns, args, reprs))]
        bodies = {text(h.command, f"functions[{i}]", d, limit=64): body
                  for i, (d, body) in enumerate(zip(functions, control.payload))}
        return cls(name, first, calls, bodies, spec)

