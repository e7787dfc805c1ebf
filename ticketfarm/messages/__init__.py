"""One codec per message: a typed object for every `protocol.Command`, encoded and decoded in one place.

Both sides (master, slave, control clients) build and read message bodies only through these classes:

    from ticketfarm import messages

    frames = messages.Request(credit=3).encode()          # -> list[bytes] (no routing id)
    msg = messages.decode(frames)                          # -> messages.Request(credit=3)
    msg = messages.parse(protocol_message)                 # the same, from an already framed protocol.Message
    messages.Hello.decode(protocol_message)                # one class's decoder (the command is not checked)

Every class has `COMMAND` (its `Command`), `encode() -> list[bytes]` and the classmethod
`decode(Message)`. Decoding checks everything a handler relies on: the type of every field, the
element types inside lists, counts and ids non-negative, list lengths (fields.MAX_ITEMS), the number
of payload frames, and sizes that must add up to a payload frame's length. Anything else raises
`ticketfarm.errors.ProtocolError` naming the command and the field; receivers log it as
`dropped_message`. `protocol.decode` already refused frames that are not a message, and headers
nested deeper than `protocol.MAX_DEPTH`. Unknown header fields are ignored (a newer peer may add some).

Classes by conversation (docs/PROTOCOL.md describes each command):

- session: Hello, Welcome (+ SlavePolicy), Request, Ack, Heartbeat, Cancel, Disconnect (its `why`
  is one of session.WHYS), Refused, NoWork, Recall
- tickets: Ticket = TicketSweep (the sweep's shared part; a master reuses it) + TicketEntry list,
  with InputFile and WorkerFile
- results: Progress, Result (ResultEntry, ResultOutput), Failure, Fetch, Chunk
- shipping: CodeRequest, Code, WorkerRequest, Worker
- relay: Sandbox, SandboxReply (SandboxFile), Relay, RelayReply: a running ticket's files and its own server
- client: Control (any op; `args()` reads its fields with checks), Reply, Notify (Settled), and the
  py_add op's body PyAdd (PyCall): `PyAdd.from_control(control)` / `PyAdd(...).control(rid)`
"""
from __future__ import annotations

from typing import Union

from ticketfarm import protocol
from ticketfarm.messages.client import Control, Notify, PyAdd, PyCall, Reply, Settled
from ticketfarm.messages.relay import Relay, RelayReply, Sandbox, SandboxFile, SandboxReply
from ticketfarm.messages.results import Chunk, Failure, Fetch, Progress, Result, ResultEntry, ResultOutput
from ticketfarm.messages.session import (
    PROTOCOL_VERSION,
    REFUSED,
    REVOKED,
    SHUTDOWN,
    UNKNOWN_PEER,
    WHYS,
    Ack,
    Cancel,
    Disconnect,
    Heartbeat,
    Hello,
    NoWork,
    Recall,
    Refused,
    Request,
    SlavePolicy,
    Welcome,
)
from ticketfarm.messages.shipping import Code, CodeRequest, Worker, WorkerRequest
from ticketfarm.messages.tickets import InputFile, Ticket, TicketEntry, TicketSweep, WorkerFile
from ticketfarm.protocol import Command, Message

AnyMessage = Union[Hello, Welcome, Request, Ticket, Progress, Result, Fetch, Chunk, Failure, Ack, Heartbeat,
                   Cancel, Disconnect, Control, Reply, CodeRequest, Code, Notify, WorkerRequest, Worker, Refused,
                   NoWork, Recall, Sandbox, SandboxReply, Relay, RelayReply]

#: The class of each command.
CODECS: dict[Command, type] = {cls.COMMAND: cls for cls in AnyMessage.__args__}  # type: ignore[attr-defined]


def parse(msg: Message) -> AnyMessage:
    """The typed message of a framed `protocol.Message`; ProtocolError if its body does not follow the protocol."""
    return CODECS[msg.command].decode(msg)


def decode(frames: list[bytes]) -> AnyMessage:
    """The typed message of raw frames (routing id already removed); ProtocolError on anything malformed."""
    return parse(protocol.decode(frames))


__all__ = [
    "CODECS", "PROTOCOL_VERSION", "REFUSED", "REVOKED", "SHUTDOWN", "UNKNOWN_PEER", "WHYS",
    "Ack", "AnyMessage", "Cancel", "Chunk", "Code", "CodeRequest", "Control", "Disconnect", "Failure", "Fetch",
    "Heartbeat", "Hello", "InputFile", "NoWork", "Notify", "Progress", "PyAdd", "PyCall", "Recall", "Refused",
    "Relay", "RelayReply", "Reply", "Request", "Result", "ResultEntry", "ResultOutput", "Sandbox", "SandboxFile",
    "SandboxReply", "Settled", "SlavePolicy", "Ticket", "TicketEntry",
    "TicketSweep", "Welcome", "Worker", "WorkerFile", "WorkerRequest", "decode", "parse",
]
