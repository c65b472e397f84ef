"""structlog configuration, done once at the entry point, and a rate limiter for log lines.

The libraries' own log records (aiomqtt and paho under ``mqtt``, asyncpg) go through the
same renderer, so every line on stderr is one JSON object (or one console line).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

import structlog

_SHARED: list[structlog.types.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure(log_format: str = "json", level: str = "info") -> None:
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    structlog.configure(
        processors=[*_SHARED, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_StderrLoggerFactory(),
        cache_logger_on_first_use=True,
    )
    handler = _StderrHandler()
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_SHARED, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)


class _StderrLogger:
    """Writes each line to the *current* ``sys.stderr`` (which tests and daemons replace)."""

    def msg(self, message: str) -> None:
        # One write per line: processes sharing a log file (workers) never interleave.
        sys.stderr.write(message + "\n")
        sys.stderr.flush()

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


class _StderrLoggerFactory:
    def __call__(self, *args: object) -> _StderrLogger:
        return _StderrLogger()


class _StderrHandler(logging.StreamHandler[TextIO]):
    """A stdlib handler that writes to the current ``sys.stderr``."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


class RateLimitedLog:
    """Lets at most ``burst`` events through per ``period`` seconds and counts the rest.

    Rejected device messages can arrive by the thousand; their log lines must not fill a
    disk. The number suppressed is reported on the next event that gets through.
    """

    def __init__(self, burst: int = 20, period: float = 10.0) -> None:
        self.burst = burst
        self.period = period
        self._window_start = 0.0
        self._count = 0
        self._suppressed = 0

    def allow(self) -> tuple[bool, int]:
        """Whether to log now, and how many events were suppressed before this one."""
        now = time.monotonic()
        if now - self._window_start >= self.period:
            self._window_start = now
            self._count = 0
        if self._count < self.burst:
            self._count += 1
            suppressed, self._suppressed = self._suppressed, 0
            return True, suppressed
        self._suppressed += 1
        return False, 0
