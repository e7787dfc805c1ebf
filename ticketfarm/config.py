"""The config base both sides share: TOML reading, typed dataclasses built from it, commented templates."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
from pathlib import Path
from typing import Any

from ticketfarm.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def load_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; errors name the file and the position."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def build(cls: type, data: dict[str, Any], source: str) -> Any:
    """A dataclass from a dict, refusing unknown keys and wrongly typed values by name."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown field {key!r} (known: {', '.join(sorted(fields))})", field=key)
        expected = type(fields[key].default)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            data[key] = float(value)
        elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(f"{source}: field {key!r} must be {expected.__name__}, got {value!r}", field=key)
    return cls(**data)


def to_toml(obj: Any) -> str:
    """A dataclass rendered as commented TOML (field docstrings become comments)."""
    docs = _field_docs(type(obj))
    lines = []
    for f in dataclasses.fields(obj):
        if f.name in docs:
            lines.append(f"# {docs[f.name]}")
        lines.append(f"{f.name} = {_toml_value(getattr(obj, f.name))}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings, read from the class source (they are the documentation of each field)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[stmt.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[attr-defined]
    return docs
