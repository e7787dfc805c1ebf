"""Input sources to jobs: arguments and argument files read, linked sources paired, the rest multiplied, --colsep.

As in GNU parallel, the first source varies slowest (`::: a b ::: 1 2` is a 1, a 2, b 1, b 2), linked sources
(`:::+`) pair their values and stop at the shortest, and --colsep splits every argument into columns that the
positional replacement strings ({1}, {2}, ...) count across all sources.
"""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from typing import BinaryIO

from ticketfarm.errors import ParallelUsage
from ticketfarm.parallel.options import Options, Source
from ticketfarm.spec import MAX_TASKS


@dataclass
class Job:
    """One job: its sequence number ({#}, the joblog's Seq) and its arguments, one per positional {n}."""

    seq: int
    args: list[str]


def read_jobs(opts: Options, stdin: BinaryIO) -> list[Job]:
    """Every job of the command line in GNU parallel's order (arguments from stdin when no source is given)."""
    sources = opts.sources or [Source(path="-")]
    groups: list[list[list[str]]] = []
    for source in sources:
        values = source.values if source.values is not None else _read_file(source.path or "-", opts.delimiter, stdin)
        if source.linked:
            groups[-1].append(values)
        else:
            groups.append([values])
    rows = [list(zip(*group)) for group in groups]
    total = math.prod(len(r) for r in rows)
    if total > MAX_TASKS:
        raise ParallelUsage(f"the input sources make {total} jobs, over the limit of {MAX_TASKS}: split the run")
    jobs = []
    for combo in itertools.product(*rows):
        args = [value for row in combo for value in row]
        if opts.colsep is not None:
            args = [column for value in args for column in opts.colsep.split(value)]
        jobs.append(args)
    if opts.no_run_if_empty:
        jobs = [args for args in jobs if any(a.strip() for a in args)]
    return [Job(seq, args) for seq, args in enumerate(jobs, 1)]


def _read_file(path: str, delimiter: str, stdin: BinaryIO) -> list[str]:
    """One argument per line (or per `delimiter`); a last delimiter ends the last argument, it adds none."""
    if path == "-":
        data = stdin.read()
    else:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise ParallelUsage(f"cannot open input file {path}: {exc.strerror}") from None
    if not data:
        return []
    values = os.fsdecode(data).split(delimiter)
    if values[-1] == "":
        values.pop()
    return values
