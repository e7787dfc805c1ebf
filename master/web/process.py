"""The HTTP process itself: uvicorn serving the app on http_bind, until SIGTERM. Run by the master, or on its own.

    python -m master.web --state DIR [--master tcp://HOST:PORT] [--keys DIR]     (or: ticketfarm http)

It reads DIR/state.db read-only and DIR/master.toml, and reaches the master only through its ZeroMQ socket,
as a client with the keys DIR/keys/http.key_secret (else client.key_secret) and master.key.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import Any

import structlog
import uvicorn

from master.config import load_master_config
from master.startup import bind_failed
from master.web.app import create_app
from master.web.context import MasterInfo, WebContext, check_http_config, parse_bind
from master.web.link import MasterLink
from master.web.supervisor import READY
from master.web.tokens import TokenSet
from ticketfarm.errors import TicketfarmError
from ticketfarm.keys import ClientKeys, keys_dir
from ticketfarm.logs import configure_logging

log = structlog.get_logger("ticketfarm.http")

#: Seconds open requests and event streams get to finish at shutdown.
GRACEFUL_SHUTDOWN = 2.0


def master_keys(keys: Path, insecure: bool) -> ClientKeys | None:
    if insecure:
        return None
    found = ClientKeys.from_dir(keys, "http") or ClientKeys.from_dir(keys)
    if found is None:
        raise TicketfarmError(f"{keys}: no master.key with http.key_secret or client.key_secret to reach the master")
    return found


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server that also ends the API's event streams when told to stop."""

    ctx: WebContext

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.ctx.stopping.set()
        super().handle_exit(sig, frame)


def serve(state_dir: Path, endpoint: str | None, keys: Path | None, epoch: int | None, started: float | None,
          port: int | None, bind: str | None = None) -> int:
    """Serve until SIGTERM; `bind` instead of master.toml's http_bind, `port` instead of its port."""
    config = load_master_config(state_dir)
    config.http_bind = bind or config.http_bind
    if not config.http_bind:
        raise TicketfarmError("no http_bind in master.toml: give one (ticketfarm http --bind HOST:PORT)")
    tokens = TokenSet(state_dir)
    check_http_config(config, tokens)
    os.nice(config.http_nice)  # pollers may wait; dispatch may not
    endpoint = endpoint or config.bind.replace("://0.0.0.0:", "://127.0.0.1:").replace("://*:", "://127.0.0.1:")
    link = MasterLink(endpoint, master_keys(keys or keys_dir(state_dir), config.insecure))
    if epoch is None:
        epoch = int(link.call("ping")["epoch"])
    host, bind_port = parse_bind(config.http_bind)
    try:
        sock = listening_socket(host, bind_port if port is None else port)
    except OSError as exc:
        raise bind_failed("http_bind", config.http_bind, exc) from None
    tls = bool(config.http_tls_cert)
    name = f"[{host}]" if ":" in host else host
    ctx = WebContext(config, state_dir, MasterInfo(endpoint, epoch, started), link, tokens,
                     url=f"{'https' if tls else 'http'}://{name}:{sock.getsockname()[1]}")
    uv = uvicorn.Config(create_app(ctx), log_level="warning", access_log=False, lifespan="off", ws="websockets-sansio",
                        proxy_headers=False,  # nothing reads the client's address: spare every request the check
                        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN, timeout_keep_alive=60,
                        ssl_certfile=str(state_dir / config.http_tls_cert) if tls else None,
                        ssl_keyfile=str(state_dir / config.http_tls_key) if tls else None)
    server = _Server(uv)
    server.ctx = ctx
    print(f"{READY} {ctx.url}", flush=True)
    log.info("http_listening", url=ctx.url, master=endpoint)
    try:
        server.run(sockets=[sock])
    finally:
        link.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ticketfarm-http", description=__doc__.splitlines()[0])
    ap.add_argument("--state", type=Path, required=True, help="the master's state dir")
    ap.add_argument("--master", help="the master's ZeroMQ endpoint (default: bind of master.toml)")
    ap.add_argument("--keys", type=Path, help="dir with master.key and http.key_secret (default: STATE/keys)")
    ap.add_argument("--epoch", type=int, help=argparse.SUPPRESS)  # given by the master that starts it
    ap.add_argument("--started", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)  # a restart keeps the port first picked
    ap.add_argument("--log-level", default="warning")
    args = ap.parse_args(argv)
    configure_logging(args.log_level)
    try:
        return serve(args.state, args.master, args.keys, args.epoch, args.started, args.port)
    except (TicketfarmError, OSError) as exc:
        print(f"ticketfarm http: {exc}", file=sys.stderr)
        return 2
