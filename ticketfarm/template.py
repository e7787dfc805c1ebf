"""Placeholder templates (`{name}`) shared by master and slave: parsing, checking and rendering."""
from __future__ import annotations

import re
import shlex
import shutil
from typing import Any, Callable, Iterable, Mapping

from ticketfarm.errors import ConfigError

_TOKEN = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")

#: Placeholders every template may use besides the sweep's parameters.
BUILTINS = ("ticket", "task", "sweep", "workdir", "attempt")

#: The shell of `command` lines: bash with pipefail where bash exists (so `a | b` fails when `a` does),
#: else POSIX sh, which has no pipefail (dash: a pipeline's status is its last command's).
SHELL = ["bash", "-o", "pipefail", "-c"] if shutil.which("bash") else ["/bin/sh", "-c"]


def placeholders(template: str) -> list[str]:
    """Names used in a template, in order of appearance."""
    return [m.group(1) for m in _TOKEN.finditer(template) if m.group(1)]


def check(template: str, known: Iterable[str], source: str, field: str) -> None:
    """Raise ConfigError naming the file and field if the template uses an unknown placeholder."""
    allowed = set(known) | set(BUILTINS)
    for name in placeholders(template):
        if name not in allowed:
            raise ConfigError(f"{source}: {field}: unknown placeholder {{{name}}} "
                              f"(known: {', '.join(sorted(allowed))}; write {{{{ and }}}} for literal braces)",
                              field=field)


def check_shell(template: str, source: str, field: str) -> None:
    """Raise ConfigError naming the file and field if a placeholder of a shell template sits inside quotes the user
    wrote: every value is shell-quoted already, and quotes around it would let a value containing that quote
    character end them and run as shell code."""
    for name, start, end in _quoted_placeholders(template):
        quote, segment = template[start], template[start:end]
        why = ("a value containing ' ends them and the rest runs as shell code" if quote == "'" else
               "inside double quotes the quoting is undone and a value's $(...) or `...` runs as shell code")
        raise ConfigError(f"{source}: {field}: placeholder {{{name}}} is inside the quotes of {segment}: every value "
                          f"is shell-quoted already, and {why}; write {_unquoted(segment)} instead", field=field)


def _unquoted(segment: str) -> str:
    """A quoted string with its placeholders moved out of the quotes: "out {x}.txt" -> "out "{x}".txt"."""
    quote, body, pieces, at = segment[0], segment[1:-1], [], 0
    for token in _TOKEN.finditer(body):
        if token.group(1):
            if body[at:token.start()]:
                pieces.append(quote + body[at:token.start()] + quote)
            pieces.append(token.group(0))
            at = token.end()
    if body[at:]:
        pieces.append(quote + body[at:] + quote)
    return "".join(pieces)


def _quoted_placeholders(line: str) -> list[tuple[str, int, int]]:
    """(name, start, end) of each placeholder inside a single- or double-quoted string of a shell line, with that
    string's span; a command substitution `$(...)` inside double quotes is a fresh context of its own."""
    found: list[tuple[str, int, int]] = []
    stack: list[tuple[str, int, list[str]]] = []  # open quote or "$(", where it started, its placeholders
    i = 0
    while i < len(line):
        quote = stack[-1][0] if stack else ""
        token = _TOKEN.match(line, i)
        if token:
            if token.group(1) and quote in ("'", '"', "$'"):
                stack[-1][2].append(token.group(1))
            i = token.end()
            continue
        ch, pair = line[i], line[i:i + 2]
        if quote == "'":
            if ch == "'":
                found += _closed(stack.pop(), i + 1)
        elif ch == "\\":
            i += 1  # the next character is literal (in $'...' too)
        elif quote == "$'":
            if ch == "'":
                found += _closed(stack.pop(), i + 1)
        elif pair == "$(":
            stack.append(("$(", i, []))
            i += 1
        elif quote == '"':
            if ch == '"':
                found += _closed(stack.pop(), i + 1)
        elif ch == ")" and quote == "$(":
            stack.pop()
        elif pair == "$'":
            stack.append(("$'", i + 1, []))
            i += 1
        elif ch in "'\"":
            stack.append((ch, i, []))
        i += 1
    return found


def _closed(opened: tuple[str, int, list[str]], end: int) -> list[tuple[str, int, int]]:
    _, start, names = opened
    return [(name, start, end) for name in names]


def render(template: str, values: Mapping[str, Any], quote: Callable[[str], str] = str) -> str:
    """Fill placeholders; `quote` is applied to each value (shlex.quote for shell command lines)."""

    def substitute(m: re.Match[str]) -> str:
        if m.group(0) == "{{":
            return "{"
        if m.group(0) == "}}":
            return "}"
        return quote(str(values[m.group(1)]))

    return _TOKEN.sub(substitute, template)


def shell_argv(line: str) -> list[str]:
    """The argv that runs a rendered command line in SHELL."""
    return [*SHELL, line]


def render_shell(template: str, values: Mapping[str, Any]) -> str:
    """A shell command line where every value is one literal word, whatever it contains."""
    return render(template, values, shlex.quote)
