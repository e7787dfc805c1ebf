"""`python -m ticketfarm.client.pylocal`: a master plus N local slaves in a child process of a `Cluster(local=N)`.

Prints one JSON line `{"endpoint": ..., "slaves": [pid, ...]}` on stdout once the master is bound,
then serves until its stdin closes (the parent exited or closed the cluster) or SIGTERM/SIGINT.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from master.config import MasterConfig
from ticketfarm.client.local import LocalCluster
from ticketfarm.logs import configure_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ticketfarm.client.pylocal")
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--slaves", type=int, default=2)
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--prefetch", type=int, default=64)
    parser.add_argument("--heartbeat", type=float, default=1.0)
    parser.add_argument("--liveness", type=int, default=5)
    parser.add_argument("--durability", choices=("full", "normal"), default="full")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    configure_logging(args.log_level, False)
    config = MasterConfig(bind="tcp://127.0.0.1:*", heartbeat_interval=args.heartbeat, liveness=args.liveness,
                          durability=args.durability, deadline_grace=max(3.0, 3 * args.heartbeat))
    cluster = LocalCluster(args.state, args.slaves, args.slots, config, args.log_level,
                           slave_args=("--prefetch", str(args.prefetch)))
    master = cluster.master
    signal.signal(signal.SIGTERM, lambda *_: master.stop())
    signal.signal(signal.SIGINT, lambda *_: master.stop())

    def watch_parent() -> None:
        sys.stdin.buffer.read()  # returns at EOF: the parent closed the pipe or died
        master.stop()

    threading.Thread(target=watch_parent, daemon=True).start()
    keys = None if config.insecure else str(cluster.state_dir / "keys")
    print(json.dumps({"endpoint": master.endpoint, "slaves": [p.pid for p in cluster.slaves], "keys": keys}),
          flush=True)
    try:
        master.serve()
    finally:
        # Every stop is the user's (Ctrl-C, close(), the script's end): what the slaves ran goes back at no cost.
        cluster.close(interrupted=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
