"""Leadership: one instance on a store does a job that must not run twice (Telegram polling).

A role ("telegram-poll:<bot id>") is held with a lock that dies with its holder:

- PostgreSQL: a session advisory lock (`pg_try_advisory_lock`) on a connection of its own, kept
  open while this instance leads. If the process dies its connection drops and the server frees
  the lock at once; if the connection is lost, the holder learns it (asyncpg's termination
  listener, and `ensure()` before each step of the work) and stops. Session locks need a session:
  behind PgBouncer, point `[store] url` at a session-pooling port, not a transaction-pooling one.
- SQLite: one host owns the file, so an exclusive `flock` on a file beside the database
  (`<db>.<role>.lock`); the kernel frees it when the process dies. An in-memory database is
  seen by this process alone, which therefore always leads.

A `Candidate` runs the work while it leads and stands by otherwise, trying again every
`retry_s`.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import inspect
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported by PostgresLeadership: a SQLite store never needs it (start-up)
    import asyncpg

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 5.0  # a leader whose lock connection does not answer within this has lost it
CONNECT_TIMEOUT_S = 10.0


class LeadershipLost(Exception):
    """This instance no longer holds its role: stop the work now."""


def advisory_key(role: str) -> int:
    """The signed 64-bit PostgreSQL advisory lock key of a role (stable across processes)."""
    digest = hashlib.blake2b(f"threadbridge:{role}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class Leadership(ABC):
    """One role, held by at most one instance on a store at a time."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.leading = False
        self.lost = asyncio.Event()  # set when the role is taken from us (not by `release`)

    @abstractmethod
    async def acquire(self) -> bool:
        """Try once to take the role; True when this instance holds it (already or now)."""

    async def ensure(self) -> None:
        """Raise LeadershipLost unless this instance still holds the role."""
        if not self.leading:
            raise LeadershipLost(f"{self.role} is not held here")

    @abstractmethod
    async def release(self) -> None:
        """Give the role up (and everything held for it); safe to call at any time."""

    def _took(self) -> bool:
        self.leading = True
        self.lost = asyncio.Event()
        return True

    def _lose(self) -> None:
        if self.leading:
            self.leading = False
            self.lost.set()


class PostgresLeadership(Leadership):
    """The role as a session advisory lock on a dedicated asyncpg connection."""

    def __init__(self, role: str, connect_options: Mapping[str, Any]) -> None:
        super().__init__(role)
        import asyncpg

        self.key = advisory_key(role)
        known = set(inspect.signature(asyncpg.connect).parameters) - {"dsn", "loop"}
        self._options = {k: v for k, v in connect_options.items() if k in known}
        self._conn: asyncpg.Connection | None = None

    async def acquire(self) -> bool:
        if self.leading:
            return True
        conn = await self._connection()
        try:
            got = await conn.fetchval("SELECT pg_try_advisory_lock($1)", self.key)
        except BaseException:
            self._drop()
            raise
        return self._took() if got else False

    async def ensure(self) -> None:
        """The lock is the session's, so a connection that still answers still holds it."""
        await super().ensure()
        conn = self._conn
        try:
            if conn is None or conn.is_closed():
                raise ConnectionError("closed")
            await conn.fetchval("SELECT 1", timeout=CHECK_TIMEOUT_S)
        except Exception as exc:  # whatever the failure, the lock can no longer be vouched for
            self._drop()
            raise LeadershipLost(f"{self.role}: the lock's connection is gone") from exc

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        self.leading = False
        if conn is None or conn.is_closed():
            return
        try:  # ending the session frees its advisory locks
            await asyncio.wait_for(conn.close(), CHECK_TIMEOUT_S)
        except Exception:
            conn.terminate()

    async def _connection(self) -> asyncpg.Connection:
        """The connection that holds (or keeps trying for) the lock, opened when missing."""
        if self._conn is None or self._conn.is_closed():
            import asyncpg

            conn = await asyncpg.connect(**self._options, timeout=CONNECT_TIMEOUT_S)
            conn.add_termination_listener(self._terminated)
            self._conn = conn
        return self._conn

    def _terminated(self, conn: Any) -> None:
        """asyncpg calls this when the connection closes or is lost, even while idle."""
        if conn is self._conn:
            self._conn = None
            self._lose()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()
        self._lose()


class FileLeadership(Leadership):
    """The role as an exclusive `flock` on a file; no file (an in-memory store): always held."""

    def __init__(self, role: str, path: Path | None) -> None:
        super().__init__(role)
        self.path = path
        self._fd: int | None = None

    async def acquire(self) -> bool:
        if self.leading:
            return True
        if self.path is None:
            return self._took()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self._took()

    async def release(self) -> None:
        fd, self._fd = self._fd, None
        self.leading = False
        if fd is not None:
            os.close(fd)  # closing the only descriptor frees the lock


def lock_file(database: str, role: str) -> Path | None:
    """Where a SQLite store's lock for `role` lives; None for an in-memory database."""
    if database.startswith("file:"):
        if "mode=memory" in database:
            return None
        database = database.removeprefix("file:").split("?", 1)[0]
    if database in ("", ":memory:"):
        return None
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", role)
    db = Path(database)
    return db.with_name(f"{db.name}.{name}.lock")


class Candidate:
    """Runs `work` while this instance leads `leadership`; stands by, retrying, otherwise.

    `on_lead` runs each time the role is won, before the work starts (a failure gives the role
    back for another try); `on_standby` each time another instance is found holding it.
    The work ends when it returns, raises (LeadershipLost from `ensure()` among others) or the
    role is lost; then the role is released and tried for again.
    """

    def __init__(
        self,
        leadership: Leadership,
        work: Callable[[], Coroutine[Any, Any, None]],
        *,
        retry_s: float,
        on_lead: Callable[[], Awaitable[None]],
        on_standby: Callable[[], None],
    ) -> None:
        self.leadership = leadership
        self.retry_s = retry_s
        self._work = work
        self._on_lead = on_lead
        self._on_standby = on_standby
        self._working: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._standing_by = False
        self._failing = False  # the last try could not reach the store (said once per outage)

    @property
    def running(self) -> bool:
        """Whether the candidate is leading or standing by (not stopped, not crashed)."""
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Try for the role once now (so the first outcome is known), then keep at it."""
        await self._attempt()
        self._task = asyncio.create_task(self._run(), name=f"candidate {self.leadership.role}")

    async def stop(self) -> None:
        """Stop the work and give the role up."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._stop_work()
        await self.leadership.release()

    async def _run(self) -> None:
        while True:
            if self._working is not None:
                await self._watch(self._working)
                await self.leadership.release()
            await asyncio.sleep(self.retry_s)  # after a loss: time for another to take over
            await self._attempt()

    async def _attempt(self) -> None:
        role = self.leadership.role
        try:
            got = await self.leadership.acquire()
        except Exception as exc:  # the class only: a driver's message may hold the address
            if not self._failing:
                self._failing = True
                kind = type(exc).__name__
                log.warning("%s: cannot tell who leads (%s); trying again", role, kind)
            return
        self._failing = False
        if not got:
            if not self._standing_by:
                self._standing_by = True
                self._on_standby()
            return
        self._standing_by = False
        try:
            await self._on_lead()
        except Exception:
            log.exception("%s: starting the work failed; giving the role back", role)
            await self.leadership.release()
            return
        self._working = asyncio.create_task(self._work(), name=f"leading {role}")

    async def _watch(self, working: asyncio.Task[None]) -> None:
        """Wait until the work ends or the role is lost, whichever comes first."""
        lost = asyncio.create_task(self.leadership.lost.wait())
        try:
            await asyncio.wait({working, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
        role = self.leadership.role
        if not working.done():
            log.warning("%s: this instance lost the role; stopping its work", role)
        elif working.cancelled():
            log.warning("%s: the work was cancelled", role)
        elif isinstance(working.exception(), LeadershipLost):
            log.warning("%s: %s; stopping its work", role, working.exception())
        elif working.exception() is not None:
            log.error("%s: the work failed", role, exc_info=working.exception())
        await self._stop_work()

    async def _stop_work(self) -> None:
        working, self._working = self._working, None
        if working is not None and not working.done():
            working.cancel()
            await asyncio.gather(working, return_exceptions=True)
