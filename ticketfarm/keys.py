"""CURVE keys: generation and loading, the authorised-keys ring (reloaded live) and the ZAP handler thread.

Layout of a master's state dir (written by `ticketfarm init`, completed at every master start):

    keys/master.key            the master's public key (slaves and clients need it)
    keys/master.key_secret     the master's secret key (never leaves the master)
    keys/client.key[_secret]   the keypair of control clients on this machine (CLI, Python API)
    keys/slave.key[_secret]    a shared slave keypair (`run --local`, slaves started by hand)
    keys/slaves/H.key[_secret] per-host slave keypairs (`ticketfarm keys add-slave H`, the playbooks)
    authorized/slaves/*.key    public keys of slaves the master accepts
    authorized/clients/*.key   public keys of control clients (submit sweeps and Python functions)

Key files use ZeroMQ's certificate format (zmq.auth), all written with mode 0600. An authorised
slave key may carry `slave-names = "h1"` in its metadata: a slave with that key can only register
under those names ("*" or no entry: any name). Removing a file from authorized/ revokes the key
within `keys_reload_interval` seconds, with no master restart.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
import zmq
import zmq.auth
from zmq.utils import z85

from ticketfarm.errors import KeyFileError

log = structlog.get_logger("ticketfarm.keys")

SLAVE = "slave"
CLIENT = "client"
#: The role of a peer on the master's inproc endpoint (its own HTTP threads): no CURVE there.
LOCAL = "local"
#: ZAP domain of the master's socket.
ZAP_DOMAIN = b"ticketfarm"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"



# -- files ------------------------------------------------------------------------------------
def keys_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "keys"


def authorized_dir(state_dir: Path, role: str) -> Path:
    return Path(state_dir) / "authorized" / f"{role}s"


def write_keypair(directory: Path, name: str, metadata: dict[str, str] | None = None) -> tuple[Path, Path]:
    """directory/name.key (public) and name.key_secret, both 0600; returns (public, secret)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    old = os.umask(0o077)
    try:
        public, secret = zmq.auth.create_certificates(str(directory), name, metadata)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    public_key, _ = load_keypair(secret)
    _write_public(Path(public), public_key, metadata)  # pyzmq leaves the metadata out of the public file
    return Path(public), Path(secret)


def ensure_keypair(directory: Path, name: str, metadata: dict[str, str] | None = None) -> tuple[Path, Path]:
    """Like write_keypair, but keeps a keypair that is already there."""
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    if not secret.exists():
        return write_keypair(directory, name, metadata)
    if not public.exists():  # the secret file holds the public key too
        pub, _ = load_keypair(secret)
        _write_public(public, pub, metadata)
    return public, secret


def _write_public(path: Path, public: bytes, metadata: dict[str, str] | None = None) -> None:
    lines = ["#   ZeroMQ CURVE public key (ticketfarm)", "metadata"]
    lines += [f'    {k} = "{v}"' for k, v in (metadata or {}).items()]
    lines += ["curve", f'    public-key = "{public.decode()}"', ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines))
    os.chmod(path, 0o600)


def load_keypair(path: Path | str) -> tuple[bytes, bytes]:
    """(public, secret) from a .key_secret file."""
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{path}: cannot read the CURVE secret key: {exc}") from None
    if not secret:
        raise KeyFileError(f"{path}: holds no secret key (a .key_secret file is needed)")
    return public, secret


def load_public(path: Path | str) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{path}: cannot read the CURVE public key: {exc}") from None
    return public


def _metadata(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    section = ""
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line.startswith((" ", "\t")):
            section = line.strip()
        elif section == "metadata" and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip().strip('"')
    return out


def init_state_keys(state_dir: Path) -> list[Path]:
    """The master, client and shared slave keypairs, authorised; returns the files it created."""
    made: list[Path] = []
    kdir = keys_dir(state_dir)
    for name, role in (("master", None), ("client", CLIENT), ("slave", SLAVE)):
        if (kdir / f"{name}.key_secret").exists():
            ensure_keypair(kdir, name)
            continue
        made += write_keypair(kdir, name, {"slave-names": "*"} if role == SLAVE else None)
        if role is not None:  # only a fresh pair is authorised: a revoked one stays revoked
            authorize(state_dir, role, name, kdir / f"{name}.key")
    return made


def add_slave(state_dir: Path, name: str) -> tuple[Path, Path]:
    """A per-host slave keypair under keys/slaves/, authorised for slave name `name` only."""
    if not name or "/" in name or name.startswith("."):
        raise KeyFileError(f"bad slave name {name!r}: use a host-like name (no '/', not starting with '.')")
    public, secret = ensure_keypair(keys_dir(state_dir) / "slaves", name, {"slave-names": name})
    authorize(state_dir, SLAVE, name, public, replace=False)
    return public, secret


def authorize(state_dir: Path, role: str, name: str, public_file: Path, replace: bool = True) -> Path:
    """Copy a public key file into authorized/<role>s/<name>.key (0600)."""
    target = authorized_dir(state_dir, role) / f"{name}.key"
    if target.exists() and not replace:
        return target
    load_public(public_file)  # refuse a file that is no key
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    shutil.copyfile(public_file, tmp)
    os.chmod(tmp, 0o600)
    tmp.replace(target)
    return target


def remove_slave(state_dir: Path, name: str) -> bool:
    """Revoke slave `name` and delete its keypair under keys/slaves/ (a host taken out of the cluster)."""
    revoked = revoke(state_dir, SLAVE, name)
    deleted = False
    for suffix in (".key", ".key_secret"):
        try:
            (keys_dir(state_dir) / "slaves" / f"{name}{suffix}").unlink()
            deleted = True
        except FileNotFoundError:
            pass
    return revoked or deleted


def revoke(state_dir: Path, role: str, name: str) -> bool:
    target = authorized_dir(state_dir, role) / f"{name}.key"
    try:
        target.unlink()
    except FileNotFoundError:
        return False
    return True


# -- the authorised keys ----------------------------------------------------------------------
@dataclass(frozen=True)
class Peer:
    """An authorised key: its role, the file it came from, and the slave names it may use."""

    role: str
    name: str
    slave_names: frozenset[str] | None = None  # None: any name
    key: bytes = b""  # the public key, z85

    def may_be_slave(self, slave_name: str) -> bool:
        return self.slave_names is None or slave_name in self.slave_names


class KeyRing:
    """The authorised public keys (z85) of slaves and clients, re-read when the directories change.

    Read by the ZAP thread and the master loop; `refresh()` swaps in a new dict (no lock needed).
    """

    def __init__(self, slaves_dir: Path, clients_dir: Path):
        self.dirs = {SLAVE: Path(slaves_dir), CLIENT: Path(clients_dir)}
        self._peers: dict[bytes, Peer] = {}
        self._stamp: tuple = ()
        self.refresh()

    def _scan_stamp(self) -> tuple:
        stamp = []
        for role, d in self.dirs.items():
            try:
                with os.scandir(d) as it:
                    for e in it:
                        if e.name.endswith(".key"):
                            st = e.stat()
                            stamp.append((role, e.name, st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                continue
        return tuple(sorted(stamp))

    def refresh(self) -> bool:
        """Reload when a key file was added, removed or changed; True when something changed."""
        stamp = self._scan_stamp()
        if stamp == self._stamp:
            return False
        peers: dict[bytes, Peer] = {}
        for role, d in self.dirs.items():
            for path in sorted(d.glob("*.key")) if d.is_dir() else []:
                try:
                    public = load_public(path)
                    names = _metadata(path).get("slave-names", "*")
                except (KeyFileError, OSError) as exc:
                    log.warning("bad_key_file", path=str(path), error=str(exc))
                    continue
                allowed = None if names.strip() == "*" else frozenset(n.strip() for n in names.split(",") if n.strip())
                peers.setdefault(public, Peer(role, path.stem, allowed, public))
        if self._stamp:
            log.info("keys_reloaded", slaves=sum(p.role == SLAVE for p in peers.values()),
                     clients=sum(p.role == CLIENT for p in peers.values()))
        self._peers = peers
        self._stamp = stamp
        return True

    def lookup(self, public_z85: bytes) -> Peer | None:
        return self._peers.get(public_z85)

    def __len__(self) -> int:
        return len(self._peers)


class ZapHandler:
    """ZeroMQ's ZAP (RFC 27) for one context: CURVE clients are let in only with an authorised key.

    A thread answering on inproc://zeromq.zap.01 (asyncio-free). The user id of an accepted peer is
    its public key (z85); the master looks each message's key up in the ring again, so a revoked
    key is refused from the next message on.
    """

    #: how many refused keys `refusals()` remembers (the oldest is forgotten first)
    REFUSALS_KEPT = 256

    def __init__(self, context: zmq.Context, ring: KeyRing):
        self.ring = ring
        self._refused: dict[str, dict[str, object]] = {}
        self._refused_lock = threading.Lock()
        self.socket = context.socket(zmq.REP)
        self.socket.linger = 0
        self.socket.bind(ZAP_ENDPOINT)
        self._stop_r, self._stop_w = os.pipe()
        self.thread = threading.Thread(target=self._run, name="ticketfarm-zap", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self._stop_r, zmq.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._stop_r in ready:
                break
            try:
                request = self.socket.recv_multipart()
            except zmq.ZMQError:
                break
            try:
                reply = self.answer(request)
            except Exception:  # noqa: BLE001 - this thread must never die: without it ZeroMQ would let anyone in
                log.exception("zap_failed")
                reply = [b"1.0", request[1] if len(request) > 1 else b"", b"500", b"internal error", b"", b""]
            self.socket.send_multipart(reply)
        self.socket.close(linger=0)

    def answer(self, request: list[bytes]) -> list[bytes]:
        """The ZAP reply to one request: 200 with the key as user id, or 400."""
        if len(request) < 6:
            return [b"1.0", b"", b"500", b"malformed ZAP request", b"", b""]
        version, rid, domain, address, _identity, mechanism = request[:6]
        addr = address.decode(errors="replace")
        if version != b"1.0":
            return [b"1.0", rid, b"500", b"unknown ZAP version", b"", b""]
        if mechanism != b"CURVE" or len(request) < 7 or len(request[6]) != 32:
            log.warning("peer_refused", address=addr, reason=f"mechanism {mechanism.decode(errors='replace')}")
            return [version, rid, b"400", b"CURVE required", b"", b""]
        key = z85.encode(request[6])
        peer = self.ring.lookup(key)
        if peer is None:
            self.ring.refresh()  # a key authorised a moment ago counts at once
            peer = self.ring.lookup(key)
        if peer is None:
            log.warning("peer_refused", address=addr, key=key.decode(), reason="key not authorised")
            self._note_refused(key.decode(), addr, "key not authorised")
            return [version, rid, b"400", b"key not authorised", b"", b""]
        self._forget_refused(key.decode())
        log.info("peer_authenticated", address=addr, role=peer.role, key_name=peer.name)
        return [version, rid, b"200", b"OK", key, b""]

    def _note_refused(self, key: str, address: str, reason: str) -> None:
        with self._refused_lock:
            self._refused.pop(key, None)
            self._refused[key] = {"key": key, "address": address, "reason": reason, "at": time.time()}
            while len(self._refused) > self.REFUSALS_KEPT:
                del self._refused[next(iter(self._refused))]

    def _forget_refused(self, key: str) -> None:
        with self._refused_lock:
            self._refused.pop(key, None)

    def refusals(self) -> list[dict[str, object]]:
        """Keys refused since they last got in: key (z85), address, reason, time; for `ticketfarm deploy`'s checks."""
        with self._refused_lock:
            return list(self._refused.values())

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        self.thread.join(2)
        os.close(self._stop_r)
        os.close(self._stop_w)


# -- the client side ----------------------------------------------------------------------------
@dataclass
class ClientKeys:
    """What a DEALER needs to reach a CURVE master: the master's public key and its own keypair."""

    server_public: bytes
    public: bytes
    secret: bytes

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret

    @classmethod
    def load(cls, master_public: Path | str, secret: Path | str) -> "ClientKeys":
        public, sec = load_keypair(secret)
        return cls(load_public(master_public), public, sec)

    @classmethod
    def from_dir(cls, directory: Path | str, name: str = "client") -> "ClientKeys | None":
        """keys dir with master.key and NAME.key_secret, or None when it has none (an insecure master)."""
        d = Path(directory)
        if not (d / "master.key").exists() or not (d / f"{name}.key_secret").exists():
            return None
        return cls.load(d / "master.key", d / f"{name}.key_secret")


def client_keys_for(state_dir: Path | None, keys: Path | str | None = None) -> ClientKeys | None:
    """A client's keys: an explicit keys dir, else $TICKETFARM_KEYS, else STATE/keys; None when none exist."""
    explicit = keys or os.environ.get("TICKETFARM_KEYS")
    if explicit:
        found = ClientKeys.from_dir(explicit)
        if found is None:
            raise KeyFileError(f"{explicit}: no master.key and client.key_secret here: copy them from the master's "
                               "state dir (STATE/keys), or pass --keys DIR of a dir that holds them")
        return found
    if state_dir is None:
        return None
    return ClientKeys.from_dir(keys_dir(state_dir))


# -- `ticketfarm keys ...` / `python -m ticketfarm.keys` ------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ticketfarm keys", description="Manage CURVE keys of a master state dir.")
    parser.add_argument("--state", type=Path, default=Path(os.environ.get("TICKETFARM_STATE", ".ticketfarm")))
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The key subcommands (the caller provides --state)."""
    sub = parser.add_subparsers(dest="keys_command", required=True)
    sub.add_parser("init", help="create the master, client and shared slave keypairs (kept when present)")
    p = sub.add_parser("add-slave", help="create keys/slaves/NAME.key[_secret] and authorise it for slave NAME "
                                         "(kept when present)")
    p.add_argument("names", nargs="+", metavar="name")
    p = sub.add_parser("remove-slave", help="revoke slave NAME and delete its keypair under keys/slaves/")
    p.add_argument("names", nargs="+", metavar="name")
    p = sub.add_parser("authorize", help="authorise a public key file as a slave or a client")
    p.add_argument("role", choices=(SLAVE, CLIENT))
    p.add_argument("name")
    p.add_argument("public_key", type=Path)
    p = sub.add_parser("revoke", help="remove an authorised key (takes effect without a master restart)")
    p.add_argument("role", choices=(SLAVE, CLIENT))
    p.add_argument("name")
    sub.add_parser("list", help="authorised keys")


def run(args: argparse.Namespace) -> int:
    state = args.state
    try:
        if args.keys_command == "init":
            for path in init_state_keys(state):
                print(f"wrote {path}")
        elif args.keys_command == "add-slave":
            for name in args.names:
                known = (authorized_dir(state, SLAVE) / f"{name}.key").exists() and \
                    (keys_dir(state) / "slaves" / f"{name}.key_secret").exists()
                public, secret = add_slave(state, name)
                # "made" tells the playbooks (and you) that something was written
                print(f"{'kept' if known else 'made'} slave {name}: {secret} "
                      f"(copy to the host with {keys_dir(state) / 'master.key'})")
        elif args.keys_command == "remove-slave":
            for name in args.names:
                print(f"{'removed' if remove_slave(state, name) else 'no keys of'} slave {name}")
        elif args.keys_command == "authorize":
            print(authorize(state, args.role, args.name, args.public_key))
        elif args.keys_command == "revoke":
            if not revoke(state, args.role, args.name):
                print(f"no authorised {args.role} key named {args.name!r}; `ticketfarm keys list` shows them",
                      file=sys.stderr)
                return 1
            print(f"revoked {args.role} {args.name}")
        elif args.keys_command == "list":
            for role in (SLAVE, CLIENT):
                for path in sorted(authorized_dir(state, role).glob("*.key")):
                    print(f"{role:7} {path.stem:20} {load_public(path).decode()}")
    except KeyFileError as exc:
        print(f"ticketfarm keys: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


def dealer(context: zmq.Context, endpoint: str, keys: ClientKeys | None, hwm: int = 1000) -> zmq.Socket:
    """A DEALER connected to a master: CURVE with `keys`, plain TCP (or inproc) without; LINGER 0."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    if keys is not None:
        keys.apply(sock)
    sock.connect(endpoint)
    return sock
