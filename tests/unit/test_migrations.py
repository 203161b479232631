"""The Alembic migrations build exactly the schema the SQLModel tables describe."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from core.store import Store
from core.tables import metadata, outside_models


async def test_migrations_match_the_models(store_url: str) -> None:
    store = Store(store_url)
    await store.migrate()
    await store.migrate()  # a second run is a no-op

    def diff(sync_conn: object) -> list[object]:
        # The full-text objects (an FTS5 table and its shadow tables on SQLite, a GIN
        # expression index on PostgreSQL) are made by migration 0003 and are not models.
        opts = {
            "include_name": lambda name, type_, _parents: not outside_models(name, type_),
            "include_object": lambda _obj, name, type_, _reflected, _compare_to: (
                not (outside_models(name, type_))
            ),
        }
        context = MigrationContext.configure(sync_conn, opts=opts)
        return list(compare_metadata(context, metadata))

    differences = await store.read(diff)
    await store.close()
    assert differences == []


async def test_a_plain_postgresql_url_uses_asyncpg(postgres: object) -> None:
    url = postgres.database().replace("postgresql+asyncpg://", "postgresql://")  # type: ignore[attr-defined]
    store = Store(url)
    await store.migrate()
    assert await store.counts() == {}
    await store.close()
