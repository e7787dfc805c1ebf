"""Simulated slaves for scripts/bench_scale.py: many DEALERs in one process, each speaking the real protocol.

Each answers every TICKET at once (a REQUEST for the freed credit, then one RESULT with an inline `exit_code`)
and, once welcomed, sends HEARTBEAT when it has sent nothing for a heartbeat interval, as a slave does.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import resource
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEARTBEAT = 1.0


@dataclass
class SimSlave:
    """One simulated slave: its DEALER, the credit it asked for (one timestamp per unit) and tickets it answered."""

    name: str
    sock: Any
    slots: int
    welcomed: bool = False
    last_sent: float = 0.0
    asked: deque = field(default_factory=deque)
    answered: dict[int, float] = field(default_factory=dict)


@dataclass
class Shared:
    """Counters and flags shared between the parent and its simulators (one slot per simulator process)."""

    welcomed: Any
    acked: Any
    heartbeats: Any
    window: Any
    """[start, end] of the measuring window (time.time()); round trips are sampled only inside it."""
    stop: Any

    @classmethod
    def make(cls, procs: int) -> "Shared":
        ctx = mp.get_context("spawn")
        return cls(ctx.RawArray("q", procs), ctx.RawArray("q", procs), ctx.RawArray("q", procs),
                   ctx.RawArray("d", [float("inf"), float("inf")]), ctx.RawValue("i", 0))


class Simulator:
    """Many simulated slaves in one process, on one poller."""

    def __init__(self, index: int, names: list[str], endpoint: str, keys_dir: str | None, slots: int,
                 shared: Shared, elapsed: float):
        import zmq

        from ticketfarm import messages
        from ticketfarm.keys import ClientKeys, dealer

        self.zmq, self.messages = zmq, messages
        self.index, self.shared = index, shared
        self.context = zmq.Context(io_threads=1)
        self.context.set(zmq.MAX_SOCKETS, len(names) + 16)
        keys = None if keys_dir is None else ClientKeys.load(Path(keys_dir) / "master.key",
                                                           Path(keys_dir) / "slave.key_secret")
        self.slaves = [SimSlave(name, dealer(self.context, endpoint, keys, hwm=100_000), slots) for name in names]
        self.by_sock = {s.sock: s for s in self.slaves}
        self.poller = zmq.Poller()
        for s in self.slaves:
            self.poller.register(s.sock, zmq.POLLIN)
        self.samples: list[float] = []
        self.rehellos = 0
        self.dropped = 0
        self.result_output = [messages.ResultOutput("code", 2, b"0\n")]
        self.elapsed = elapsed
        """The run time each result reports: under 50 ms the master sends the sweep in bundles."""
        self.requests = {n: messages.Request(credit=n).encode() for n in range(1, slots + 1)}
        # The socket's own send, as the master's link sends (pyzmq's wrapper costs more than the call).
        self.send_frame = zmq.backend.Socket.send
        self.more, self.last = int(zmq.SNDMORE | zmq.NOBLOCK), int(zmq.NOBLOCK)

    def send(self, s: SimSlave, frames: list[bytes], now: float) -> None:
        for frame in frames[:-1]:
            self.send_frame(s.sock, frame, self.more)
        self.send_frame(s.sock, frames[-1], self.last)
        s.last_sent = now

    def hello(self, s: SimSlave, now: float) -> None:
        s.asked.clear()
        s.welcomed = False
        self.send(s, self.messages.Hello(name=s.name, slots=s.slots, platform="linux-sim", version="sim",
                                         pid=os.getpid(), running=list(s.answered)).encode(), now)

    def ask(self, s: SimSlave, credit: int, now: float) -> None:
        s.asked.extend([now] * credit)
        frames = self.requests.get(credit) or self.messages.Request(credit=credit).encode()
        self.send(s, frames, now)

    def run(self) -> dict[str, Any]:
        now = time.time()
        for s in self.slaves:
            self.hello(s, now)
        next_beat = now + HEARTBEAT / 4
        while not self.shared.stop.value:
            for sock, _ in self.poller.poll(50):
                s = self.by_sock[sock]
                while True:
                    try:
                        frames = sock.recv_multipart(self.zmq.NOBLOCK)
                    except self.zmq.Again:
                        break
                    self.handle(s, frames, time.time())
            now = time.time()
            if now >= next_beat:
                next_beat = now + HEARTBEAT / 4
                self.beat(now)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        for s in self.slaves:
            s.sock.close(linger=0)
        self.context.term()
        return {"samples": self.samples, "rehellos": self.rehellos, "dropped": self.dropped,
                "cpu": usage.ru_utime + usage.ru_stime}

    def handle(self, s: SimSlave, frames: list[bytes], now: float) -> None:
        from ticketfarm import protocol
        from ticketfarm.errors import ProtocolError
        from ticketfarm.protocol import Command

        try:
            raw = protocol.decode(frames)
            if raw.command == Command.DISCONNECT:
                # Read from the raw header: the master may not send the typed codec's `why` yet.
                if raw.header.get("reconnect"):
                    self.rehellos += 1
                    self.hello(s, now)
                return
            msg = self.messages.parse(raw)
        except ProtocolError:
            self.dropped += 1
            return
        if raw.command == Command.TICKET:
            self.answer(s, msg, now)
        elif raw.command == Command.ACK:
            self.acked(s, msg.tickets, now)
        elif raw.command == Command.WELCOME:
            s.welcomed = True
            self.shared.welcomed[self.index] += 1
            self.ask(s, s.slots, now)

    def answer(self, s: SimSlave, ticket: Any, now: float) -> None:
        """Every ticket of the batch finished at once: ask for the slots again, then report them in one RESULT.

        Credit is counted in units (a ticket, or a bundle of a short sweep's: docs/PROTOCOL.md), and the master
        serves a slave's whole credit while it has work queued, so a TICKET uses every unit asked for."""
        asked = s.asked[0] if s.asked else now
        s.asked.clear()
        entries = []
        for entry in ticket.tickets:
            s.answered[entry.ticket] = asked
            entries.append(self.messages.ResultEntry(entry.ticket, 0, self.elapsed, self.result_output))
        self.ask(s, s.slots, now)
        self.send(s, self.messages.Result(entries).encode(), now)

    def acked(self, s: SimSlave, tickets: list[int], now: float) -> None:
        start, end = self.shared.window
        for tid in tickets:
            asked = s.answered.pop(tid, None)
            if asked is not None and asked >= start and now <= end:
                self.samples.append(now - asked)
        self.shared.acked[self.index] += len(tickets)

    def beat(self, now: float) -> None:
        frames = self.messages.Heartbeat(load=0.0, memory=0.0, disk=0.0, busy=0).encode()
        beats = 0
        for s in self.slaves:
            if s.welcomed and now - s.last_sent >= HEARTBEAT:  # like a slave: once its HELLO was answered
                self.send(s, frames, now)
                beats += 1
        self.shared.heartbeats[self.index] += beats


def simulate(index: int, names: list[str], endpoint: str, keys_dir: str | None, slots: int, shared: Shared,
             out: Any, elapsed: float) -> None:
    out.put((index, Simulator(index, names, endpoint, keys_dir, slots, shared, elapsed).run()))
