"""The Alembic migrations build exactly the schema the SQLModel tables describe."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from core.store import Store
from core.tables import metadata


async def test_migrations_match_the_models(store_url: str) -> None:
    store = Store(store_url)
    await store.migrate()
    await store.migrate()  # a second run is a no-op

    def diff(sync_conn: object) -> list[object]:
        return list(compare_metadata(MigrationContext.configure(sync_conn), metadata))

    differences = await store.read(diff)
    await store.close()
    assert differences == []


async def test_a_plain_postgresql_url_uses_asyncpg(postgres: object) -> None:
    url = postgres.database().replace("postgresql+asyncpg://", "postgresql://")  # type: ignore[attr-defined]
    store = Store(url)
    await store.migrate()
    assert await store.counts() == {}
    await store.close()
