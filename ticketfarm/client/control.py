"""Control client: CONTROL requests to a running master over its ZeroMQ socket."""
from __future__ import annotations

import socket
from typing import Any
from urllib.parse import urlsplit

import zmq

from ticketfarm import messages
from ticketfarm.errors import MasterUnreachable
from ticketfarm.keys import ClientKeys, dealer

#: The next step when no master answers.
START_ONE = ("start one with `ticketfarm master` (same --state), or run with `--local` (Python: Cluster(local=N)), "
             "or name another with --master ADDRESS")


def control(endpoint: str, op: str, timeout: float = 5.0, keys: ClientKeys | None = None,
            **fields: Any) -> dict[str, Any]:
    """Send one CONTROL operation and wait for its REPLY (CURVE-encrypted with `keys`, else plain TCP)."""
    if not listening(endpoint):
        raise MasterUnreachable(f"no master runs at {endpoint} (nothing listens there): {START_ONE}")
    ctx = zmq.Context.instance()
    sock = dealer(ctx, endpoint, keys)
    hint = START_ONE if keys is not None else ("no client keys were given, and a CURVE master ignores plain "
                                               "TCP: pass --keys DIR (master.key, client.key_secret)")
    unanswered = f"no master answered at {endpoint} within {timeout:g}s: {hint}"
    try:
        # Never a blocking send: a DEALER whose handshake was refused has no peer to queue to, and would wait for ever.
        try:
            if not sock.poll(int(timeout * 1000), zmq.POLLOUT):
                raise zmq.Again()
            sock.send_multipart(messages.Control(op, fields).encode(), zmq.NOBLOCK)
        except zmq.Again:
            raise MasterUnreachable(unanswered) from None
        if not sock.poll(int(timeout * 1000)):
            raise MasterUnreachable(unanswered)
        msg = messages.decode(sock.recv_multipart())
        if not isinstance(msg, messages.Reply):
            raise MasterUnreachable(f"unexpected answer {msg.COMMAND.name} from {endpoint}")
        return msg.as_dict()
    finally:
        sock.close()


def listening(endpoint: str, timeout: float = 1.0) -> bool:
    """False when nothing listens at a TCP endpoint (refused at once): ZeroMQ would retry until the timeout.

    Any other answer (accepted, slow, another transport) is left for the CONTROL itself to find out.
    """
    parts = urlsplit(endpoint)
    if parts.scheme != "tcp" or parts.hostname is None or parts.port is None:
        return True
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=timeout).close()
    except ConnectionRefusedError:
        return False
    except OSError:
        return True
    return True


def client_endpoint(bind: str) -> str:
    """Where a client on this machine reaches a master bound to `bind` (wildcards become loopback)."""
    return bind.replace("://0.0.0.0:", "://127.0.0.1:").replace("://*:", "://127.0.0.1:")
