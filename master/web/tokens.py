"""HTTP API tokens: named, with scopes, kept as SHA-256 hashes in STATE/http-tokens.json; changes apply live."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ticketfarm.config import load_toml
from ticketfarm.errors import ConfigError

#: The tokens file under the state dir (0600; holds hashes only, never a token).
TOKENS_FILE = "http-tokens.json"
#: What a token may do: read (every GET), submit (sweeps and their changes), admin (slaves, master-side code).
SCOPES = ("read", "submit", "admin")
#: Seconds between two looks at the token files' modification times.
RELOAD_INTERVAL = 0.5


def hash_token(token: str) -> str:
    """What is stored for a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class TokenEntry:
    """One named token: its hash, its scopes, when it was made."""

    name: str
    sha256: str
    scopes: list[str] = field(default_factory=lambda: list(SCOPES))
    created: float = 0.0


def tokens_path(state_dir: Path) -> Path:
    return state_dir / TOKENS_FILE


def load_tokens(state_dir: Path) -> list[TokenEntry]:
    path = tokens_path(state_dir)
    try:
        data = json.loads(path.read_text())
        return [TokenEntry(**t) for t in data["tokens"]]
    except FileNotFoundError:
        return []
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a tokens file ({exc})", field="tokens") from None


def save_tokens(state_dir: Path, entries: list[TokenEntry]) -> None:
    """Write the tokens file atomically (a reader never sees half of it), mode 0600."""
    path = tokens_path(state_dir)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"tokens": [asdict(e) for e in entries]}, fh, indent=1)
    tmp.replace(path)


def check_scopes(scopes: list[str]) -> list[str]:
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise ConfigError(f"scopes must be some of {', '.join(SCOPES)}, got {', '.join(scopes) or 'none'}",
                          field="scopes")
    return [s for s in SCOPES if s in scopes]


def add_token(state_dir: Path, name: str, scopes: list[str], replace: bool = False) -> str:
    """A fresh token under `name` (returned once, only its hash is kept); `replace` revokes a previous one."""
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ConfigError(f"token name {name!r}: letters, digits, '-', '_' and '.' only", field="name")
    entries = load_tokens(state_dir)
    if any(e.name == name for e in entries) and not replace:
        raise ConfigError(f"a token named {name!r} exists: revoke it first", field="name")
    token = secrets.token_urlsafe(32)
    entries = [e for e in entries if e.name != name]
    entries.append(TokenEntry(name, hash_token(token), check_scopes(scopes), time.time()))
    save_tokens(state_dir, entries)
    return token


def revoke_token(state_dir: Path, name: str) -> bool:
    entries = load_tokens(state_dir)
    kept = [e for e in entries if e.name != name]
    if len(kept) == len(entries):
        return False
    save_tokens(state_dir, kept)
    return True


def config_hashes(text: str) -> list[str]:
    """The digests of master.toml's http_token_hash (comma-separated, an optional "sha256:" prefix)."""
    return [h.strip().lower().removeprefix("sha256:") for h in text.split(",") if h.strip()]


class TokenSet:
    """The tokens the API accepts now: the tokens file's, and master.toml's http_token_hash (every scope).

    Both files are looked at again at most every RELOAD_INTERVAL, and at once for a token not known yet: an added
    token works immediately and a revoked one is refused within RELOAD_INTERVAL, with no restart.
    """

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self._files = (tokens_path(state_dir), state_dir / "master.toml")
        self._stamp: tuple[object, ...] = ()
        self._next_look = 0.0
        self._lock = threading.Lock()
        self.entries: list[TokenEntry] = []
        self.refresh()

    def _stamps(self) -> tuple[object, ...]:
        out: list[object] = []
        for path in self._files:
            try:
                st = path.stat()
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except FileNotFoundError:
                out.append(None)
        return tuple(out)

    def refresh(self, now_please: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            if now < self._next_look and not now_please:
                return
            self._next_look = now + RELOAD_INTERVAL
            stamp = self._stamps()
            if stamp == self._stamp:
                return
            entries = load_tokens(self.state_dir)
            toml = self._files[1]
            if toml.exists():
                hashes = config_hashes(str(load_toml(toml).get("http_token_hash", "")))
                entries += [TokenEntry(f"master.toml#{i + 1}", h) for i, h in enumerate(hashes)]
            self.entries, self._stamp = entries, stamp

    def __len__(self) -> int:
        self.refresh()
        return len(self.entries)

    def scopes_of(self, token: str) -> set[str] | None:
        """The scopes of a token, or None when it is not (or no longer) one of ours."""
        self.refresh()
        digest = hash_token(token)
        found = self._match(digest)
        if found is None:  # a token added a moment ago works at once: look at the files now (a stat each)
            self.refresh(now_please=True)
            found = self._match(digest)
        return set(found.scopes) if found is not None else None

    def _match(self, digest: str) -> TokenEntry | None:
        found = None
        for entry in self.entries:  # compare with every hash: no early exit
            if hmac.compare_digest(digest, entry.sha256):
                found = entry
        return found
