"""SQLite plumbing: connection settings, and one writer thread that commits jobs in batches.

Every write to a SQLite file is serialised by SQLite anyway. Doing it through one thread that
takes whatever jobs are waiting and runs them in a single transaction (one job's failure is
that job's alone: see `WriterThread._commit`) turns many small transactions into one commit
and one thread hop per batch instead of several per job.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

T = TypeVar("T")
Job = Callable[[Connection], Any]
MAX_BATCH = 256
# Readers map the file (SQLite caps the size at its build's limit, often 2 GB): a search that
# touches many pages of a large store reads them from memory instead of one read() each.
READ_MAP_BYTES = 1 << 32


def configure(engine: Engine, *, immediate: bool) -> None:
    """WAL, a busy timeout, foreign keys, our own BEGIN (IMMEDIATE for writers), and for
    readers a memory-mapped file.

    The sqlite3 module's own transaction handling cannot do savepoints; we take it over.
    """
    begin = "BEGIN IMMEDIATE" if immediate else "BEGIN"

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA foreign_keys=ON")
        if not immediate:
            cursor.execute(f"PRAGMA mmap_size={READ_MAP_BYTES}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)


class WriterThread:
    """Runs write jobs on one connection, many per transaction."""

    def __init__(self, url: sa.URL, *, echo: bool = False) -> None:
        self.engine = sa.create_engine(url, echo=echo, poolclass=sa.pool.StaticPool)
        configure(self.engine, immediate=True)
        self._jobs: queue.SimpleQueue[tuple[Job, asyncio.Future[Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="sqlite-writer", daemon=True)
        self._thread.start()

    async def run(self, job: Callable[[Connection], T]) -> T:
        """Run `job` in the writer's next transaction; its result once committed."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.put((job, future))
        return await future

    async def close(self) -> None:
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)
        self.engine.dispose()

    def _run(self) -> None:
        with self.engine.connect() as conn:
            while True:
                first = self._jobs.get()
                if first is None:
                    return
                batch = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        item = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        self._jobs.put(None)  # finish this batch, then stop
                        break
                    batch.append(item)
                self._commit(conn, batch)

    def _commit(self, conn: Connection, batch: list[tuple[Job, asyncio.Future[Any]]]) -> None:
        """Run the batch in one transaction. Jobs rarely fail, so they first run together
        with no savepoints (two statements a job saved); if one fails, that transaction is
        rolled back and the batch runs again with a savepoint a job, so that one job's
        failure is that job's alone. A batch of one needs no second run."""
        try:
            with conn.begin():
                outcomes: list[tuple[bool, Any]] = [(True, job(conn)) for job, _ in batch]
        except Exception as exc:
            outcomes = [(False, exc)] if len(batch) == 1 else self._one_by_one(conn, batch)
        for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
            future.get_loop().call_soon_threadsafe(_settle, future, ok, value)

    def _one_by_one(
        self, conn: Connection, batch: list[tuple[Job, asyncio.Future[Any]]]
    ) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        try:
            with conn.begin():
                for job, _ in batch:
                    # A plain savepoint per job: SQLAlchemy's begin_nested() costs more than
                    # most jobs, and these never nest.
                    conn.exec_driver_sql("SAVEPOINT job")
                    try:
                        outcomes.append((True, job(conn)))
                    except Exception as exc:  # this job's failure; the others go on
                        conn.exec_driver_sql("ROLLBACK TO SAVEPOINT job")
                        outcomes.append((False, exc))
                    conn.exec_driver_sql("RELEASE SAVEPOINT job")
        except Exception as exc:  # BEGIN or COMMIT failed: nothing of the batch was kept
            log.exception("a write transaction failed")
            outcomes = [(False, exc)] * len(batch)
        return outcomes


class ReaderPool:
    """Runs read jobs on a few threads, each with its own connection: one hop per read."""

    def __init__(self, url: sa.URL, *, echo: bool = False, size: int = 4) -> None:
        self.engine = sa.create_engine(url, echo=echo, pool_size=size, max_overflow=0)
        configure(self.engine, immediate=False)
        self._threads = ThreadPoolExecutor(max_workers=size, thread_name_prefix="sqlite-reader")

    async def run(self, job: Callable[[Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._threads, self._read, job)

    def _read(self, job: Callable[[Connection], T]) -> T:
        with self.engine.connect() as conn:
            return job(conn)

    def close(self) -> None:
        self._threads.shutdown(wait=True)
        self.engine.dispose()


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():  # the caller was cancelled; its job still ran
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
