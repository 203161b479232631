"""Store outages as the bridge's loops see them: which errors mean the store cannot be reached,
and a log that says so in a few lines instead of a traceback every poll."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sqlalchemy import exc as sa_exc

# SQLSTATE classes of a lost or refused connection: 08 connection exception, 57P admin shutdown,
# crash shutdown, cannot connect now (the server is starting or stopping).
_UNREACHABLE_SQLSTATES = ("08", "57P")


def store_unavailable(exc: BaseException) -> bool:
    """Whether `exc`, raised by a store call, says the database cannot be reached just now
    (refused, dropped, shutting down), rather than that a statement or the data is wrong.

    Only the store's own errors count: an agent's refused connection is wrapped in an
    AgentServiceError and is never taken for the store's."""
    if isinstance(exc, OSError | sa_exc.TimeoutError):  # refused, reset, timed out, pool empty
        return True
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    seen: set[int] = set()
    cause: BaseException | None = exc.orig
    while cause is not None and id(cause) not in seen:  # the driver's error, and what it wraps
        seen.add(id(cause))
        sqlstate = str(getattr(cause, "sqlstate", "") or "")
        if isinstance(cause, OSError) or sqlstate.startswith(_UNREACHABLE_SQLSTATES):
            return True
        cause = cause.__cause__
    return False


def describe(exc: BaseException) -> str:
    """One line naming the error: the driver's own message, without SQLAlchemy's statement and
    parameters (which may hold what people wrote)."""
    shown = exc.orig if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None else exc
    text = str(shown).strip().splitlines()[0] if str(shown).strip() else ""
    return f"{type(shown).__name__}: {text[:200]}" if text else type(shown).__name__


class StoreOutage:
    """Tells the log about a store outage once: a warning when the store first fails, a reminder
    at most every `remind_s` while it stays down, one line when it is back."""

    def __init__(
        self,
        log: logging.Logger,
        remind_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.remind_s = remind_s
        self.clock = clock
        self.down_since: float | None = None
        self._reminded = 0.0

    def failed(self, doing: str, exc: BaseException) -> None:
        """A store call made while `doing` raised `exc`; the caller will try again."""
        now = self.clock()
        if self.down_since is None:
            self.down_since = self._reminded = now
            if store_unavailable(exc):
                self.log.warning(
                    "the store is unavailable (%s, %s); retrying until it is back",
                    describe(exc),
                    doing,
                )
            else:  # not a connection problem: the traceback is worth having, once
                self.log.error("%s failed; retrying until it works", doing, exc_info=exc)
        elif now - self._reminded >= self.remind_s:
            self._reminded = now
            self.log.warning(
                "the store is still unavailable after %.0f s (%s)",
                now - self.down_since,
                describe(exc),
            )

    def ok(self) -> None:
        """A store call succeeded."""
        if self.down_since is not None:
            self.log.info("store is back after %.1f s", self.clock() - self.down_since)
            self.down_since = None
