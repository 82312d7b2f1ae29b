"""The state of each dependency (up, degraded, down) as the gateway sees it.

Operations report their outcome (`ok` / `failed`), and probes do the same
between requests, so a dependency that comes back is noticed without traffic.
The hot path asks `is_down` to skip a dependency known to be down instead of
paying a connect attempt (or a connect timeout) per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy.exc

from gateway.errors import APIError

log = logging.getLogger("bearpaw.dependencies")

UP, DEGRADED, DOWN = "up", "degraded", "down"
GAUGE = {UP: 1.0, DEGRADED: 0.5, DOWN: 0.0}

# What a client is told, by dependency name.
LABELS = {
    "database": "database",
    "redis": "Redis (rate limits and budgets)",
    "broker": "task broker",
}

# Errors that mean "the database cannot be reached", not "this statement is wrong".
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,
)


@dataclass
class DependencyStatus:
    state: str = UP
    since: float = 0.0
    failures: int = 0  # consecutive
    last_error: str | None = None
    detail: str | None = None  # why degraded

    def as_dict(self, now: float) -> dict[str, Any]:
        return {
            "state": self.state,
            "for_s": round(now - self.since, 3),
            "consecutive_failures": self.failures,
            "last_error": self.last_error,
            "detail": self.detail,
        }


class Dependencies:
    """Registry of the dependencies a process uses. Safe to update from threads
    (each update is a few attribute assignments under the GIL)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._status: dict[str, DependencyStatus] = {}

    def register(self, name: str) -> None:
        self._status.setdefault(name, DependencyStatus(since=self.clock()))

    def names(self) -> list[str]:
        return list(self._status)

    def status(self, name: str) -> DependencyStatus:
        self.register(name)
        return self._status[name]

    def is_down(self, name: str) -> bool:
        status = self._status.get(name)
        return status is not None and status.state == DOWN

    def ok(self, name: str, degraded: str | None = None) -> None:
        """An operation on `name` succeeded; `degraded` says what still lags."""
        status = self.status(name)
        state = DEGRADED if degraded else UP
        if status.state != state:
            log.warning("dependency %s is %s", name, state, extra={"dependency": name})
            status.state, status.since = state, self.clock()
        status.failures = 0
        status.detail = degraded

    def failed(self, name: str, exc: BaseException) -> None:
        status = self.status(name)
        status.failures += 1
        status.last_error = f"{type(exc).__name__}: {exc}"[:300]
        if status.state != DOWN:
            log.error(
                "dependency %s is down: %s", name, status.last_error, extra={"dependency": name}
            )
            status.state, status.since = DOWN, self.clock()

    def snapshot(self) -> dict[str, dict[str, Any]]:
        now = self.clock()
        return {name: s.as_dict(now) for name, s in self._status.items()}


def unavailable(name: str, retry_after_s: int = 5, why: str | None = None) -> APIError:
    """The error a client gets when a request needs a dependency that is down."""
    label = LABELS.get(name, name)
    reason = f" ({why})" if why else ""
    return APIError(
        503,
        f"The {label} is unavailable{reason}; this request needs it. "
        f"Please try again in {retry_after_s}s.",
        code="dependency_unavailable",
        headers={"retry-after": str(retry_after_s)},
    )


def is_database_error(exc: BaseException) -> bool:
    return isinstance(exc, DATABASE_ERRORS)


def is_redis_error(exc: BaseException) -> bool:
    try:
        import redis.exceptions
    except ImportError:  # pragma: no cover - redis is a dependency
        return False
    return isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError)
