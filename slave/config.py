"""The slave's settings, read once from its TOML config file."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from ticketfarm.config import build, load_toml
from ticketfarm.errors import ConfigError


@dataclass
class SlaveConfig:
    """Everything a slave needs to know; only `master` is required."""

    master: str = ""
    """ZeroMQ endpoint of the master, e.g. tcp://10.0.0.1:5555."""
    master_key: str = ""
    """The master's CURVE public key file (master.key); required unless insecure."""
    secret_key: str = ""
    """This slave's CURVE secret key file (NAME.key_secret); required unless insecure."""
    insecure: bool = False
    """Plain TCP to a master configured with insecure = true (trusted networks only)."""
    name: str = ""
    """Unique slave name shown in statistics (default: the host name)."""
    slots: int = 1
    """Workers run in parallel."""
    prefetch: int = 1
    """Tickets held ready beyond the free slots, so a slot never waits for a network round trip."""
    work_root: str = "ticketfarm-work"
    """Per-ticket working directories are <work_root>/<sweep>/<ticket>."""
    heartbeat_interval: float = 1.0
    """Seconds between heartbeats (the master's WELCOME overrides it)."""
    liveness: int = 5
    """Heartbeat intervals of silence after which the master is presumed dead."""
    reconnect_min: float = 1.0
    """First back-off (s) before reconnecting to a master presumed dead; doubles each time."""
    reconnect_max: float = 32.0
    """Longest back-off (s) between reconnection attempts."""
    on_master_shutdown: str = "stay"
    """"stay" (keep reconnecting, as a service) or "exit" when the master says it is shutting down."""
    keep_workdirs: bool = False
    """Keep a ticket's working directory after the master has stored its result (or cancelled the ticket)."""
    on_no_work: str = "stay"
    """"stay" (as a service) or "exit" once the master says every sweep is over and all results are acknowledged."""
    delete_workers: bool = False
    """On exit, delete the worker executables this slave fetched into the cache."""
    cache_dir: str = ""
    """Cache of shipped worker executables, by SHA-256; may be shared by several slaves (default: <work_root>/.workers)."""
    lock_stale: float = 30.0
    """Seconds after which a cache lock nobody touches is taken to be left by a dead slave, and broken."""
    platform: str = ""
    """Platform tag told to the master, which picks the worker executable (default: detected, e.g. linux-x86_64)."""
    cpus: int = 0
    """CPUs offered to tasks that claim CPUs (0 = all of this machine's)."""
    memory_mb: int = 0
    """MiB offered to tasks that claim memory (0 = all of this machine's)."""
    relay_timeout: float = 20.0
    """Seconds a task's own HTTP server gets to answer a relayed request (keep below the master's relay_timeout)."""
    log_json: bool = False
    """Structured logs as JSON lines."""
    parent_pid: int = 0
    """Exit once this process is no longer the slave's parent (`run --local` sets it: its slaves die with it)."""
    alloc_end: float = 0.0
    """When the batch job running this slave is killed (epoch seconds; 0 = never; env TICKETFARM_ALLOC_END)."""
    handback: float = 0.0
    """Seconds before alloc_end when the slave hands back what it holds; it takes no ticket that would run past that."""
    idle_exit: float = 0.0
    """Seconds with nothing to run, and nothing unacknowledged, after which the slave exits (0 = never)."""


def load_slave_config(path: Path) -> SlaveConfig:
    config = build(SlaveConfig, load_toml(path), str(path))
    return finish(config, str(path))


def finish(config: SlaveConfig, source: str) -> SlaveConfig:
    """Fill derived defaults and check values, naming the field at fault."""
    if not config.master:
        raise ConfigError(f"{source}: field 'master' (the master's address) is required", field="master")
    if config.slots < 1:
        raise ConfigError(f"{source}: field 'slots' must be >= 1", field="slots")
    if config.prefetch < 0:
        raise ConfigError(f"{source}: field 'prefetch' must be >= 0", field="prefetch")
    for key in ("on_master_shutdown", "on_no_work"):
        if getattr(config, key) not in ("stay", "exit"):
            raise ConfigError(f"{source}: field {key!r} must be \"stay\" or \"exit\"", field=key)
    for key in ("cpus", "memory_mb", "alloc_end", "handback", "idle_exit"):
        if getattr(config, key) < 0:
            raise ConfigError(f"{source}: field {key!r} must be >= 0", field=key)
    for key in ("master_key", "secret_key"):
        if not config.insecure and not getattr(config, key):
            raise ConfigError(f"{source}: fields 'master_key' and 'secret_key' (CURVE key files) are required "
                              "unless insecure = true", field=key)
    # "$VAR" in a name comes from the environment: the slaves of one batch job tell themselves apart by rank.
    config.name = os.path.expandvars(config.name) or socket.gethostname()
    return config
