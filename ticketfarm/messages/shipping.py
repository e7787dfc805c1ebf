"""Codecs of what the master ships to slaves on request: function bodies (CODE) and worker executables (WORKER)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ticketfarm import protocol
from ticketfarm.messages.fields import Header
from ticketfarm.protocol import CHUNK_SIZE, Command, Message

#: A SHA-256 in hex.
HASH_LENGTH = 64


def _hash(h: Header, name: str) -> str:
    digest = h.text(name, limit=HASH_LENGTH)
    if len(digest) != HASH_LENGTH:
        h.fail(name, f"a SHA-256 ({HASH_LENGTH} hex digits)")
    return digest


@dataclass
class CodeRequest:
    """CODE_REQUEST S->M: send me the cloudpickled function body with this hash."""

    COMMAND: ClassVar[Command] = Command.CODE_REQUEST
    hash: str

    def encode(self) -> list[bytes]:
        return protocol.encode(self.COMMAND, {"hash": self.hash})

    @classmethod
    def decode(cls, msg: Message) -> "CodeRequest":
        h = Header(msg)
        h.frames(0)
        return cls(_hash(h, "hash"))


@dataclass
class Code:
    """CODE M->S: a function body by hash (one payload frame), or `error` (no frame) when the master has none."""

    COMMAND: ClassVar[Command] = Command.CODE
    hash: str
    body: bytes | None = None
    error: str = ""

    def encode(self) -> list[bytes]:
        if self.body is None:
            return protocol.encode(self.COMMAND, {"hash": self.hash, "error": self.error or "no such function"})
        return protocol.encode(self.COMMAND, {"hash": self.hash}, [self.body])

    @classmethod
    def decode(cls, msg: Message) -> "Code":
        h = Header(msg)
        digest, error = _hash(h, "hash"), h.reason("error", "")
        if error:
            h.frames(0, "an error carries no body")
            return cls(digest, None, error)
        return cls(digest, h.one_frame("the function body"))


@dataclass
class WorkerRequest:
    """WORKER_REQUEST S->M: send me bytes [offset, offset+length) of the worker executable with this SHA-256."""

    COMMAND: ClassVar[Command] = Command.WORKER_REQUEST
    sha256: str
    offset: int
    length: int

    def encode(self) -> list[bytes]:
        return protocol.encode(self.COMMAND, {"sha256": self.sha256, "offset": self.offset, "length": self.length})

    @classmethod
    def decode(cls, msg: Message) -> "WorkerRequest":
        h = Header(msg)
        h.frames(0)
        return cls(_hash(h, "sha256"), h.count("offset"), h.count("length", minimum=1, maximum=CHUNK_SIZE))


@dataclass
class Worker:
    """WORKER M->S: a piece of a worker executable at `offset` (`size` is the whole file's), or an `error`."""

    COMMAND: ClassVar[Command] = Command.WORKER
    sha256: str
    offset: int = 0
    size: int = 0
    data: bytes = b""
    error: str = ""

    def encode(self) -> list[bytes]:
        if self.error:
            return protocol.encode(self.COMMAND, {"sha256": self.sha256, "error": self.error})
        return protocol.encode(self.COMMAND, {"sha256": self.sha256, "offset": self.offset, "size": self.size},
                               [self.data])

    @classmethod
    def decode(cls, msg: Message) -> "Worker":
        h = Header(msg)
        sha, error = _hash(h, "sha256"), h.reason("error", "")
        if error:
            h.frames(0, "an error carries no bytes")
            return cls(sha, error=error)
        offset, size = h.count("offset"), h.count("size")
        data = h.one_frame("the bytes")
        if offset + len(data) > size:
            h.fail("size", f"at least offset + the piece's length ({offset + len(data)})")
        return cls(sha, offset, size, data)
