"""Checked reading of header fields for the message codecs: types, ranges, list lengths, payload frame counts.

Every check raises `ProtocolError` naming the command and the field ("RESULT: field 'results[2].outputs[0].size'
must be a non-negative integer"), so a dropped message says what was wrong with it.
"""
from __future__ import annotations

from typing import Any, NoReturn

from ticketfarm.errors import ProtocolError
from ticketfarm.protocol import Message

#: Entries in any list of a header at most (ticket ids, results, tickets of a batch, settled tasks).
MAX_ITEMS = 100_000
#: Characters in a name-like string field at most (sweep, output, platform, reason is cut, not refused).
MAX_TEXT = 4096
#: Readable reasons are cut to this many characters (they end up in logs and in the store).
MAX_REASON = 4500

_MISSING: Any = object()


def bad(command: str, name: str, what: str) -> NoReturn:
    raise ProtocolError(f"{command}: field {name!r} must be {what}")


def is_number(value: Any) -> bool:
    return type(value) is int or type(value) is float


def count(command: str, name: str, value: Any, maximum: int | None = None, minimum: int = 0) -> int:
    """An integer in [minimum, maximum] (non-negative by default)."""
    if type(value) is not int or value < minimum or (maximum is not None and value > maximum):
        word = "a non-negative integer" if minimum == 0 else f"an integer >= {minimum}"
        bad(command, name, word + (f" <= {maximum}" if maximum is not None else ""))
    return value


def text(command: str, name: str, value: Any, limit: int = MAX_TEXT, empty: bool = True) -> str:
    if type(value) is not str or len(value) > limit or (not empty and not value):
        bad(command, name, f"a {'' if empty else 'non-empty '}string of at most {limit} characters")
    return value


def relative_path(command: str, name: str, value: Any) -> str:
    """A path inside a work dir: relative, no `..`, `.` or empty parts, no backslash or NUL (slaves check symlinks)."""
    path = text(command, name, value, empty=False)
    if path.startswith("/") or "\\" in path or "\x00" in path or any(p in ("", ".", "..") for p in path.split("/")):
        bad(command, name, "a relative path inside the work dir (no '..', no leading '/')")
    return path


def counts(command: str, name: str, value: Any) -> list[int]:
    """A list of non-negative integers (ticket ids, sizes), at most MAX_ITEMS long."""
    if type(value) is not list or len(value) > MAX_ITEMS:
        bad(command, name, f"a list of at most {MAX_ITEMS} non-negative integers")
    for i, n in enumerate(value):
        if type(n) is not int or n < 0:
            bad(command, f"{name}[{i}]", "a non-negative integer")
    return value


def items(command: str, name: str, value: Any) -> list[Any]:
    """A list of at most MAX_ITEMS entries (each checked by the caller)."""
    if type(value) is not list or len(value) > MAX_ITEMS:
        bad(command, name, f"a list of at most {MAX_ITEMS} entries")
    return value


def text_map(command: str, name: str, value: Any) -> dict[str, str]:
    """An object whose values are strings (env, results)."""
    if type(value) is not dict or len(value) > MAX_ITEMS:
        bad(command, name, "an object of strings")
    for key, v in value.items():
        if type(v) is not str:
            bad(command, f"{name}.{key}", "a string")
    return value


class Header:
    """The fields of one message's header, read with their checks; `command` names the message in errors."""

    __slots__ = ("command", "fields", "payload")

    def __init__(self, msg: Message):
        self.command = msg.command.name
        self.fields = msg.header
        self.payload = msg.payload

    @classmethod
    def of(cls, label: str, fields: dict[str, Any], payload: list[bytes] | None = None) -> "Header":
        """A reader of fields that are not a whole header (a nested object, a CONTROL op's fields), errors naming
        `label` ("WELCOME policy", "CONTROL py_add")."""
        reader = cls.__new__(cls)
        reader.command, reader.fields, reader.payload = label, fields, payload or []
        return reader

    def _get(self, name: str, default: Any) -> Any:
        value = self.fields.get(name, _MISSING)
        if value is _MISSING or (value is None and default is not _MISSING):
            if default is _MISSING:
                bad(self.command, name, "present")
            return default
        return value

    def fail(self, name: str, what: str) -> NoReturn:
        bad(self.command, name, what)

    def count(self, name: str, default: Any = _MISSING, maximum: int | None = None, minimum: int = 0) -> int:
        value = self._get(name, default)
        return value if value is default else count(self.command, name, value, maximum, minimum)

    def integer(self, name: str, default: Any = _MISSING) -> int:
        value = self._get(name, default)
        if value is not default and type(value) is not int:
            bad(self.command, name, "an integer")
        return value

    def number(self, name: str, default: Any = _MISSING) -> float:
        value = self._get(name, default)
        if value is not default and not is_number(value):
            bad(self.command, name, "a number")
        return value

    def flag(self, name: str, default: Any = _MISSING) -> bool:
        value = self._get(name, default)
        if value is not default and type(value) is not bool:
            bad(self.command, name, "true or false")
        return value

    def text(self, name: str, default: Any = _MISSING, limit: int = MAX_TEXT, empty: bool = True) -> str:
        value = self._get(name, default)
        return value if value is default else text(self.command, name, value, limit, empty)

    def reason(self, name: str = "reason", default: str = "") -> str:
        """A readable reason of any length, cut to MAX_REASON characters."""
        value = self._get(name, default)
        if type(value) is not str:
            bad(self.command, name, "a string")
        return value[:MAX_REASON]

    def choice(self, name: str, choices: tuple[str, ...], default: Any = _MISSING) -> str:
        value = self._get(name, default)
        if value is not default and value not in choices:
            bad(self.command, name, "one of " + ", ".join(repr(c) for c in choices))
        return value

    def counts(self, name: str, default: Any = _MISSING) -> list[int]:
        value = self._get(name, default)
        return value if value is default else counts(self.command, name, value)

    def items(self, name: str) -> list[Any]:
        return items(self.command, name, self._get(name, _MISSING))

    def text_map(self, name: str, default: Any = _MISSING) -> dict[str, str]:
        value = self._get(name, default)
        return value if value is default else text_map(self.command, name, value)

    def obj(self, name: str, default: Any = _MISSING) -> dict[str, Any]:
        value = self._get(name, default)
        if value is not default and type(value) is not dict:
            bad(self.command, name, "an object")
        return value

    def frames(self, n: int, what: str = "") -> list[bytes]:
        """Exactly `n` payload frames."""
        if len(self.payload) != n:
            raise ProtocolError(f"{self.command}: expected {n} payload frame{'s' * (n != 1)}"
                                f"{' (' + what + ')' if what else ''}, got {len(self.payload)}")
        return self.payload

    def one_frame(self, what: str = "") -> bytes:
        return self.frames(1, what)[0]
