"""The HTTP process's line to the master: CONTROL requests over the master's ZeroMQ socket, as a client."""
from __future__ import annotations

import itertools
import threading
from typing import Any

import zmq

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

    def _socket(self) -> zmq.Socket:
        sock = getattr(self._local, "sock", None)
        if sock is None:
            sock = self._local.sock = dealer(self.context, self.endpoint, self.keys)
        return sock

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one CONTROL and wait for its REPLY; a refusal is an ApiError with the master's code."""
        sock = self._socket()
        rid = next(self._rids)
        sock.send_multipart(messages.Control(op, fields, rid).encode())
        deadline_ms = int(self.timeout * 1000)
        while True:
            if not sock.poll(deadline_ms):
                raise ApiError("unavailable", f"the master did not answer {op!r} within {self.timeout:g}s")
            answer = messages.decode(sock.recv_multipart())
            if isinstance(answer, messages.Reply) and answer.rid == rid:
                break
        reply = answer.as_dict()
        if not reply.get("ok"):
            code = reply.get("code", "bad_request")
            raise ApiError(code if code in STATUS_OF_CODE else "bad_request", str(reply.get("error", f"{op} refused")))
        reply.pop("rid", None)
        return reply

    def close(self) -> None:
        self.context.destroy(linger=0)
