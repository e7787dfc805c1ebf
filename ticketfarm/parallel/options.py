"""GNU parallel's command line: options (bundled short flags, `--name=value`), the command, its input sources.

Options end at the first word that is not one (or at `--`), as GNU parallel's own parser does; the command's words
run up to the first `:::`, `::::`, `:::+` or `::::+`. An option this front door does not implement is refused by
its name, never ignored.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ticketfarm.errors import ParallelUsage

SEPARATORS = (":::", "::::", ":::+", "::::+")
#: GNU parallel options that are refused with a hint of what to do instead (the rest are refused plainly).
HINTS = {
    "S": "run slaves on those machines and pass --master ADDR", "sshlogin": "run slaves on those machines and pass "
    "--master ADDR", "u": "output is always grouped per job", "ungroup": "output is always grouped per job",
    "line-buffer": "output is always grouped per job", "pipe": "give the data as arguments or files",
    "q": "quote inside the command yourself", "quote": "quote inside the command yourself",
    "halt": "failed jobs are counted in the exit code", "plus": "use {} {.} {/} {//} {/.} {#} and {n...}",
}


@dataclass
class Source:
    """One input source: arguments from the command line (`:::`), or a file of them (`::::`, `-a`; "-" is stdin)."""

    values: list[str] | None = None
    path: str | None = None
    linked: bool = False
    """`:::+` / `::::+`: paired element by element with the source before it, instead of multiplied by it."""


@dataclass
class Options:
    """One `ticketfarm parallel` command line, parsed."""

    command: list[str] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    jobs: str | None = None
    """-j as given (N, +N, -N, N%, 0); None: one job per CPU core."""
    keep_order: bool = False
    bar: bool = False
    joblog: str | None = None
    results: str | None = None
    timeout: float | None = None
    retries: int = 1
    """Attempts per job at most (GNU parallel's --retries N runs a failing job N times in all)."""
    resume: bool = False
    resume_failed: bool = False
    colsep: re.Pattern[str] | None = None
    delimiter: str = "\n"
    no_run_if_empty: bool = False
    dry_run: bool = False
    verbose: bool = False
    tagstring: str | None = None
    master: str | None = None
    state: str | None = None
    local: bool = False
    help: bool = False


Handler = Callable[[Options, str], None]


def _set(attr: str, convert: Callable[[str], object] = str) -> Handler:
    return lambda opts, value: setattr(opts, attr, convert(value))


def _flag(attr: str) -> Handler:
    return lambda opts, _: setattr(opts, attr, True)


def _ignore(opts: Options, value: str) -> None:
    """Options about GNU parallel itself (citation notice, default grouping): nothing to do here."""


def jobs_value(value: str) -> str:
    if not re.fullmatch(r"[+-]?\d+%?", value):
        raise ParallelUsage(f"-j {value}: give N, +N, -N, N% or 0 (a file of job counts is not supported)")
    return value


def duration(value: str) -> float:
    """--timeout: seconds, or with units as GNU parallel writes them (1h30m, 2.5s, 1d)."""
    units = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+(?:\.\d*)?|\.\d+)([smhd]?)", value)
    if not parts or "".join(n + u for n, u in parts) != value or (len(parts) > 1 and not all(u for _, u in parts)):
        hint = " (a percentage of the median run time is not supported)" if value.endswith("%") else ""
        raise ParallelUsage(f"--timeout {value}: give seconds, e.g. 30, 2.5 or 1h30m{hint}")
    seconds = sum(float(n) * units[u] for n, u in parts)
    if seconds <= 0:
        raise ParallelUsage(f"--timeout {value}: must be more than 0 seconds")
    return seconds


def retries(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise ParallelUsage(f"--retries {value}: give the number of attempts, 1 or more (GNU parallel's 0 retries "
                            "a failing job without end)")
    return int(value)


def regex(value: str) -> re.Pattern[str]:
    try:
        return re.compile(value)
    except re.error as exc:
        raise ParallelUsage(f"--colsep {value!r}: not a regular expression: {exc}") from None


def unescape(value: str) -> str:
    """-d: backslash escapes as GNU parallel reads them (\\n, \\t, \\0, \\r, \\\\)."""
    escapes = {"n": "\n", "t": "\t", "0": "\0", "r": "\r", "\\": "\\"}
    return re.sub(r"\\(.)", lambda m: escapes.get(m.group(1), m.group(0)), value)


def _arg_file(opts: Options, path: str) -> None:
    opts.sources.append(Source(path=path))


def _tag(opts: Options, _: str) -> None:
    opts.tagstring = "{}"


#: Long option name -> (takes a value, handler).
LONG: dict[str, tuple[bool, Handler]] = {
    "jobs": (True, _set("jobs", jobs_value)), "max-procs": (True, _set("jobs", jobs_value)),
    "keep-order": (False, _flag("keep_order")), "bar": (False, _flag("bar")),
    "joblog": (True, _set("joblog")), "results": (True, _set("results")), "res": (True, _set("results")),
    "timeout": (True, _set("timeout", duration)), "retries": (True, _set("retries", retries)),
    "resume": (False, _flag("resume")), "resume-failed": (False, _flag("resume_failed")),
    "colsep": (True, _set("colsep", regex)), "arg-file": (True, _arg_file),
    "null": (False, lambda opts, _: setattr(opts, "delimiter", "\0")), "delimiter": (True, _set("delimiter", unescape)),
    "no-run-if-empty": (False, _flag("no_run_if_empty")),
    "dry-run": (False, _flag("dry_run")), "dryrun": (False, _flag("dry_run")), "verbose": (False, _flag("verbose")),
    "tag": (False, _tag), "tagstring": (True, _set("tagstring")),
    "will-cite": (False, _ignore), "no-notice": (False, _ignore), "group": (False, _ignore), "gnu": (False, _ignore),
    "help": (False, _flag("help")), "local": (False, _flag("local")), "master": (True, _set("master")), "state": (True, _set("state")),
}
#: Short option letter -> its long name.
SHORT = {"h": "help", "j": "jobs", "P": "max-procs", "k": "keep-order", "C": "colsep", "a": "arg-file", "0": "null",
         "d": "delimiter", "r": "no-run-if-empty", "v": "verbose"}


def usage() -> str:
    """--help: the command line's shape and every option accepted."""
    letters = {long: short for short, long in SHORT.items()}
    names = ", ".join(f"-{letters[n]}/--{n}" if n in letters else f"--{n}" for n in sorted(LONG))
    return ("usage: ticketfarm parallel [OPTIONS] [COMMAND [ARGS...]] [::: VALUES...] [:::: FILES...] [:::+ ...]\n"
            "       (no ::: and no :::: : one argument per line of stdin)\n"
            f"options: {names}\n"
            "replacement strings: {} {.} {/} {//} {/.} {#} and {n} {n.} {n/} {n//} {n/.} (n from 1, or -1)\n"
            "GNU parallel's behaviour and what differs: docs/PARALLEL.md\n")


def parse(argv: list[str]) -> Options:
    """Options, command and sources of a `ticketfarm parallel` command line (the words after `parallel`)."""
    opts = Options()
    i = 0
    while i < len(argv) and argv[i] not in SEPARATORS:
        word = argv[i]
        i += 1
        if word == "--":
            break
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            takes, handler = _long(name)
            if takes and not eq:
                value, i = _value(argv, i, word)
            elif eq and not takes:
                raise ParallelUsage(f"option --{name} takes no value (got {word!r})")
            handler(opts, value)
        elif word.startswith("-") and len(word) > 1:
            i = _short_bundle(opts, word, argv, i)
        else:
            i -= 1
            break
    while i < len(argv) and argv[i] not in SEPARATORS:
        opts.command.append(argv[i])
        i += 1
    opts.sources += _sources(argv[i:])
    _check(opts)
    return opts


def anchor(opts: Options, cwd: Path) -> None:
    """Relative file names (argument files, --joblog, --results) name files in `cwd`, the user's directory."""
    for source in opts.sources:
        if source.path is not None and source.path != "-":
            source.path = str(cwd / source.path)
    if opts.joblog is not None:
        plus = "+" if opts.joblog.startswith("+") else ""
        opts.joblog = plus + str(cwd / opts.joblog[len(plus):])
    if opts.results is not None:
        opts.results = str(cwd / opts.results)


def _long(name: str) -> tuple[bool, Handler]:
    if name in LONG:
        return LONG[name]
    hint = f": {HINTS[name]}" if name in HINTS else ""
    raise ParallelUsage(f"option --{name} is not supported by ticketfarm parallel{hint} (see docs/PARALLEL.md)")


def _short_bundle(opts: Options, word: str, argv: list[str], i: int) -> int:
    """-kj4, -j 4, -0: letters in one word, the last one's value glued on or in the next word."""
    for pos, letter in enumerate(word[1:], 1):
        if letter not in SHORT:
            hint = f": {HINTS[letter]}" if letter in HINTS else ""
            raise ParallelUsage(f"option -{letter} is not supported by ticketfarm parallel{hint} (see docs/PARALLEL.md)")
        takes, handler = LONG[SHORT[letter]]
        if not takes:
            handler(opts, "")
            continue
        value = word[pos + 1:]
        if not value:
            value, i = _value(argv, i, f"-{letter}")
        handler(opts, value)
        break
    return i


def _value(argv: list[str], i: int, option: str) -> tuple[str, int]:
    if i >= len(argv):
        raise ParallelUsage(f"option {option} needs a value")
    return argv[i], i + 1


def _sources(words: list[str]) -> list[Source]:
    """`::: a b` is one source of arguments; `:::: f g` one source per file; a `+` links to the source before."""
    sources: list[Source] = []
    i = 0
    while i < len(words):
        separator = words[i]
        end = i + 1
        while end < len(words) and words[end] not in SEPARATORS:
            end += 1
        group, linked = words[i + 1:end], separator.endswith("+")
        if separator.startswith("::::"):
            sources += [Source(path=path, linked=linked) for path in group]
        else:
            sources.append(Source(values=group, linked=linked))
        i = end
    return sources


def _check(opts: Options) -> None:
    if (opts.resume or opts.resume_failed) and not (opts.joblog or opts.results):
        raise ParallelUsage("--resume and --resume-failed need --joblog FILE or --results DIR")
    if opts.results and (re.search(r"\.(csv|tsv|json)$", opts.results, re.I) or "{" in opts.results):
        raise ParallelUsage(f"--results {opts.results}: only a plain directory is supported (no .csv/.tsv/.json "
                            "file, no replacement strings)")
    if opts.master and opts.local:
        raise ParallelUsage("--local and --master exclude each other: run here, or on the master at ADDR")
    if opts.sources and opts.sources[0].linked:
        raise ParallelUsage(f"{':::+' if opts.sources[0].values is not None else '::::+'} needs a source before it "
                            "to link to")
