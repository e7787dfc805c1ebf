"""Codecs of the slave session: joining (HELLO, WELCOME), credit, liveness, acknowledgements, refusals, goodbye."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ticketfarm import protocol
from ticketfarm.messages.fields import Header
from ticketfarm.protocol import Command, Message

#: Credit one REQUEST may ask for at most.
MAX_CREDIT = 10_000

#: Why a DISCONNECT was sent; the slave acts on this field, never on the readable `reason`.
SHUTDOWN = "shutdown"                  # the sender is going away (master: stopping; slave: shutting down)
PROTOCOL_VERSION = "protocol_version"  # the master does not speak the HELLO's protocol version (slave exits, code 3)
REVOKED = "revoked"                    # the slave's key was revoked while it was connected
REFUSED = "refused"                    # this key may not act as a slave, or not under this name
UNKNOWN_PEER = "unknown_peer"          # the master does not know this connection (restarted): say HELLO again
WHYS = (SHUTDOWN, PROTOCOL_VERSION, REVOKED, REFUSED, UNKNOWN_PEER)

ON_NO_WORK = ("stay", "exit")
ON_MASTER_SHUTDOWN = ("stay", "exit")


@dataclass
class Hello:
    """HELLO S->M: a slave registers; `running`/`held` are the tickets it still has (running or ready, finished).

    A HELLO of another protocol version decodes to its `protocol` only: its other fields may mean anything.
    """

    COMMAND: ClassVar[Command] = Command.HELLO
    name: str = ""
    slots: int = 0
    platform: str = ""
    cpus: int = 0
    memory_mb: int = 0
    version: str = ""
    pid: int = 0
    running: list[int] = field(default_factory=list)
    held: list[int] = field(default_factory=list)
    protocol: int = protocol.VERSION

    def encode(self) -> list[bytes]:
        return protocol.encode(self.COMMAND, {
            "protocol": self.protocol, "name": self.name, "platform": self.platform, "cpus": self.cpus,
            "memory_mb": self.memory_mb, "slots": self.slots, "version": self.version, "pid": self.pid,
            "running": self.running, "held": self.held})

    @classmethod
    def decode(cls, msg: Message) -> "Hello":
        h = Header(msg)
        h.frames(0)
        version = h.integer("protocol")
        if version != protocol.VERSION:
            return cls(protocol=version)
        return cls(name=h.text("name", limit=256, empty=False), slots=h.count("slots", maximum=MAX_CREDIT, minimum=1),
                   platform=h.text("platform", ""), cpus=h.count("cpus", 0), memory_mb=h.count("memory_mb", 0),
                   version=h.text("version", ""), pid=h.count("pid", 0),
                   running=h.counts("running", []), held=h.counts("held", []))


@dataclass
class SlavePolicy:
    """Settings the master imposes on its slaves at WELCOME ("" / None: each slave keeps its own)."""

    on_no_work: str = ""
    delete_workers: bool | None = None
    on_master_shutdown: str = ""

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.on_no_work:
            out["on_no_work"] = self.on_no_work
        if self.delete_workers is not None:
            out["delete_workers"] = self.delete_workers
        if self.on_master_shutdown:
            out["on_master_shutdown"] = self.on_master_shutdown
        return out


@dataclass
class Welcome:
    """WELCOME M->S: accepted; the master's heartbeat settings, its epoch and the policy it imposes."""

    COMMAND: ClassVar[Command] = Command.WELCOME
    heartbeat_interval: float
    liveness: int
    epoch: int
    policy: SlavePolicy = field(default_factory=SlavePolicy)

    def encode(self) -> list[bytes]:
        header: dict[str, Any] = {"heartbeat_interval": self.heartbeat_interval, "liveness": self.liveness,
                                  "epoch": self.epoch}
        policy = self.policy.fields()
        if policy:
            header["policy"] = policy
        return protocol.encode(self.COMMAND, header)

    @classmethod
    def decode(cls, msg: Message) -> "Welcome":
        h = Header(msg)
        h.frames(0)
        interval = h.number("heartbeat_interval")
        if not interval > 0:
            h.fail("heartbeat_interval", "a positive number")
        policy = Header.of("WELCOME policy", h.obj("policy", {}))
        return cls(interval, h.count("liveness", minimum=1), h.count("epoch"), SlavePolicy(
            policy.choice("on_no_work", ON_NO_WORK, ""), policy.flag("delete_workers", None),
            policy.choice("on_master_shutdown", ON_MASTER_SHUTDOWN, "")))


@dataclass
class Request:
    """REQUEST S->M: credit, how many more tickets the slave can take, and the tickets it started since its last
    REQUEST (a slot freed up: the next one started, and one more is wanted: both say so in one message)."""

    COMMAND: ClassVar[Command] = Command.REQUEST
    credit: int
    started: list[int] = field(default_factory=list)

    def encode(self) -> list[bytes]:
        header: dict[str, Any] = {"credit": self.credit}
        if self.started:
            header["started"] = self.started
        return protocol.encode(self.COMMAND, header)

    @classmethod
    def decode(cls, msg: Message) -> "Request":
        h = Header(msg)
        h.frames(0)
        return cls(h.count("credit", maximum=MAX_CREDIT), h.counts("started", []))


@dataclass
class Ack:
    """ACK M->S: these tickets' results or failures are committed (or refused for good): forget them."""

    COMMAND: ClassVar[Command] = Command.ACK
    tickets: list[int]

    def encode(self) -> list[bytes]:
        return protocol.encode(self.COMMAND, {"tickets": self.tickets})

    @classmethod
    def decode(cls, msg: Message) -> "Ack":
        h = Header(msg)
        h.frames(0)
        return cls(h.counts("tickets"))


@dataclass
class Heartbeat:
    """HEARTBEAT both ways: liveness; from a slave also what it runs and holds waiting, and its load.

    The master's heartbeats carry nothing: empty lists and None fields are left out of the header.
    """

    COMMAND: ClassVar[Command] = Command.HEARTBEAT
    running: list[int] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)
    load: float | None = None
    memory: float | None = None
    disk: float | None = None
    busy: int | None = None

    def info(self) -> dict[str, Any]:
        """The machine's state as the master stores it: load, memory, disk, busy (those present)."""
        return {k: v for k, v in (("load", self.load), ("memory", self.memory), ("disk", self.disk),
                                  ("busy", self.busy)) if v is not None}

    def encode(self) -> list[bytes]:
        header: dict[str, Any] = self.info()
        if self.running:
            header["running"] = self.running
        if self.waiting:
            header["waiting"] = self.waiting
        return protocol.encode(self.COMMAND, header)

    @classmethod
    def decode(cls, msg: Message) -> "Heartbeat":
        h = Header(msg)
        h.frames(0)
        if not h.fields:
            return cls()
        return cls(h.counts("running", []), h.counts("waiting", []), h.number("load", None),
                   h.number("memory", None), h.number("disk", None), h.count("busy", None))


@dataclass
class Cancel:
    """CANCEL M->S: stop this ticket, its result is not wanted (deadline, another copy won, cancelled)."""

    COMMAND: ClassVar[Command] = Command.CANCEL
    ticket: int
    reason: str = "cancelled"

    def encode(self) -> list[bytes]:
        return protocol.encode(self.COMMAND, {"ticket": self.ticket, "reason": self.reason})

    @classmethod
    def decode(cls, msg: Message) -> "Cancel":
        h = Header(msg)
        h.frames(0)
        return cls(h.count("ticket"), h.reason("reason", "cancelled"))


@dataclass
class Recall:
    """RECALL M->S: give these tickets back unless they have started (their sweep was paused); each one given back
    is answered with a FAILURE `handback`, a started one runs on."""

    COMMAND: ClassVar[Command] = Command.RECALL
    tickets: list[int]
    reason: str = "sweep paused"

    def encode(self) -> list[bytes]:
        return protocol.encode(self.COMMAND, {"tickets": self.tickets, "reason": self.reason})

    @classmethod
    def decode(cls, msg: Message) -> "Recall":
        h = Header(msg)
        h.frames(0)
        return cls(h.counts("tickets"), h.reason("reason", "sweep paused"))


@dataclass
class Disconnect:
    """DISCONNECT both ways: `why` (one of WHYS) decides what the receiver does; `reason` is for people.

    Master -> slave: `reconnect` true = say HELLO again now (why "unknown_peer"); false = this session is over
    (the master is going away, refuses this key or name, or does not speak the slave's protocol version).
    """

    COMMAND: ClassVar[Command] = Command.DISCONNECT
    why: str
    reason: str = ""
    reconnect: bool = False

    def encode(self) -> list[bytes]:
        return protocol.encode(self.COMMAND, {"why": self.why, "reason": self.reason, "reconnect": self.reconnect})

    @classmethod
    def decode(cls, msg: Message) -> "Disconnect":
        h = Header(msg)
        h.frames(0)
        return cls(h.choice("why", WHYS), h.reason("reason", ""), h.flag("reconnect", False))


@dataclass
class Refused:
    """REFUSED M->S: this slave gets no tickets of a sweep (no worker for its platform, too few CPUs/memory)."""

    COMMAND: ClassVar[Command] = Command.REFUSED
    sweep: str
    platform: str
    reason: str

    def encode(self) -> list[bytes]:
        return protocol.encode(self.COMMAND, {"sweep": self.sweep, "platform": self.platform, "reason": self.reason})

    @classmethod
    def decode(cls, msg: Message) -> "Refused":
        h = Header(msg)
        h.frames(0)
        return cls(h.text("sweep"), h.text("platform", ""), h.reason())


@dataclass
class NoWork:
    """NO_WORK M->S: every sweep is over (the slave stays or exits, per its config)."""

    COMMAND: ClassVar[Command] = Command.NO_WORK
    reason: str = "every sweep is over"

    def encode(self) -> list[bytes]:
        return protocol.encode(self.COMMAND, {"reason": self.reason})

    @classmethod
    def decode(cls, msg: Message) -> "NoWork":
        h = Header(msg)
        h.frames(0)
        return cls(h.reason("reason", ""))
