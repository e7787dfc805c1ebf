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
