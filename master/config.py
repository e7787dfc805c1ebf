"""Typed configuration: every master tunable with its default, read once from master.toml."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from master.batch import QueueSpec
from ticketfarm.config import build, load_toml, to_toml
from ticketfarm.errors import ConfigError


@dataclass
class MasterConfig:
    """The master's settings (state_dir/master.toml)."""

    bind: str = "tcp://127.0.0.1:5555"
    """ZeroMQ endpoint the master's ROUTER socket binds to (slaves and control clients connect here)."""
    heartbeat_interval: float = 1.0
    """Seconds between heartbeats in both directions."""
    liveness: int = 5
    """Heartbeat intervals of silence after which a peer is presumed dead."""
    deadline_grace: float = 10.0
    """Seconds added to a ticket's timeout before the master gives up on it (the slave kills at the timeout)."""
    unrunnable_grace: float = 10.0
    """Seconds after the master starts (time for slaves to connect) before a sweep that no connected slave can run
    (a platform, CPUs or memory none offers, or no slave at all) is reported unrunnable; re-checked as slaves come."""
    commit_interval: float = 0.02
    """Longest time (s) a finished result waits for its group commit while messages keep arriving."""
    insecure: bool = False
    """Plain TCP with no authentication: only for a trusted network. The master warns at every start."""
    secret_key: str = "keys/master.key_secret"
    """The master's CURVE secret key file (relative paths: to the state dir); made at first start if missing."""
    authorized_slaves: str = "authorized/slaves"
    """Directory of slave public keys (*.key) the master accepts; edits take effect without a restart."""
    authorized_clients: str = "authorized/clients"
    """Directory of control-client public keys (*.key): only these may submit sweeps and Python functions."""
    keys_reload_interval: float = 1.0
    """Seconds between checks of the authorised-key directories (a revoked key is dropped within this time)."""
    max_message_size: int = 8 * 1024 * 1024
    """Largest message (bytes) the master accepts; larger ones are dropped by ZeroMQ."""
    durability: str = "full"
    """SQLite synchronous mode: "full" survives power loss, "normal" survives a killed master process."""
    keep_days: float = 30.0
    """Uncollected results are kept this many days (then pruned, with events older than that)."""
    prune_every_hours: float = 6.0
    """Hours between two prunings of expired results (the first runs a few seconds after start)."""
    validate_workers: int = 2
    """Threads that run result validators, off the master's event loop."""
    slave_on_no_work: str = ""
    """Told to slaves at WELCOME: "stay" or "exit" when every sweep is over ("" = each slave's own on_no_work)."""
    slave_delete_workers: str = ""
    """Told to slaves at WELCOME: "yes" or "no", delete fetched worker executables on exit ("" = the slave's own)."""
    progress_bytes: int = 64 * 1024
    """How much of each running ticket's recent output the master keeps for progress views."""
    slave_exit_when_done: bool = False
    """Tell slaves at WELCOME to exit when the master shuts down, whatever their own setting (True for `run --local`)."""
    log_json: bool = False
    """Structured logs as JSON lines instead of key=value text."""
    http_bind: str = ""
    """HOST:PORT of the HTTP API and dashboard (e.g. "127.0.0.1:8080"; port 0 picks one); empty = no HTTP server."""
    http_token_hash: str = ""
    """SHA-256 hex digests of accepted API tokens (every scope), comma-separated; named tokens with scopes live in
    STATE/http-tokens.json (`ticketfarm token add|revoke|list`). Both are re-read live; tokens are never stored."""
    http_tls_cert: str = ""
    """PEM certificate (chain) file: with http_tls_key, the HTTP API speaks HTTPS only (relative: to the state dir)."""
    http_tls_key: str = ""
    """PEM private key file of http_tls_cert."""
    http_allow_master_code: bool = False
    """Sweeps submitted over HTTP may carry `validate` (run on the master host) and `workers` (executables the
    master ships): off, such a submission is refused (400 naming the field); on, only for admin-scope tokens."""
    http_open_reads: bool = True
    """Read-only endpoints need no token when bound to loopback (any other bind always requires one)."""
    http_cache_ttl: float = 0.5
    """Seconds a status/statistics answer is reused for other clients (many pollers cost one query)."""
    http_nice: int = 10
    """Nice increment of the HTTP process: where the CPUs are busy, the master's loop and the slaves get them first
    (pollers wait a little longer instead: bench_http measured 19 % dispatch lost at 10 against 43 % at 0 on a
    loaded 2-core host); with a core to spare it changes nothing. 0 puts the API on a par with dispatch."""
    http_metrics_keep: float = 3600.0
    """Seconds a sweep's ticketfarm_tasks series stays in /metrics after it ended (then only the totals count it)."""
    http_max_body: int = 16 * 1024 * 1024
    """Largest request body (bytes) the HTTP API accepts (a submitted spec with its files)."""
    relay_timeout: float = 30.0
    """Seconds the master waits for a slave to answer a relayed HTTP request or a sandbox call (then 504)."""
    relay_channels: int = 256
    """Websockets relayed to running tasks at once at most (more are refused with 503)."""
    sandbox_task_bytes: int = 16 * 1024 * 1024
    """Bytes of files uploaded into one task's sandbox the master keeps at most (each file: 4 MiB at most)."""
    callback_secret: str = ""
    """HMAC-SHA256 key for status callbacks of sweeps submitted without their own status_callback_secret."""
    callback_attempts: int = 8
    """Delivery attempts of one status callback before it is given up (with doubling backoff)."""
    callback_backoff: float = 0.5
    """Seconds before the first retry of a failed status callback; doubles on each retry (capped at 60 s)."""
    alloc_poll_interval: float = 10.0
    """Seconds between two scheduler status queries (one squeue for all jobs of the allocation queues)."""
    alloc_backoff: float = 10.0
    """Seconds before an allocation queue retries a refused submission; doubles on each refusal (capped at 600 s)."""
    alloc: dict = field(default_factory=dict)
    """Allocation queues: one [alloc.NAME] table each (fields: see `ticketfarm alloc add --help` and README)."""


ALLOC_EXAMPLE = """# [alloc.cpu]                 # slaves as Slurm jobs, 4 slots each, at most 4 jobs at a time
# partition = "debug"
# walltime = 3600.0
# slots_per_slave = 4
# setup = "module load python"
"""


def master_config_path(state_dir: Path) -> Path:
    return state_dir / "master.toml"


def write_default_master_config(state_dir: Path) -> Path:
    """Write master.toml with every default; returns its path."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = master_config_path(state_dir)
    # An empty inline table could not be extended by [alloc.NAME] tables below it: the queues stay an example.
    text = to_toml(MasterConfig()).replace("alloc = {}", ALLOC_EXAMPLE)
    path.write_text("# ticketfarm master configuration: review, then start the master again.\n\n" + text)
    return path


def load_master_config(state_dir: Path) -> MasterConfig:
    path = master_config_path(state_dir)
    data = load_toml(path)
    tables = data.pop("alloc", {})
    config = build(MasterConfig, data, str(path))
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise ConfigError(f"{path}: 'alloc' must hold one [alloc.NAME] table per queue", "alloc")
    config.alloc = {name: QueueSpec.parse({**t, "name": name}, f"{path} [alloc.{name}]") for name, t in tables.items()}
    for key, allowed in (("slave_on_no_work", ("", "stay", "exit")), ("slave_delete_workers", ("", "yes", "no"))):
        if getattr(config, key) not in allowed:
            raise ConfigError(f"{path}: field {key!r} must be one of {', '.join(repr(a) for a in allowed)}", field=key)
    return config
