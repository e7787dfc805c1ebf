"""Which state dir a command uses: --state, $TICKETFARM_STATE, beside a local run's spec, or ./.ticketfarm."""
from __future__ import annotations

import os
from pathlib import Path

from ticketfarm.errors import ConfigError

#: The state dir's name where no --state or $TICKETFARM_STATE names one.
STATE_DIR_NAME = ".ticketfarm"


def default_state_dir() -> Path:
    return Path(os.environ.get("TICKETFARM_STATE", STATE_DIR_NAME))


def state_dir_for(spec: Path) -> Path:
    """A local run's state dir when neither --state nor $TICKETFARM_STATE names one: beside the spec, so that
    `run job/sweep.toml` finds job/.ticketfarm from any directory; never a silent fresh start next to an old one."""
    beside = spec.parent / STATE_DIR_NAME
    here = Path(STATE_DIR_NAME)
    if not beside.exists() and here.is_dir() and here.resolve() != beside.resolve():
        raise ConfigError(f"{spec}'s state would be a new {beside} (a local run keeps it beside its spec), but "
                          f"./{STATE_DIR_NAME} exists here: pass --state {STATE_DIR_NAME} to use it, "
                          f"or --state {beside} to start there")
    return beside
