"""Codecs of what a slave reports about tickets: PROGRESS, RESULT, FAILURE, and the large-output pull FETCH/CHUNK."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ticketfarm import protocol
from ticketfarm.errors import ProtocolError
from ticketfarm.messages.fields import MAX_ITEMS, MAX_REASON, Header, bad
from ticketfarm.protocol import CHUNK_SIZE, Command, Message

STREAMS = ("stdout", "stderr")


@dataclass(slots=True)
class Progress:
    """PROGRESS S->M: a piece of a running ticket's stdout or stderr."""

    COMMAND: ClassVar[Command] = Command.PROGRESS
    ticket: int
    stream: str
    data: bytes

    def encode(self) -> list[bytes]:
        return protocol.encode(self.COMMAND, {"ticket": self.ticket, "stream": self.stream}, [self.data])

    @classmethod
    def decode(cls, msg: Message) -> "Progress":
        h = Header(msg)
        return cls(h.count("ticket"), h.choice("stream", STREAMS), h.one_frame("the output piece"))


@dataclass(slots=True)
class ResultOutput:
    """One output of a finished ticket: inline (`data`, its size is len(data)), or pulled later with FETCH."""

    name: str
    size: int
    data: bytes | None = None


@dataclass(slots=True)
class ResultEntry:
    """One finished ticket of a RESULT."""

    ticket: int
    exit_code: int | None
    elapsed: float | None
    outputs: list[ResultOutput] = field(default_factory=list)
    warning: str = ""
    """Why a success looks suspicious (exit 0, every result empty, stderr written), with the stderr's tail."""


@dataclass(slots=True)
class Result:
    """RESULT S->M: finished tickets; ONE payload frame holds the inline outputs back to back, in order."""

    COMMAND: ClassVar[Command] = Command.RESULT
    results: list[ResultEntry]

    def encode(self) -> list[bytes]:
        entries, inline = [], []
        for r in self.results:
            declared = []
            for o in r.outputs:
                if o.data is None:
                    declared.append({"name": o.name, "size": o.size, "inline": False})
                else:
                    declared.append({"name": o.name, "size": len(o.data), "inline": True})
                    inline.append(o.data)
            entries.append({"ticket": r.ticket, "exit_code": r.exit_code, "elapsed": r.elapsed,
                            "outputs": declared, "warning": r.warning})
        return protocol.encode(self.COMMAND, {"results": entries}, [b"".join(inline)])

    @classmethod
    def decode(cls, msg: Message) -> "Result":
        h = Header(msg)
        raw = h.items("results")
        frame = h.one_frame("the inline outputs")
        command = h.command
        entries, offset = [], 0
        for i, item in enumerate(raw):
            if type(item) is not dict:
                bad(command, f"results[{i}]", "an object")
            ticket, exit_code, elapsed = item.get("ticket"), item.get("exit_code"), item.get("elapsed")
            if type(ticket) is not int or ticket < 0:
                bad(command, f"results[{i}].ticket", "a non-negative integer")
            if exit_code is not None and type(exit_code) is not int:
                bad(command, f"results[{i}].exit_code", "an integer or null")
            if elapsed is not None and type(elapsed) is not float and type(elapsed) is not int:
                bad(command, f"results[{i}].elapsed", "a number or null")
            declared = item.get("outputs")
            if type(declared) is not list or len(declared) > MAX_ITEMS:
                bad(command, f"results[{i}].outputs", f"a list of at most {MAX_ITEMS} entries")
            outputs = []
            for j, o in enumerate(declared):
                name, size = (o.get("name"), o.get("size")) if type(o) is dict else (None, None)
                if type(name) is not str or type(size) is not int or size < 0:
                    bad(command, f"results[{i}].outputs[{j}]", "an object with a 'name' and a non-negative 'size'")
                inline = o.get("inline", False)
                if inline is True:
                    end = offset + size
                    outputs.append(ResultOutput(name, size, frame[offset:end]))
                    offset = end
                elif inline is False:
                    outputs.append(ResultOutput(name, size))
                else:
                    bad(command, f"results[{i}].outputs[{j}].inline", "true or false")
            warning = item.get("warning", "")
            if type(warning) is not str:
                bad(command, f"results[{i}].warning", "a string")
            entries.append(ResultEntry(ticket, exit_code, elapsed, outputs, warning[:MAX_REASON]))
        if offset != len(frame):
            raise ProtocolError(f"RESULT: the inline outputs' sizes add up to {offset} bytes, "
                                f"but the frame holds {len(frame)}")
        return cls(entries)


@dataclass(slots=True)
class Failure:
    """FAILURE S->M: a ticket that produced no result, and why (`timeout after Ns`, `exit code N: ...`, ...);
    `final` when no other attempt can succeed (a result refused for an unsafe path): the task is not retried."""

    COMMAND: ClassVar[Command] = Command.FAILURE
    ticket: int
    exit_code: int | None
    reason: str
    elapsed: float | None = None
    final: bool = False
    """No attempt can succeed (e.g. a result refused for an unsafe path): the task fails at once, without retries."""
    handback: bool = False
    """Never started: the slave's batch allocation ends first (re-queued, not counted as an attempt)."""

    def encode(self) -> list[bytes]:
        return protocol.encode(self.COMMAND, {"ticket": self.ticket, "exit_code": self.exit_code, "reason": self.reason,
                                              "elapsed": self.elapsed, "final": self.final, "handback": self.handback})

    @classmethod
    def decode(cls, msg: Message) -> "Failure":
        h = Header(msg)
        h.frames(0)
        return cls(h.count("ticket"), h.integer("exit_code", None), h.reason("reason", "failed"),
                   h.number("elapsed", None), h.flag("final", False), h.flag("handback", False))


@dataclass(slots=True)
class Fetch:
    """FETCH M->S: send bytes [offset, offset+length) of a large output (length <= CHUNK_SIZE)."""

    COMMAND: ClassVar[Command] = Command.FETCH
    ticket: int
    name: str
    offset: int
    length: int

    def encode(self) -> list[bytes]:
        return protocol.encode(self.COMMAND, {"ticket": self.ticket, "name": self.name, "offset": self.offset,
                                              "length": self.length})

    @classmethod
    def decode(cls, msg: Message) -> "Fetch":
        h = Header(msg)
        h.frames(0)
        return cls(h.count("ticket"), h.text("name"), h.count("offset"), h.count("length", maximum=CHUNK_SIZE))


@dataclass(slots=True)
class Chunk:
    """CHUNK S->M: the bytes a FETCH asked for."""

    COMMAND: ClassVar[Command] = Command.CHUNK
    ticket: int
    name: str
    offset: int
    data: bytes

    def encode(self) -> list[bytes]:
        return protocol.encode(self.COMMAND, {"ticket": self.ticket, "name": self.name, "offset": self.offset},
                               [self.data])

    @classmethod
    def decode(cls, msg: Message) -> "Chunk":
        h = Header(msg)
        return cls(h.count("ticket"), h.text("name"), h.count("offset"), h.one_frame("the bytes"))
