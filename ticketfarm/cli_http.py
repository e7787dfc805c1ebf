"""The CLI's submit, cancel, collect and token commands when they go through the HTTP API."""
from __future__ import annotations

import argparse
import base64
import copy
import re
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from master.collect import READ_SIZE, claim, parts, tar_entries, write_chunks, write_entries
from master.config import load_master_config, master_config_path
from master.stats import table
from master.web.tokens import (
    SCOPES,
    add_token,
    check_scopes,
    config_hashes,
    hash_token,
    load_tokens,
    revoke_token,
    tokens_path,
)
from ticketfarm.client.http import (
    TOKEN_FILE,
    ApiClient,
    api_url_from_config,
    find_token,
)
from ticketfarm.config import load_toml
from ticketfarm.errors import ConfigError, KeyFileError
from ticketfarm.keys import client_keys_for
from ticketfarm.spec import CollectRule, load_spec

API = "/api/v1"


def http_api(args: argparse.Namespace, needed: bool = False) -> ApiClient | None:
    """The API client the CLI should use: --http or $TICKETFARM_HTTP; else the config's http_bind, only when asked
    to (--token), when the control protocol cannot do it (`needed`) or has no CURVE client keys to do it with.
    None: use the control protocol."""
    url = getattr(args, "http", None)
    cafile = None
    if master_config_path(args.state).exists():
        try:
            config = load_master_config(args.state)
        except ConfigError:
            config = None
        if config is not None:
            if not (url or needed or getattr(args, "token", None)) and _has_control_keys(args, config):
                return None
            url = url or api_url_from_config(config)
            # HTTPS with the master's own certificate: trust it (a self-signed one works too)
            cafile = str(args.state / config.http_tls_cert) if config.http_tls_cert else None
    if not url:
        return None
    return ApiClient(url, find_token(args.state, getattr(args, "token", None)), cafile=cafile)


def _has_control_keys(args: argparse.Namespace, config: Any) -> bool:
    """Whether the control protocol can reach this master: it is insecure, or CURVE client keys are at hand."""
    if config.insecure:
        return True
    try:
        return client_keys_for(args.state, getattr(args, "keys", None)) is not None
    except KeyFileError:
        return False


def cancel(api: ApiClient, sweep: str) -> int:
    api.post(f"{API}/sweeps/{quote(sweep, safe='')}/cancel")
    print(f"{sweep}: cancelled")
    return 0


def submit(api: ApiClient, spec_path: Path, callback: str | None = None, secret: str | None = None) -> int:
    """Validate the spec here (errors name file and line), then send it with the files it names."""
    sweep = load_spec(spec_path)
    spec, files = spec_with_files(spec_path)
    if sweep.cwd:
        spec["cwd"] = sweep.cwd  # "spec" and "submit" mean this machine's directories, resolved here
    body: dict[str, Any] = {"spec": spec, "files": files}
    if callback:
        body["status_callback_url"] = callback
    if secret:
        body["status_callback_secret"] = secret
    reply = api.post(f"{API}/sweeps", body)
    print(f"{sweep.name}: {reply['state']} ({reply['tasks']} tasks)")
    return 0


def spec_with_files(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The spec as an object, each file it names renamed to a plain name and attached (base64)."""
    spec = copy.deepcopy(load_toml(path))
    files: dict[str, Any] = {}

    def attach(holder: dict[str, Any], key: str) -> None:
        if isinstance(holder.get(key), str):
            source = path.parent / holder[key]
            name = f"file{len(files)}-{re.sub(r'[^A-Za-z0-9_.-]', '_', Path(holder[key]).name)}"
            files[name] = {"base64": base64.b64encode(source.read_bytes()).decode()}
            holder[key] = name

    if isinstance(spec.get("parameters"), dict):
        for key in ("csv", "jsonl"):
            attach(spec["parameters"], key)
    for item in spec.get("inputs") or []:
        if isinstance(item, dict):
            for key in ("source", "template_file"):
                attach(item, key)
    return spec, files


def collect(api: ApiClient, sweep: str, out: Path, remove: bool) -> int:
    """Write every collection rule of the sweep under `out`: the bytes `ticketfarm collect` writes from the store."""
    base = f"{API}/sweeps/{quote(sweep, safe='')}"
    detail = api.get(base)
    rules = [CollectRule(**rule) for rule in detail["spec"]["collect"]]
    written = []
    todo = parts(sweep, rules, detail["failed"] > 0)
    claim(out, sweep, [part.path for part in todo])
    for part in todo:
        target = out / part.path
        query = f"?format={part.format}" + (f"&result={quote(part.result)}" if part.result else "")
        with api.stream(f"{base}/collect{query}") as response:
            if part.format == "folders":
                write_entries(target, tar_entries(response))
            else:
                write_chunks(target, iter(lambda: response.read(READ_SIZE), b""))
        written.append(target)
    for path in written:
        print(path)
    if remove:
        api.post(f"{base}/results", method="DELETE")
    return 0


def make_token(state_dir: Path, write: bool) -> int:
    """Print a fresh API token; with write, it becomes the "default" token (the previous one stops working)."""
    if not write:
        token = secrets.token_urlsafe(32)
        print(f"token: {token}\nhttp_token_hash entry: {hash_token(token)}")
        return 0
    _need_master_config(state_dir)
    token_path = state_dir / TOKEN_FILE
    if token_path.exists():
        _drop_config_hash(state_dir, hash_token(token_path.read_text().strip()))
    token = add_token(state_dir, "default", list(SCOPES), replace=True)
    token_path.touch(mode=0o600)
    token_path.chmod(0o600)
    token_path.write_text(token + "\n")
    print(f"wrote the token to {token_path} (mode 0600) and its hash to {tokens_path(state_dir)}; "
          "the previous default token no longer works (no restart needed)")
    print(token)
    return 0


def token_add(state_dir: Path, name: str, scopes: list[str]) -> int:
    _need_master_config(state_dir)
    token = add_token(state_dir, name, scopes)
    print(f"token {name!r} ({', '.join(check_scopes(scopes))}), shown once:\n{token}")
    return 0


def token_revoke(state_dir: Path, name: str) -> int:
    if not revoke_token(state_dir, name):
        raise ConfigError(f"no token named {name!r} in {tokens_path(state_dir)}; `ticketfarm token list` shows them",
                          field="name")
    print(f"revoked {name!r}: refused from now on")
    return 0


def token_list(state_dir: Path) -> int:
    rows = [[e.name, ",".join(e.scopes), time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created))]
            for e in load_tokens(state_dir)]
    print(table(["name", "scopes", "created"], rows) if rows else "no named tokens")
    return 0


def _need_master_config(state_dir: Path) -> None:
    if not master_config_path(state_dir).exists():
        raise ConfigError(f"{master_config_path(state_dir)}: no master config (run `ticketfarm init` first)")


def _drop_config_hash(state_dir: Path, digest: str) -> None:
    """Take a replaced token's hash out of master.toml's http_token_hash (where older versions put it)."""
    path = master_config_path(state_dir)
    text = path.read_text()
    match = re.search(r'^http_token_hash = "([^"]*)"$', text, re.M)
    if match and digest in config_hashes(match.group(1)):
        kept = ",".join(h for h in config_hashes(match.group(1)) if h != digest)
        path.write_text(text[:match.start()] + f'http_token_hash = "{kept}"' + text[match.end():])
