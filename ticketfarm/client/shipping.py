"""How a function travels to the slaves: by reference for installed code, by value for the user's own files.

Remote tracebacks of code that travelled by value are named back to those files.
"""
from __future__ import annotations

import linecache
import re
import site
import sys
import sysconfig
import types
from pathlib import Path
from typing import Any, Callable

import cloudpickle

#: where installed code lives: functions from modules here are pickled by reference (the slaves import them)
INSTALLED = tuple(str(Path(p).resolve()) for p in {*site.getsitepackages(), site.getusersitepackages(),
                                                   sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]})
#: cloudpickle names the code it pickles by value so (its payload stays deterministic)
DYNAMIC_FRAME = re.compile(r'^(\s*)File "<dynamic-code>", line (\d+), in (\S+)$')


def by_value_if_own(fn: Callable[..., Any]) -> None:
    """A function from the user's own file (a module not installed anywhere, like `example.py` beside the
    script) travels by value, as `__main__`'s do: a slave on another machine could not import it."""
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    path = getattr(module, "__file__", None)
    if module is None or module.__name__ == "__main__" or not path:
        return
    if not str(Path(path).resolve()).startswith(INSTALLED):
        cloudpickle.register_pickle_by_value(module)


def named_traceback(tb: str) -> str:
    """The remote traceback with each frame of by-value code given its file and source line, when a function of
    that name in `__main__` or a by-value module covers that line."""
    lines = []
    for line in tb.splitlines(keepends=True):
        m = DYNAMIC_FRAME.match(line.rstrip("\n"))
        path = m and source_file(m.group(3), int(m.group(2)))
        if not path:
            lines.append(line)
            continue
        indent, number = m.group(1), int(m.group(2))
        lines.append(f'{indent}File "{path}", line {number}, in {m.group(3)}\n')
        if source := linecache.getline(path, number).strip():
            lines.append(f"{indent}  {source}\n")
    return "".join(lines)


def source_file(name: str, line: int) -> str | None:
    """The file of the function called NAME in `__main__` or a by-value module whose code has LINE."""
    by_value = sorted(cloudpickle.list_registry_pickle_by_value())
    modules = [sys.modules.get("__main__"), *(sys.modules.get(m) for m in by_value)]
    for module in filter(None, modules):
        for value in vars(module).values():
            code = getattr(value, "__code__", None)
            if isinstance(code, types.CodeType) and code.co_name == name and any(
                    line == number for _, _, number in code.co_lines()):
                return code.co_filename
    return None
