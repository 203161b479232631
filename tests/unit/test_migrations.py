"""The Alembic migrations build exactly the schema the SQLModel tables describe."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from core.store import Store
from core.tables import metadata


async def test_migrations_match_the_models(tmp_path: Path) -> None:
    store = Store(f"sqlite+aiosqlite:///{tmp_path}/m.db")
    await store.migrate()
    await store.migrate()  # a second run is a no-op

    def diff(sync_conn: object) -> list[object]:
        return list(compare_metadata(MigrationContext.configure(sync_conn), metadata))

    async with store.writer.connect() as conn:
        differences = await conn.run_sync(diff)
    await store.close()
    assert differences == []
