"""The controller's half of the playbooks: check the master's keys, wait until slaves registered, drain a slave."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from ticketfarm import keys
from ticketfarm.client.control import control
from ticketfarm.errors import MasterUnreachable, RolloutError

#: seconds between two looks at the master while waiting
POLL = 0.3


class Master:
    """A running master as the controller reaches it: its address and the keys dir it is deployed with."""

    def __init__(self, endpoint: str, keys_state: Path, insecure: bool = False, timeout: float = 5.0):
        self.endpoint = endpoint
        self.keys_state = Path(keys_state).resolve()
        self.timeout = timeout
        self.client_keys = None if insecure else self._client_keys()

    def _client_keys(self) -> keys.ClientKeys:
        found = keys.ClientKeys.from_dir(keys.keys_dir(self.keys_state))
        if found is None:
            raise RolloutError(
                f"{keys.keys_dir(self.keys_state)}: no master.key and client.key_secret: ticketfarm_keys_state must "
                f"be the master's state dir (a master makes its keys there when it first starts), or pass "
                f"-e ticketfarm_keys_init=true to make new master keys (every slave then gets new keys too)")
        return found

    def ask(self, op: str, **fields: Any) -> dict[str, Any]:
        """One control operation; RolloutError saying why when the master does not answer."""
        try:
            reply = control(self.endpoint, op, timeout=self.timeout, keys=self.client_keys, **fields)
        except MasterUnreachable:
            raise RolloutError(self._why_silent()) from None
        if not reply.get("ok"):
            raise RolloutError(f"the master at {self.endpoint} refused {op}: {reply.get('error')}")
        return reply

    def _why_silent(self) -> str:
        """Tell a master that is not there from one that runs with other keys (the socket monitor's events)."""
        if self.client_keys is None:
            return f"no master answers at {self.endpoint} (plain TCP); start it first"
        sock = keys.dealer(zmq.Context.instance(), self.endpoint, self.client_keys)
        monitor = sock.get_monitor_socket()
        seen: set[int] = set()
        deadline = time.monotonic() + 2.0
        try:
            while time.monotonic() < deadline and not seen & {zmq.EVENT_HANDSHAKE_SUCCEEDED,
                                                              zmq.EVENT_HANDSHAKE_FAILED_AUTH}:
                if monitor.poll(100):
                    seen.add(int(recv_monitor_message(monitor)["event"]))
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
        master_key = keys.keys_dir(self.keys_state) / "master.key"
        if zmq.EVENT_HANDSHAKE_FAILED_AUTH in seen:
            return (f"the master at {self.endpoint} refused the client key "
                    f"{keys.keys_dir(self.keys_state) / 'client.key_secret'}: it keeps its keys in another state dir "
                    f"than ticketfarm_keys_state={self.keys_state}; point ticketfarm_keys_state at it")
        if zmq.EVENT_CONNECTED in seen:
            return (f"the master at {self.endpoint} does not complete a CURVE handshake with {master_key}: it runs "
                    f"with other keys than ticketfarm_keys_state={self.keys_state}, so no slave given that key could "
                    f"get in; refusing to push it. Point ticketfarm_keys_state at the running master's state dir")
        return (f"no master listens at {self.endpoint}: start it first (`ticketfarm --state {self.keys_state} master`, "
                f"or deploy it with playbooks/site.yml)")

    def live(self) -> dict[str, Any]:
        return self.ask("live_slaves")


def check(master: Master, expect_state: Path | None) -> dict[str, Any]:
    """The master answers with our keys and, if `expect_state` is given, keeps its state there."""
    live = master.live()
    actual = Path(live["state_dir"])
    if expect_state is not None and actual != Path(expect_state).resolve():
        expected = Path(expect_state).resolve()
        raise RolloutError(f"the master at {master.endpoint} keeps its state in {actual}, but the playbooks would "
                           f"authorise the slaves' keys in {expected}: make the two the same "
                           f"(ticketfarm_keys_state, or ticketfarm_master_state for a master deployed by master.yml)")
    return {"state_dir": str(actual), "slaves": sorted(live["slaves"])}


def _slave_key(keys_state: Path, name: str) -> str | None:
    path = keys.keys_dir(keys_state) / "slaves" / f"{name}.key"
    try:
        return keys.load_public(path).decode()
    except keys.KeyFileError:
        return None


def not_registered_reason(master: Master, live: dict[str, Any], name: str, waited: float) -> str:
    """Why slave `name` is not connected, as far as the master can tell."""
    key = _slave_key(master.keys_state, name)
    for refusal in live.get("refused", []):
        if refusal.get("key") == key:
            return (f"the master at {master.endpoint} refused the key of slave {name} ({refusal.get('reason')}, from "
                    f"{refusal.get('address')}): its public key {keys.keys_dir(master.keys_state)}/slaves/{name}.key "
                    f"is not among the master's authorised keys ({live.get('state_dir')}/authorized/slaves/)")
    return (f"slave {name} did not register with the master at {master.endpoint} within {waited:.0f}s and the master "
            f"saw no refused key from it: check that the host reaches that address and read the slave's log")


def wait_registered(master: Master, names: list[str], timeout: float, undrain: bool = False) -> dict[str, Any]:
    """Wait until every named slave is connected; report each one's state, and undrain those asked for."""
    started = time.monotonic()
    while True:
        live = master.live()
        missing = [n for n in names if n not in live["slaves"]]
        if not missing or time.monotonic() - started >= timeout:
            break
        time.sleep(POLL)
    undrained = []
    if undrain:
        for name in names:
            if name in live["draining"] and name not in missing:
                master.ask("undrain", slave=name)
                undrained.append(name)
    waited = time.monotonic() - started
    return {"slaves": {n: {"registered": n not in missing,
                           "reason": not_registered_reason(master, live, n, waited) if n in missing else ""}
                       for n in names},
            "undrained": undrained, "changed": bool(undrained), "seconds": round(waited, 1)}


def drain(master: Master, name: str, timeout: float) -> dict[str, Any]:
    """Stop giving slave `name` tickets and wait up to `timeout` s until it holds none (the rest go back on restart)."""
    if name not in master.live()["slaves"]:
        return {"changed": False, "drained": False, "tickets": 0, "detail": f"slave {name} is not connected"}
    master.ask("drain", slave=name)
    started = time.monotonic()
    while True:
        slave = master.live()["slaves"].get(name)
        tickets = slave["tickets"] if slave else 0
        if not tickets or time.monotonic() - started >= timeout:
            break
        time.sleep(POLL)
    return {"changed": True, "drained": True, "tickets": tickets, "seconds": round(time.monotonic() - started, 1),
            "detail": f"{tickets} tickets handed back at the restart" if tickets else "no tickets left"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ticketfarm.rollout", description=__doc__)
    parser.add_argument("--master", required=True, help="the master's address as the controller reaches it")
    parser.add_argument("--keys-state", type=Path, required=True,
                        help="the controller's keys dir (ticketfarm_keys_state): client keys and slaves' keys")
    parser.add_argument("--insecure", action="store_true", help="a master with insecure = true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="the master answers with these keys (and keeps its state in EXPECT_STATE)")
    p.add_argument("--expect-state", type=Path)
    p = sub.add_parser("wait", help="wait until the named slaves are registered; JSON report per slave")
    p.add_argument("names", nargs="+")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--undrain", action="store_true", help="give registered draining slaves tickets again")
    p = sub.add_parser("drain", help="drain a connected slave and wait until it holds no tickets")
    p.add_argument("name")
    p.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    try:
        master = Master(args.master, args.keys_state, args.insecure)
        if args.command == "check":
            out = check(master, args.expect_state)
        elif args.command == "wait":
            out = wait_registered(master, args.names, args.timeout, args.undrain)
        else:
            out = drain(master, args.name, args.timeout)
    except (RolloutError, keys.KeyFileError) as exc:
        print(f"ticketfarm rollout: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
