"""Structured logging setup (structlog): quiet by default, JSON lines on request."""
from __future__ import annotations

import logging
import sys

import structlog

#: The log levels `--log-level` (and $TICKETFARM_LOG) may name, from the most to the least talkative.
LEVELS = ("debug", "info", "warning", "error", "critical")


def configure_logging(level: str = "warning", json: bool = False) -> None:
    """Route structlog to stderr at `level`; key=value text, or JSON lines when `json`."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.WARNING
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
