"""A running ticket reached for a client through the master: its sandbox files and its task's own server.

SANDBOX: the work dir's files; RELAY: the HTTP or websocket server its task announced on 127.0.0.1. Disk and
socket work runs in threads; their answers wait in `outbox` until the slave's loop sends them, so the loop never
waits on either.

A task announces its server by writing the port number to `$TICKETFARM_HTTP_PORT_FILE`
(`.ticketfarm/http-port` in its work dir). Only 127.0.0.1 is ever connected to.
"""
from __future__ import annotations

import http.client
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import structlog
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from slave.runner import HTTP_PORT_FILE, safe_join
from ticketfarm import messages
from ticketfarm.errors import TaskUnreachable, UnsafePath
from ticketfarm.messages.relay import MAX_LISTING, RELAY_MAX_BODY, Headers

log = structlog.get_logger("ticketfarm.slave")

#: Threads for sandbox files and relayed HTTP requests (each websocket has two threads of its own).
THREADS = 4
#: Headers that belong to one hop, not to the request: never relayed (RFC 9110 §7.6.1), nor the client's Host.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "host", "content-length", "sec-websocket-key", "sec-websocket-version",
              "sec-websocket-extensions", "sec-websocket-accept"}
#: Names in a work dir that are the slave's own (its stdout/stderr capture, the result manifest).
OWN_PREFIX = ".tf-"
#: Where a ticket is: its work dir, only prefetched (no dir yet), or not on this slave.
WAITING = "waiting"


def announced_port(workdir: Path) -> int:
    """The port the task wrote to its port file."""
    try:
        with open(safe_join(workdir, HTTP_PORT_FILE), "rb") as fh:
            text = fh.read(16).decode(errors="replace").strip()
    except (FileNotFoundError, UnsafePath):
        raise TaskUnreachable("bad_gateway", f"the task announced no port: it writes one to $TICKETFARM_HTTP_PORT_FILE "
                                             f"({HTTP_PORT_FILE} in its work dir)") from None
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise TaskUnreachable("bad_gateway", f"{HTTP_PORT_FILE} holds {text!r}, not a port number")
    return int(text)


def relayed(headers: Headers) -> Headers:
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]


class Reach:
    """The slave's half of master/relay.py: answers SANDBOX and RELAY for the tickets it holds."""

    def __init__(self, wake_fd: int, timeout: float):
        self.wake_fd = wake_fd
        self.timeout = timeout
        self.pool = ThreadPoolExecutor(THREADS, thread_name_prefix="tf-reach")
        self.outbox: queue.SimpleQueue[messages.AnyMessage] = queue.SimpleQueue()
        #: Uploads for prefetched tickets, written with their work dir (`place`).
        self.pending: dict[int, dict[str, bytes]] = {}
        self.channels: dict[int, Channel] = {}

    # -- from the slave's loop ------------------------------------------------------------------------
    def sandbox(self, msg: messages.Sandbox, where: Path | str | None) -> None:
        if where is None:
            self.answer(messages.SandboxReply(msg.call, f"ticket {msg.ticket} is not held by this slave",
                                               "conflict"))
        elif where == WAITING:
            if msg.action == "put":  # written into its work dir with its inputs, before it starts
                self.pending.setdefault(msg.ticket, {})[msg.path] = msg.data
                self.answer(messages.SandboxReply(msg.call, size=len(msg.data)))
            else:
                self.answer(messages.SandboxReply(msg.call, f"ticket {msg.ticket} has not started yet",
                                                   "conflict"))
        else:
            self.pool.submit(self._sandbox_call, msg, Path(where))

    def relay(self, msg: messages.Relay, where: Path | str | None) -> None:
        if msg.action in ("ws_send", "ws_close"):
            channel = self.channels.get(msg.call)
            if channel is not None:
                channel.sends.put(None if msg.action == "ws_close" else msg)
            return
        if not isinstance(where, Path):
            state = "has not started yet" if where == WAITING else "is not held by this slave"
            self.answer(messages.RelayReply(msg.call, "error", code="conflict",
                                             error=f"ticket {msg.ticket} {state}"))
        elif msg.action == "http":
            self.pool.submit(self._answering, msg.call, lambda: self._http(msg, where))
        else:
            channel = self.channels[msg.call] = Channel(msg.call, self)
            threading.Thread(target=channel.run, args=(msg, where), daemon=True, name="tf-ws").start()

    def place(self, ticket: int, workdir: Path) -> None:
        """Write the uploads a prefetched ticket got into its new work dir."""
        for path, data in self.pending.pop(ticket, {}).items():
            target = safe_join(workdir, path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)

    def forget(self, ticket: int) -> None:
        self.pending.pop(ticket, None)

    def flush(self, send: Callable[[messages.AnyMessage], None]) -> None:
        """Send the answers the threads finished."""
        while True:
            try:
                send(self.outbox.get_nowait())
            except queue.Empty:
                return

    def close(self) -> None:
        for channel in list(self.channels.values()):
            channel.sends.put(None)
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- in threads ----------------------------------------------------------------------------------
    def answer(self, msg: messages.AnyMessage) -> None:
        self.outbox.put(msg)
        try:
            os.write(self.wake_fd, b"r")
        except (BlockingIOError, OSError):
            pass  # the pipe is full: the loop is awake already

    def _answering(self, call: int, work: Callable[[], messages.AnyMessage]) -> None:
        try:
            self.answer(work())
        except TaskUnreachable as exc:
            self.answer(messages.RelayReply(call, "error", code=exc.code, error=str(exc)))

    def _sandbox_call(self, msg: messages.Sandbox, workdir: Path) -> None:
        try:
            self.answer(self._sandbox(msg, workdir))
        except UnsafePath as exc:
            self.answer(messages.SandboxReply(msg.call, str(exc), "bad_request"))
        except FileNotFoundError:
            self.answer(messages.SandboxReply(msg.call, f"no file {msg.path!r} in the work dir", "not_found"))
        except OSError as exc:
            self.answer(messages.SandboxReply(msg.call, f"{msg.path}: {exc.strerror or exc}", "conflict"))

    def _sandbox(self, msg: messages.Sandbox, workdir: Path) -> messages.SandboxReply:
        if msg.action == "list":
            return messages.SandboxReply(msg.call, files=listing(workdir))
        if msg.path.split("/")[0].startswith(OWN_PREFIX):
            raise UnsafePath(f"{msg.path!r}: names starting with {OWN_PREFIX!r} are the slave's own")
        target = safe_join(workdir, msg.path)
        if msg.action == "put":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(msg.data)
            return messages.SandboxReply(msg.call, size=len(msg.data))
        with open(target, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            fh.seek(msg.offset)
            return messages.SandboxReply(msg.call, offset=msg.offset, size=size, data=fh.read(msg.length))

    def _http(self, msg: messages.Relay, workdir: Path) -> messages.RelayReply:
        port = announced_port(workdir)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=self.timeout)
        try:
            conn.putrequest(msg.method, msg.path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", f"127.0.0.1:{port}")
            for name, value in relayed(msg.headers):
                conn.putheader(name, value)
            conn.putheader("Content-Length", str(len(msg.body)))
            conn.endheaders(msg.body)
            response = conn.getresponse()
            body = response.read(RELAY_MAX_BODY + 1)
        except ConnectionRefusedError:
            raise TaskUnreachable("bad_gateway", f"connection refused on 127.0.0.1:{port}, the port the task announced "
                                                 "(is its server listening yet?)") from None
        except TimeoutError:
            raise TaskUnreachable("gateway_timeout", f"the task's server on 127.0.0.1:{port} did not answer within "
                                                     f"{self.timeout:g}s") from None
        except (OSError, http.client.HTTPException) as exc:
            raise TaskUnreachable("bad_gateway", f"the task's server on 127.0.0.1:{port}: {exc!r}") from None
        finally:
            conn.close()
        if len(body) > RELAY_MAX_BODY:
            raise TaskUnreachable("bad_gateway", f"the task's response is over the {RELAY_MAX_BODY} bytes relayed")
        return messages.RelayReply(msg.call, "response", response.status, relayed(response.getheaders()), body=body)


def listing(workdir: Path) -> list[messages.SandboxFile]:
    """The work dir's files (symlinks and the slave's own files left out), at most MAX_LISTING."""
    out: list[messages.SandboxFile] = []
    for root, dirs, files in os.walk(workdir):
        dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(root, d)))
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, workdir).replace(os.sep, "/")
            if rel.startswith(OWN_PREFIX) or os.path.islink(path):
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue  # gone meanwhile
            out.append(messages.SandboxFile(rel, st.st_size, st.st_mtime))
            if len(out) >= MAX_LISTING:
                return out
    return out


class Channel:
    """One websocket to the task's server: a thread reads its messages, another sends the client's in order."""

    def __init__(self, call: int, reach: Reach):
        self.call = call
        self.reach = reach
        self.sends: queue.SimpleQueue[messages.Relay | None] = queue.SimpleQueue()

    def run(self, msg: messages.Relay, workdir: Path) -> None:
        try:
            ws = self._open(msg, workdir)
        except TaskUnreachable as exc:
            self.reach.channels.pop(self.call, None)
            self.reach.answer(messages.RelayReply(self.call, "error", code=exc.code, error=str(exc)))
            return
        self.reach.answer(messages.RelayReply(self.call, "open"))
        threading.Thread(target=self._send_loop, args=(ws,), daemon=True, name="tf-ws-send").start()
        status, reason = 1000, ""
        try:
            for message in ws:
                text = isinstance(message, str)
                self.reach.answer(messages.RelayReply(self.call, "message", text=text,
                                                       body=message.encode() if text else message))
        except ConnectionClosed:
            pass
        if ws.close_code is not None:
            status, reason = ws.close_code, ws.close_reason or ""
        self.reach.channels.pop(self.call, None)
        self.sends.put(None)
        self.reach.answer(messages.RelayReply(self.call, "closed", status, error=reason))

    def _open(self, msg: messages.Relay, workdir: Path) -> ClientConnection:
        port = announced_port(workdir)
        try:
            return connect(f"ws://127.0.0.1:{port}{msg.path}", additional_headers=relayed(msg.headers),
                           open_timeout=self.reach.timeout, max_size=RELAY_MAX_BODY, compression=None)
        except ConnectionRefusedError:
            raise TaskUnreachable("bad_gateway", f"connection refused on 127.0.0.1:{port}, the port the task "
                                                 "announced (is its server listening yet?)") from None
        except InvalidStatus as exc:
            raise TaskUnreachable("bad_gateway", f"the task's server refused the websocket: HTTP "
                                                 f"{exc.response.status_code}") from None
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise TaskUnreachable("bad_gateway", f"websocket to 127.0.0.1:{port}: {exc!r}") from None

    def _send_loop(self, ws: ClientConnection) -> None:
        while True:
            msg = self.sends.get()
            try:
                if msg is None:
                    ws.close()
                    return
                ws.send(msg.body.decode(errors="replace") if msg.text else msg.body)
            except ConnectionClosed:
                return
