"""The options every `ticketfarm` verb shares (before or after the verb), what they lead to, and `--local [N]`."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from master.config import load_master_config, master_config_path
from ticketfarm import keys
from ticketfarm.client.control import client_endpoint
from ticketfarm.errors import ConfigError, KeyFileError, MasterUnreachable
from ticketfarm.logs import LEVELS

#: Where a list of arguments ends for the command line's own options (what follows is a command's).
END_OF_OPTIONS = ("--", ":::", "::::")
#: Verbs that parse every word after them themselves (GNU parallel's options, its command line).
OWN_WORDS_VERBS = ("parallel",)
#: What `--format` offers the views: a table for people, JSON (stable, documented in docs/CLI.md) for scripts.
FORMATS = ("table", "json")


def core_count() -> int:
    """The CPUs this process may run on (its affinity mask, as taskset or a batch job set it), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def add_global_options(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """The shared options; with defaults=False (on each verb) they keep what was given before the verb."""

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--state", type=Path, default=default(None),
                        help="master state directory (default: $TICKETFARM_STATE, else for `run SPEC --local` "
                             ".ticketfarm beside SPEC, else ./.ticketfarm)")
    parser.add_argument("--master", default=default(None),
                        help="address of a running master (default: from the state dir's config)")
    parser.add_argument("--log-level", type=str.lower, choices=LEVELS,
                        default=default(os.environ.get("TICKETFARM_LOG", "warning")),
                        help="log level: " + ", ".join(LEVELS) + " (default: $TICKETFARM_LOG, else warning)")
    parser.add_argument("--log-json", action="store_true", default=default(False), help="logs as JSON lines")
    parser.add_argument("--http", default=default(os.environ.get("TICKETFARM_HTTP")), metavar="URL",
                        help="use this master's HTTP API (default: $TICKETFARM_HTTP, or http_bind of the config)")
    parser.add_argument("--token", default=default(None),
                        help="HTTP API token (default: $TICKETFARM_TOKEN, or STATE/http.token)")
    parser.add_argument("--keys", type=Path, default=default(None),
                        help="dir with master.key and client.key_secret for CURVE (default: $TICKETFARM_KEYS, "
                             "or STATE/keys)")


class VerbParser(argparse.ArgumentParser):
    """A verb's parser: it takes the shared options too, so they work after the verb (`run x.toml --state D`).

    Sub-verbs get this class as well (argparse makes a parser's subparsers of its own class). A verb's own option
    of the same name replaces the shared one there (`run --http HOST:PORT` serves the API)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("conflict_handler", "resolve")
        super().__init__(*args, **kwargs)
        if "-" in self.prefix_chars:  # a verb that takes its words as they come (no "-" options) parses them itself
            add_global_options(self, defaults=False)


def check_log_level(level: str) -> str:
    """$TICKETFARM_LOG is a default argparse does not check: a wrong one is refused like a wrong --log-level."""
    if level not in LEVELS:
        raise ConfigError(f"$TICKETFARM_LOG={level!r} is not a log level: use one of {', '.join(LEVELS)}",
                          field="log_level")
    return level


def bare_local(argv: list[str]) -> list[str]:
    """`--local` with no N after it (`run x.toml --local`, `run --local x.toml`) means one slave per core."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in END_OF_OPTIONS or arg in OWN_WORDS_VERBS:
            break
        if arg == "--local" and (i + 1 == len(out) or not out[i + 1].isdigit()):
            out[i] = f"--local={core_count()}"
    return out


def endpoint(args: argparse.Namespace) -> str:
    """The running master's address: --master, else the state dir's config's bind as seen from this machine."""
    if args.master:
        return args.master
    if not master_config_path(args.state).exists():
        raise MasterUnreachable(f"no master config in {args.state}, so no master to ask: pass --master ADDRESS or "
                                "--state DIR of a master's state dir (`ticketfarm master` starts one there)")
    return client_endpoint(load_master_config(args.state).bind)


def client_keys(args: argparse.Namespace) -> keys.ClientKeys | None:
    """The client's CURVE keys: --keys, $TICKETFARM_KEYS or STATE/keys; None for an insecure master."""
    if not args.keys and master_config_path(args.state).exists() and load_master_config(args.state).insecure:
        return None
    try:
        return keys.client_keys_for(args.state, args.keys)
    except KeyFileError as exc:
        raise ConfigError(str(exc)) from None
