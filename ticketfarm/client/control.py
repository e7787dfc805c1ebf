"""Control client: CONTROL requests to a running master over its ZeroMQ socket."""
from __future__ import annotations

from typing import Any

import zmq

from ticketfarm import messages
from ticketfarm.errors import MasterUnreachable
from ticketfarm.keys import ClientKeys, dealer


def control(endpoint: str, op: str, timeout: float = 5.0, keys: ClientKeys | None = None,
            **fields: Any) -> dict[str, Any]:
    """Send one CONTROL operation and wait for its REPLY (CURVE-encrypted with `keys`, else plain TCP)."""
    ctx = zmq.Context.instance()
    sock = dealer(ctx, endpoint, keys)
    try:
        sock.send_multipart(messages.Control(op, fields).encode())
        if not sock.poll(int(timeout * 1000)):
            hint = "" if keys is not None else " (no client keys given: a CURVE master ignores plain TCP; see --keys)"
            raise MasterUnreachable(f"no master answered at {endpoint} within {timeout:g}s{hint}")
        msg = messages.decode(sock.recv_multipart())
        if not isinstance(msg, messages.Reply):
            raise MasterUnreachable(f"unexpected answer {msg.COMMAND.name} from {endpoint}")
        return msg.as_dict()
    finally:
        sock.close()


def client_endpoint(bind: str) -> str:
    """Where a client on this machine reaches a master bound to `bind` (wildcards become loopback)."""
    return bind.replace("://0.0.0.0:", "://127.0.0.1:").replace("://*:", "://127.0.0.1:")
