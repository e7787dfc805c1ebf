"""The `ticketfarm parallel` verb: its place in the CLI's parser, and `main` for a command line's words."""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from ticketfarm.client.statedir import default_state_dir
from ticketfarm.errors import ParallelUsage
from ticketfarm.parallel import options
from ticketfarm.parallel.run import Streams, run

#: GNU parallel's exit code for its own errors (a bad option, an unreadable input file).
EXIT_USAGE = 255


def add_parser(sub: Any) -> None:
    """`ticketfarm parallel WORDS...`: every word after the verb is GNU parallel's, parsed by options.parse."""
    p = sub.add_parser("parallel", add_help=False, prefix_chars="\0",
                       help="run a GNU parallel command line (COMMAND ::: ARGS ...) as a sweep; see docs/PARALLEL.md")
    p.add_argument("words", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda args: main(args.words, args.state, args.master, args.keys, args.log_level))


def main(words: list[str], state: Path | None = None, master: str | None = None, keys_dir: Path | None = None,
         log_level: str = "warning", streams: Streams | None = None, cwd: Path | None = None) -> int:
    """Run one command line; `state`, `master` and `keys_dir` are the CLI's global options (the state dir is read
    only when --master or --state asks for a running master)."""
    streams = streams or Streams(sys.stdin.buffer, sys.stdout.buffer, sys.stderr.buffer)
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if on_main_thread else None
    try:
        cwd = (cwd or Path.cwd()).resolve()
        opts = options.parse(words)
        options.anchor(opts, cwd)
        if opts.help:
            streams.stdout.write(options.usage().encode())
            return 0
        runner = None
        if opts.master or opts.state or master:
            from ticketfarm.parallel.remote import RemoteMaster

            runner = RemoteMaster.find(Path(opts.state) if opts.state else (state or default_state_dir()),
                                       opts.master or master, keys_dir).run
        return run(opts, streams, cwd, runner, log_level)
    except ParallelUsage as exc:
        streams.stderr.write(f"ticketfarm parallel: {exc}\n".encode(errors="replace"))
        streams.stderr.flush()
        return EXIT_USAGE
    except KeyboardInterrupt:
        streams.stderr.write(b"ticketfarm parallel: interrupted; with --joblog, --resume runs the jobs not done\n")
        return 130
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _terminated(*_: object) -> None:
    """SIGTERM ends a run as Ctrl-C does: jobs killed, the state dir removed, the joblog kept."""
    raise KeyboardInterrupt
