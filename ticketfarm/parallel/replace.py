"""GNU parallel's replacement strings and shell quoting: a job's command line, exactly as parallel writes it.

Supported: {} {.} {/} {//} {/.} {#}, and the positional forms {n} {n.} {n/} {n//} {n/.} (n from 1, or -1 for the
last argument). Each value is shell-quoted as parallel quotes it; a command with no replacement string gets the
arguments appended; a job with no command runs its arguments as the command. {%} (the job slot), {= perl =} and
{0} are refused by name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from ticketfarm.errors import ParallelUsage

_REPLACEMENT = re.compile(r"\{(-?\d+)?(\.|/|//|/\.)?\}|\{#\}|\{%\}|\{=.*?=\}", re.S)
#: Characters that need no quoting (parallel's shell_quote_scalar_default).
_PLAIN = re.compile(r"[-_.+a-zA-Z0-9/]*")


def quote(value: str) -> str:
    """parallel's quoting for Bourne shells: as is when plain, else in '...' with ' written as '"'"'."""
    if value == "":
        return "''"
    if _PLAIN.fullmatch(value):
        return value
    quoted = "'" + value.replace("'", "'\"'\"'") + "'"
    return quoted.removeprefix("''").removesuffix("''")


def strip_extension(value: str) -> str:
    return re.sub(r"\.[^/.]*$", "", value, count=1)


def basename(value: str) -> str:
    return re.sub(r".*/", "", value, count=1)


def dirname(value: str) -> str:
    """Perl's File::Basename::dirname on Unix, which GNU parallel's {//} uses ("a" -> ".", "a/b/" -> "a")."""
    directory, base = _fileparse(value)
    directory = _strip_trailing_slashes(directory)
    if not base:
        directory = _strip_trailing_slashes(_fileparse(directory)[0])
    return directory


def _fileparse(path: str) -> tuple[str, str]:
    match = re.match(r"(.*/)?(.*)", path, re.S)
    assert match is not None
    return match.group(1) or "./", match.group(2)


def _strip_trailing_slashes(path: str) -> str:
    return re.sub(r"(.)/*\Z", r"\1", path, count=1, flags=re.S)


TRANSFORMS: dict[str, Callable[[str], str]] = {
    "": lambda v: v, ".": strip_extension, "/": basename, "//": dirname,
    "/.": lambda v: strip_extension(basename(v)),
}


@dataclass(frozen=True)
class Replacement:
    """One replacement string of the command: which argument (None: all of them, 0: {#}) and which transform."""

    position: int | None
    transform: str


class CommandTemplate:
    """The command words of a `ticketfarm parallel` line, joined with spaces, ready to render per job."""

    def __init__(self, words: list[str]):
        self.text = " ".join(words)
        self.parts: list[str | Replacement] = []
        at = 0
        for match in _REPLACEMENT.finditer(self.text):
            self.parts.append(self.text[at:match.start()])
            self.parts.append(_replacement(match))
            at = match.end()
        self.parts.append(self.text[at:])
        self.has_replacements = len(self.parts) > 1

    def render(self, args: list[str], seq: int, quoted: bool = True) -> str:
        """The job's command line; `quoted=False` gives the values as they are (for --tagstring)."""
        q = quote if quoted else (lambda v: v)
        if not self.text:
            return " ".join(args)
        if not self.has_replacements:
            return self.text + " " + " ".join(q(a) for a in args)
        out = []
        for part in self.parts:
            out.append(part if isinstance(part, str) else _value(part, args, seq, q))
        return "".join(out)


def _replacement(match: re.Match[str]) -> Replacement:
    whole = match.group(0)
    if whole == "{#}":
        return Replacement(0, "")
    if whole == "{%}":
        raise ParallelUsage("replacement string {%} (the job slot) is not supported: slots belong to slaves; "
                            "use {#} to number jobs")
    if whole.startswith("{="):
        raise ParallelUsage(f"replacement string {whole} is not supported: perl expressions do not run here; use "
                            "{} {.} {/} {//} {/.} {#} or their {n...} forms")
    position = match.group(1)
    if position is not None and int(position) == 0:
        raise ParallelUsage(f"replacement string {whole} is not supported: positions count from 1 (or -1 from the "
                            "end)")
    return Replacement(None if position is None else int(position), match.group(2) or "")


def _value(r: Replacement, args: list[str], seq: int, q: Callable[[str], str]) -> str:
    if r.position == 0:
        return str(seq)
    transform = TRANSFORMS[r.transform]
    if r.position is None:
        return " ".join(q(transform(a)) for a in args)
    index = r.position - 1 if r.position > 0 else len(args) + r.position
    if not 0 <= index < len(args):
        return ""  # parallel: a position with no argument is empty, not even quoted
    return q(transform(args[index]))
