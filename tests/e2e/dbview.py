"""A synchronous, read-only look into the store a `threadbridge serve` writes to, SQLite or
PostgreSQL, for tests that check after each request what the server wrote."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url


class DatabaseView:
    """Plain SQL against the store at `url` (a threadbridge `[store] url`), from sync code."""

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        self._sqlite: sqlite3.Connection | None = None
        self._pg: asyncpg.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        if self.is_sqlite:
            path = f"file:{parsed.database}?mode=ro"
            self._sqlite = sqlite3.connect(path, uri=True, isolation_level=None)
        else:
            self._loop = asyncio.new_event_loop()
            dsn = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
            self._pg = self._loop.run_until_complete(asyncpg.connect(dsn))

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        if self._sqlite is not None:
            return list(self._sqlite.execute(sql).fetchall())
        assert self._pg is not None and self._loop is not None
        return [tuple(row) for row in self._loop.run_until_complete(self._pg.fetch(sql))]

    def tables(self) -> tuple[str, ...]:
        """Every table of the store, sorted."""
        if self.is_sqlite:
            sql = "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        else:
            sql = "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        return tuple(sorted(name for (name,) in self.query(sql)))

    def counts(self, tables: tuple[str, ...]) -> dict[str, int]:
        """The number of rows in each of `tables`, read in one statement."""
        sql = " UNION ALL ".join(f"SELECT '{t}', count(*) FROM {t}" for t in tables)
        return {name: int(count) for name, count in self.query(sql)}

    def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        if self._pg is not None and self._loop is not None:
            self._loop.run_until_complete(self._pg.close())
        if self._loop is not None:
            self._loop.close()
