"""The one wire protocol between master, slaves and control clients: frames, commands, encode/decode.

Every message is a ZeroMQ multipart message:

    frame 0   PROTOCOL  b"TFP1"       protocol name + version
    frame 1   command   one byte      see Command
    frame 2   header    UTF-8 JSON    an object, the command's fields
    frame 3.. payload   raw bytes     binary-safe bodies (file contents, chunks)

On the master's ROUTER socket a routing-id frame precedes frame 0.
This module is the reference for frames; `ticketfarm.messages` for each command's header and payload;
`docs/PROTOCOL.md` describes both.
"""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

from ticketfarm.errors import ProtocolError

PROTOCOL = b"TFP1"
VERSION = 1

#: Largest outgoing result chunk; the master asks for files piece by piece.
CHUNK_SIZE = 256 * 1024
#: Outputs up to this size travel inside the RESULT message itself.
INLINE_LIMIT = 64 * 1024
#: Largest piece of a large python result one py_fetch returns.
FETCH_MAX = 1024 * 1024
#: Deepest nesting of objects and arrays a header may have (the header object itself is level 1).
MAX_DEPTH = 32


class Command(enum.IntEnum):
    """One-byte command codes. Direction: S = slave, M = master, C = control client."""

    HELLO = 0x01       # S->M  register: name, platform, slots, version, held results
    WELCOME = 0x02     # M->S  accepted: heartbeat settings, slave policy
    REQUEST = 0x03     # S->M  credit: how many more tickets the slave can take
    TICKET = 0x04      # M->S  one attempt at a task (inputs as payload frames)
    PROGRESS = 0x05    # S->M  a piece of a running ticket's stdout/stderr
    RESULT = 0x06      # S->M  a finished ticket: exit code, outputs (small ones inline)
    FETCH = 0x07       # M->S  send me bytes [offset, offset+length) of a large output
    CHUNK = 0x08       # S->M  those bytes
    FAILURE = 0x09     # S->M  a ticket that did not produce a result: exit code, reason
    ACK = 0x0A         # M->S  these tickets are safely stored; forget them
    HEARTBEAT = 0x0B   # both  liveness, plus load/memory/disk from slaves
    CANCEL = 0x0C      # M->S  stop this ticket, its result is not wanted
    DISCONNECT = 0x0D  # both  go away / I am going away (reason)
    CONTROL = 0x0E     # C->M  a control operation (submit, cancel, status, ...)
    REPLY = 0x0F       # M->C  the answer to CONTROL
    # Python-function sweeps (kind "python", see master/pysweep.py and slave/pyworker.py):
    CODE_REQUEST = 0x10  # S->M  send me the function body with this hash (once per slave)
    CODE = 0x11          # M->S  a cloudpickled function body, by hash (payload: the body)
    NOTIFY = 0x12        # M->C  settled tasks of a watched sweep, pushed after commit (inline results in one frame)
    # Shipped worker executables and the end of work (see master/placement.py and slave/cache.py):
    WORKER_REQUEST = 0x13  # S->M  send me bytes [offset, offset+length) of the worker executable with this SHA-256
    WORKER = 0x14          # M->S  those bytes (payload), or an error
    REFUSED = 0x15         # M->S  a sweep this slave cannot run (no worker for its platform): it gets no tickets of it
    NO_WORK = 0x16         # M->S  every sweep is over: nothing more to do (the slave stays or exits, per its config)
    # A running ticket reached for a client (see master/relay.py and slave/relay.py):
    SANDBOX = 0x17        # M->S  put / list / get a file of a ticket's work dir
    SANDBOX_REPLY = 0x18  # S->M  the answer: done, the listing, or a piece of the file (or an error)
    RELAY = 0x19          # M->S  an HTTP request or a websocket step for the server the ticket's task announced
    RELAY_REPLY = 0x1A    # S->M  its response, websocket events, or an error
    RECALL = 0x1B         # M->S  give these tickets back unless started (their sweep was paused)



@dataclass
class Message:
    """A decoded message: command, JSON header fields and binary payload frames."""

    command: Command
    header: dict[str, Any] = field(default_factory=dict)
    payload: list[bytes] = field(default_factory=list)


#: One encoder for every message: json.dumps with non-default options builds a new one per call.
_to_json = json.JSONEncoder(separators=(",", ":")).encode
#: The command frame of each command, and the command of each byte (Enum lookups cost µs per message).
_FRAMES = {c: bytes((c,)) for c in Command}
_COMMANDS = {c.value: c for c in Command}


def encode(command: Command, header: dict[str, Any] | None = None, payload: list[bytes] | None = None) -> list[bytes]:
    """Frames for one message (without any routing id)."""
    body = _to_json(header or {}).encode()
    return [PROTOCOL, _FRAMES[command], body, *(payload or [])]


def decode(frames: list[bytes]) -> Message:
    """Parse frames (routing id already removed); raise ProtocolError on anything malformed."""
    if len(frames) < 3:
        raise ProtocolError(f"expected at least 3 frames, got {len(frames)}")
    if frames[0] != PROTOCOL:
        raise ProtocolError(f"unknown protocol tag {bytes(frames[0][:16])!r}")
    if len(frames[1]) != 1:
        raise ProtocolError("command frame must be exactly one byte")
    command = _COMMANDS.get(frames[1][0])
    if command is None:
        raise ProtocolError(f"unknown command 0x{frames[1][0]:02x}")
    if not _shallow(frames[2]):
        raise ProtocolError(f"header nested deeper than {MAX_DEPTH} levels")
    try:
        header = json.loads(frames[2])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"header is not JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError("header nested too deeply") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a JSON object")
    return Message(command, header, [bytes(f) for f in frames[3:]])


_NOT_MARKS = bytes(b for b in range(256) if b not in b'[]{}"')


def _shallow(body: bytes) -> bool:
    """Whether the JSON text nests objects and arrays at most MAX_DEPTH deep (checked before parsing, so a hostile
    header never reaches the parser's recursion limit). Brackets inside strings do not count.

    Every step runs at C speed, in linear time: drop the escapes that hold a backslash or a quote (left to right, as
    JSON reads them), then every quote left opens or closes a string; keep only brackets and quotes, drop the
    strings, then strip innermost pairs level by level. Quotes alternate open/close, so a string with no brackets
    is `""` and goes at once, and the others are every other piece between quotes.
    """
    if body.count(b"[") + body.count(b"{") <= MAX_DEPTH:
        return True  # the common case, at the cost of two byte counts
    marks = bytes(body).replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_MARKS)
    brackets = marks.replace(b'""', b"")
    if b'"' in brackets:
        brackets = b"".join(brackets.split(b'"')[::2])
    for _ in range(MAX_DEPTH):
        if not brackets:
            return True
        brackets = brackets.replace(b"[]", b"").replace(b"{}", b"")
    return not brackets


def split_frame(frame: bytes, sizes: list[Any], what: str) -> list[bytes]:
    """The bodies packed back to back in one payload frame, cut by their `sizes`; ProtocolError naming `what`.

    Many small bodies travel in one frame rather than one frame each: every frame costs several µs
    (CURVE encrypts frame by frame, one send call each), far more than copying a few bytes.
    """
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes):
        raise ProtocolError(f"{what}: each must be a non-negative integer")
    if sum(sizes) != len(frame):
        raise ProtocolError(f"{what}: {sum(sizes)} bytes in all, but the frame holds {len(frame)}")
    pieces, offset = [], 0
    for n in sizes:
        pieces.append(frame[offset:offset + n])
        offset += n
    return pieces
