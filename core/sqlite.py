"""SQLite plumbing: connection settings, writers that commit jobs in batches, and the hot
statements run on the driver.

Every write to a SQLite file is serialised by SQLite anyway. Running the jobs waiting at one
moment in a single transaction (one job's failure is that job's alone: see `_outcomes`) turns
many small transactions into one commit. Quick jobs (the hot path: a few statements on indexed
rows) run so on the event loop's own thread (InlineWriter, InlineReader): a hop to a thread
and back costs more than they do. Anything else, and any batch that finds the write lock held
by another process, goes to the writer thread, which may wait for it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections import namedtuple
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

T = TypeVar("T")
Job = Callable[[Connection], Any]
MAX_BATCH = 256
# Readers map the file (SQLite caps the size at its build's limit, often 2 GB): a search that
# touches many pages of a large store reads them from memory instead of one read() each.
READ_MAP_BYTES = 1 << 32


def configure(
    engine: Engine, *, immediate: bool, busy_ms: int = 10_000, checkpoints: bool = True
) -> None:
    """WAL, a busy timeout, foreign keys, our own BEGIN (IMMEDIATE for writers), and for
    readers a memory-mapped file. Without `checkpoints` the connection's commits never copy
    the WAL into the database (a Checkpointer does, off the event loop).

    The sqlite3 module's own transaction handling cannot do savepoints; we take it over.
    """
    begin = "BEGIN IMMEDIATE" if immediate else "BEGIN"

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        cursor.execute("PRAGMA foreign_keys=ON")
        if not checkpoints:
            cursor.execute("PRAGMA wal_autocheckpoint=0")
        if not immediate:
            cursor.execute(f"PRAGMA mmap_size={READ_MAP_BYTES}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        if engine.echo:
            conn.exec_driver_sql(begin)
            return
        on_driver(conn, begin, ())  # SQLAlchemy's execution costs more than the BEGIN


class WriterThread:
    """Runs write jobs on one connection, many per transaction."""

    def __init__(
        self, url: sa.URL, *, echo: bool = False, hot: frozenset[int] = frozenset()
    ) -> None:
        self.engine = sa.create_engine(url, echo=echo, poolclass=sa.pool.StaticPool)
        configure(self.engine, immediate=True)
        use_hot_path(self.engine, hot)
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

    def hand(self, job: Job, future: asyncio.Future[Any]) -> None:
        """Run a job another writer could not (see InlineWriter); its future is settled here."""
        self._jobs.put((job, future))

    def _commit(self, conn: Connection, batch: list[tuple[Job, asyncio.Future[Any]]]) -> None:
        outcomes = _outcomes(conn, batch, wait=True)
        for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
            future.get_loop().call_soon_threadsafe(_settle, future, ok, value)


class InlineWriter:
    """Runs quick write jobs on the event loop's own thread, those waiting in one transaction.

    A job of the hot path (a few statements on indexed rows) takes less time than the hop to
    the writer thread and back costs, so it runs where it was asked for. It never waits on the
    loop: when another process holds SQLite's write lock, the batch goes to the writer thread,
    which waits its turn. Its commits leave the WAL to the Checkpointer, as copying the WAL
    into the database syncs the file.
    """

    def __init__(
        self, url: sa.URL, fallback: WriterThread, *, echo: bool, hot: frozenset[int]
    ) -> None:
        self.engine = sa.create_engine(url, echo=echo, poolclass=sa.pool.StaticPool)
        configure(self.engine, immediate=True, busy_ms=0, checkpoints=False)
        use_hot_path(self.engine, hot)
        self._fallback = fallback
        self._conn: Connection | None = None
        self._batch: list[tuple[Job, asyncio.Future[Any]]] = []

    async def run(self, job: Callable[[Connection], T]) -> T:
        """Run `job` in the transaction committed once this turn of the loop has queued its
        jobs; its result once committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if not self._batch:
            loop.call_soon(self._commit)
        self._batch.append((job, future))
        return await future

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self.engine.dispose()

    def connection(self) -> Connection:
        """The writer's connection, kept open; between the loop's callbacks it is in no
        transaction (a batch commits in the callback that runs it)."""
        if self._conn is None:
            self._conn = self.engine.connect()
        return self._conn

    def _commit(self) -> None:
        batch, self._batch = self._batch, []
        try:
            outcomes = _outcomes(self.connection(), batch, wait=False)
        except _Busy:
            for job, future in batch:
                self._fallback.hand(job, future)
            return
        for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
            _settle(future, ok, value)


class InlineReader:
    """Runs quick reads (a few rows by index) on the event loop's own thread (see
    InlineWriter), on the InlineWriter's own sqlite3 connection.

    SQLite drops a connection's page cache whenever another connection has committed since
    its last read, so a reader of its own would read its pages again after every write; the
    writer's cache holds what it wrote. Both run on the loop's thread, between its callbacks,
    so a read never sees a batch half done. A hot statement runs without a transaction of its
    own (it sees one moment anyway); whatever else a job runs is rolled back after it. The
    connection never waits on a lock: a read that meets one (rare with WAL) goes to `fallback`.
    """

    def __init__(
        self,
        url: sa.URL,
        writer: InlineWriter,
        fallback: ReaderPool,
        *,
        echo: bool,
        hot: frozenset[int],
    ) -> None:
        self.engine = sa.create_engine(
            url,
            echo=echo,
            poolclass=sa.pool.StaticPool,
            pool_reset_on_return=None,  # a read leaves no transaction open (see `run`)
            creator=lambda: writer.connection().connection.driver_connection,
        )
        # The writer's settings, which this engine's connect event sets again: no waiting, and
        # no checkpoints (the Checkpointer's); a read transaction is a plain BEGIN.
        configure(self.engine, immediate=False, busy_ms=0, checkpoints=False)
        use_hot_path(self.engine, hot, begin=False)
        self._fallback = fallback
        self._conn: Connection | None = None

    async def run(self, job: Callable[[Connection], T]) -> T:
        if self._conn is None:
            self._conn = self.engine.connect()
        try:
            return job(self._conn)
        except sa.exc.OperationalError as exc:
            if not _busy(exc):
                raise
        finally:
            if self._conn.in_transaction():
                self._conn.rollback()
        return await self._fallback.run(job)

    def close(self) -> None:
        """Let go of the connection; the InlineWriter, whose it is, closes it."""
        if self._conn is not None:
            self._conn.close()


class Checkpointer:
    """Copies the WAL into the database every `every_s`, on its own thread and connection
    (a PASSIVE checkpoint: it never blocks a writer or reader)."""

    def __init__(self, path: str, every_s: float = 1.0) -> None:
        self._path = path
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        self._stop.set()
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout=10000")
            while not self._stop.wait(self._every_s):
                self._checkpoint(conn)
            self._checkpoint(conn)
        finally:
            conn.close()

    @staticmethod
    def _checkpoint(conn: sqlite3.Connection) -> None:
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:  # the next one catches up
            log.warning("sqlite: checkpoint failed: %s", exc)


class _Busy(Exception):
    """Another connection holds the database's write lock."""


def _outcomes(
    conn: Connection, batch: list[tuple[Job, asyncio.Future[Any]]], *, wait: bool
) -> list[tuple[bool, Any]]:
    """Run the batch in one transaction; each job's (ok, result or exception).

    Jobs rarely fail, so they first run together with no savepoints (two statements a job
    saved); if one fails, that transaction is rolled back and the batch runs again with a
    savepoint a job, so that one job's failure is that job's alone. A batch of one needs no
    second run. Without `wait`, a write lock held elsewhere raises _Busy, nothing done.
    """
    try:
        with _begin(conn, wait):
            return [(True, job(conn)) for job, _ in batch]
    except _Busy:
        raise
    except Exception as exc:
        if len(batch) == 1:
            return [(False, exc)]
    outcomes: list[tuple[bool, Any]] = []
    try:
        with _begin(conn, wait):
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
    except _Busy:
        raise
    except Exception as exc:  # BEGIN or COMMIT failed: nothing of the batch was kept
        log.exception("a write transaction failed")
        outcomes = [(False, exc)] * len(batch)
    return outcomes


def _begin(conn: Connection, wait: bool) -> Any:
    try:
        return conn.begin()
    except sa.exc.OperationalError as exc:
        if not wait and _busy(exc):
            raise _Busy from exc
        raise


def _busy(exc: sa.exc.OperationalError) -> bool:
    """Whether SQLite said another connection holds a lock (SQLITE_BUSY and its kinds)."""
    code = getattr(exc.orig, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == sqlite3.SQLITE_BUSY


class ReaderPool:
    """Runs read jobs on a few threads, each with its own connection: one hop per read."""

    def __init__(
        self, url: sa.URL, *, echo: bool = False, size: int = 4, hot: frozenset[int] = frozenset()
    ) -> None:
        self.engine = sa.create_engine(url, echo=echo, pool_size=size, max_overflow=0)
        configure(self.engine, immediate=False)
        use_hot_path(self.engine, hot)
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


# -- the hot statements, run on the driver ----------------------------------------------------
#
# SQLAlchemy spends far longer preparing a statement's execution (its context, parameters,
# result metadata) than SQLite takes to run it. The statements a turn runs are built once
# (core.sql.HOT); each is compiled once here for the parameters it is given, and then runs on
# the sqlite3 cursor with SQLAlchemy's own type conversions. What the plan cannot serve (column
# defaults to fill, an empty IN list, SQL echo) goes through SQLAlchemy as before.


class Plan:
    """One hot statement compiled for SQLite, for one set of parameter names."""

    __slots__ = ("expanding", "results", "row", "slots", "text")

    def __init__(self, compiled: Any, params: Mapping[str, Any]) -> None:
        self.text: str = compiled.string
        processors = compiled._bind_processors
        binds = {name: bind for bind, name in compiled.bind_names.items()}
        # Each placeholder in order: (name, fixed value or _FROM_PARAMS, processor)
        self.slots: list[tuple[str, Any, Any]] = []
        self.expanding: set[str] = set()
        for name in compiled.positiontup:
            bind = binds[name]
            if bind.expanding:
                self.expanding.add(name)
            if name in params:
                value = _FROM_PARAMS
            elif bind.required or bind.callable is not None:
                raise _Unplannable(name)
            else:
                value = bind.value
            self.slots.append((name, value, _faster(processors.get(name))))
        columns = compiled._result_columns
        self.row: Any = None
        self.results: tuple[Any, ...] = ()
        if columns:
            self.row = namedtuple("Row", [c.keyname for c in columns])  # type: ignore[misc]
            dialect = compiled.dialect
            self.results = tuple(c.type._cached_result_processor(dialect, None) for c in columns)

    def values(self, params: Mapping[str, Any]) -> tuple[str, list[Any]]:
        text, values = self.text, []
        for name, fixed, process in self.slots:
            value = params[name] if fixed is _FROM_PARAMS else fixed
            if name in self.expanding:
                items = list(value)
                if not items:
                    raise _Unplannable(name)  # SQLAlchemy renders an empty set its own way
                marks = ", ".join("?" * len(items))
                text = text.replace(f"__[POSTCOMPILE_{name}]", marks, 1)
                values += [process(v) for v in items] if process else items
            else:
                values.append(process(value) if process else value)
        return text, values


def _datetime_text(value: Any) -> Any:
    """SQLite's DATETIME text of a datetime, as SQLAlchemy writes it, in 2.1 us rather than 3.7
    (its processor fills a dict for the format): 14 of them go into each turn's rows."""
    if value.__class__ is datetime:
        return "%04d-%02d-%02d %02d:%02d:%02d.%06d" % (  # noqa: UP031 (the fastest here)
            value.year,
            value.month,
            value.day,
            value.hour,
            value.minute,
            value.second,
            value.microsecond,
        )
    return _datetime_processor(value)  # None, or a date


_datetime_processor: Any = (
    sa.DateTime().dialect_impl(sqlite_dialect()).bind_processor(sqlite_dialect())
)


def _faster(process: Any) -> Any:
    """`process`, or a faster function that gives the same text (SQLite's DATETIME)."""
    if process is None or process.__qualname__ != _datetime_processor.__qualname__:
        return process
    samples = (datetime(2026, 1, 2, 3, 4, 5, 6), datetime(999, 12, 31, 23, 59, 59, tzinfo=UTC))
    if all(process(v) == _datetime_text(v) for v in samples):
        return _datetime_text
    return process  # a storage format of its own


class FastConnection(Connection):
    """A connection whose hot statements (`hot`, from core.sql.HOT) run on the sqlite3 driver."""

    hot: frozenset[int] = frozenset()
    begins = True  # a hot statement outside a transaction opens one, as autobegin would

    def execute(self, statement: Any, parameters: Any = None, **kw: Any) -> Any:
        if id(statement) not in self.hot or kw or not isinstance(parameters, Mapping):
            return super().execute(statement, parameters, **kw)
        key = (id(statement), tuple(parameters))
        plan = _PLANS.get(key)
        if plan is None:
            plan = _PLANS[key] = _plan(statement, parameters, self)
        if plan is False:
            return super().execute(statement, parameters)
        assert isinstance(plan, Plan)
        try:
            text, values = plan.values(parameters)
        except _Unplannable:
            return super().execute(statement, parameters)
        if self.begins and not self.in_transaction():
            self.begin()  # as SQLAlchemy's autobegin would: the job's reads see one moment
        return FastResult(on_driver(self, text, values), plan)


def on_driver(conn: Connection, text: str, values: Any) -> sqlite3.Cursor:
    """Run `text` on the connection's sqlite3 driver; its errors as SQLAlchemy's own."""
    try:
        cursor: sqlite3.Cursor = conn.connection.driver_connection.execute(text, values)  # type: ignore[union-attr]
    except sqlite3.Error as exc:
        raise sa.exc.DBAPIError.instance(text, values, exc, sqlite3.Error) from exc
    return cursor


def use_hot_path(engine: Engine, hot: frozenset[int], *, begin: bool = True) -> None:
    """Connections of `engine` run the statements `hot` on the driver (not with SQL echo, which
    shows what SQLAlchemy runs); without `begin`, outside a transaction."""
    if hot and not engine.echo:
        attributes = {"hot": hot, "begins": begin}
        engine._connection_cls = type("HotConnection", (FastConnection,), attributes)


class FastResult:
    """The part of SQLAlchemy's Result the store's jobs use."""

    __slots__ = ("_lastrowid", "_rows", "rowcount")

    def __init__(self, cursor: sqlite3.Cursor, plan: Plan) -> None:
        self._rows: list[Any] = []
        if plan.row is not None:
            make, results = plan.row._make, plan.results
            for raw in cursor.fetchall():
                self._rows.append(
                    make([p(v) if p else v for p, v in zip(results, raw, strict=True)])
                )
        self.rowcount: int = cursor.rowcount
        self._lastrowid = cursor.lastrowid

    @property
    def inserted_primary_key(self) -> tuple[int | None]:
        return (self._lastrowid,)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)

    def all(self) -> list[Any]:
        return list(self._rows)

    def first(self) -> Any:
        return self._rows[0] if self._rows else None

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None

    def scalar_one(self) -> Any:
        if len(self._rows) != 1:
            raise (
                sa.exc.NoResultFound("expected one row")
                if not self._rows
                else (sa.exc.MultipleResultsFound("expected one row"))
            )
        return self._rows[0][0]

    def scalars(self) -> FastResult:
        scalars = object.__new__(FastResult)
        scalars._rows = [row[0] for row in self._rows]
        scalars.rowcount, scalars._lastrowid = self.rowcount, self._lastrowid
        return scalars


class _Unplannable(Exception):
    pass


_FROM_PARAMS = object()
_PLANS: dict[tuple[int, tuple[str, ...]], Plan | bool] = {}


def _plan(statement: Any, params: Mapping[str, Any], conn: Connection) -> Plan | bool:
    compiled = statement.compile(dialect=conn.dialect, column_keys=sorted(params))
    if (
        getattr(compiled, "insert_prefetch", None)
        or getattr(compiled, "update_prefetch", None)
        or compiled.literal_execute_params
    ):
        return False
    try:
        return Plan(compiled, params)
    except (_Unplannable, ValueError, TypeError):
        return False
