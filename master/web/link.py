"""The HTTP process's line to the master: CONTROL requests over the master's ZeroMQ socket, as a client."""
from __future__ import annotations

import itertools
import threading
from typing import Any

import zmq
import zmq.asyncio

from master.web.errors import STATUS_OF_CODE, ApiError
from ticketfarm import messages
from ticketfarm.keys import ClientKeys, dealer

#: Seconds the API waits for the master's loop to answer a CONTROL message.
CONTROL_TIMEOUT = 10.0


class MasterLink:
    """One DEALER per request thread, kept open (one CURVE handshake per thread, not per request).

    Each request carries a request id the master echoes, so an answer that arrives after its request timed out
    is recognised and dropped rather than taken as the answer to the next one.
    """

    def __init__(self, endpoint: str, keys: ClientKeys | None, timeout: float = CONTROL_TIMEOUT):
        self.endpoint = endpoint
        self.keys = keys
        self.timeout = timeout
        self.context = zmq.Context()
        self._local = threading.local()
        self._rids = itertools.count(1)
        self._async: zmq.asyncio.Context | None = None

    def _socket(self) -> zmq.Socket:
        sock = getattr(self._local, "sock", None)
        if sock is None:
            sock = self._local.sock = dealer(self.context, self.endpoint, self.keys)
        return sock

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one CONTROL and wait for its REPLY; a refusal is an ApiError with the master's code."""
        return self.exchange(op, fields)[0]

    def exchange(self, op: str, fields: dict[str, Any], payload: list[bytes] | None = None,
                 timeout: float | None = None) -> tuple[dict[str, Any], list[bytes]]:
        """`call` with payload frames both ways, and a timeout of its own (a relayed call waits for a slave)."""
        sock = self._socket()
        rid = next(self._rids)
        sock.send_multipart(messages.Control(op, fields, rid, payload or []).encode())
        wait = self.timeout if timeout is None else timeout
        while True:
            if not sock.poll(int(wait * 1000)):
                raise ApiError("unavailable", f"the master did not answer {op!r} within {wait:g}s")
            answer = messages.decode(sock.recv_multipart())
            if isinstance(answer, messages.Reply) and answer.rid == rid:
                break
        return refusal_checked(op, answer), answer.payload

    def async_socket(self) -> zmq.asyncio.Socket:
        """A DEALER of its own for the event loop (a relayed websocket: many REPLYs to one request)."""
        if self._async is None:
            self._async = zmq.asyncio.Context.shadow(self.context)
        return dealer(self._async, self.endpoint, self.keys)

    def close(self) -> None:
        self.context.destroy(linger=0)


def refusal_checked(op: str, answer: messages.Reply) -> dict[str, Any]:
    """A REPLY's fields (with `ok`); a refusal raised as an ApiError with the master's code."""
    reply = answer.as_dict()
    if not reply.get("ok"):
        code = reply.get("code", "bad_request")
        raise ApiError(code if code in STATUS_OF_CODE else "bad_request", str(reply.get("error", f"{op} refused")))
    reply.pop("rid", None)
    return reply
