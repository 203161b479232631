"""The Alembic migrations build exactly the schema the SQLModel tables describe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from core.migrate import alembic_config, head_revision
from core.store import Store
from core.tables import metadata, outside_models

ROOT = Path(__file__).resolve().parents[2]


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


def test_the_head_read_from_the_files_is_alembics() -> None:
    assert head_revision() == ScriptDirectory.from_config(alembic_config()).get_current_head()


def test_a_store_at_the_newest_migration_starts_without_alembic(tmp_path: Path) -> None:
    """Every start migrates; a store already at the head is told so by one query, and
    Alembic (with Mako and Pygments, a fifth of start-up's imports) is not imported."""
    url = f"sqlite:///{tmp_path}/tb.db"
    start = (
        "import asyncio, sys\n"
        "from core.store import Store\n"
        f"store = Store({url!r})\n"
        "asyncio.run(store.migrate())\n"
        "asyncio.run(store.close())\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'alembic', 'mako'}))\n"
    )
    said = []
    for _ in range(2):  # the first start makes the store, the second finds it at the head
        ran = subprocess.run(
            [sys.executable, "-c", start], capture_output=True, text=True, cwd=ROOT, timeout=60
        )
        assert ran.returncode == 0, ran.stderr
        said.append(ran.stdout.strip())
    assert said == ["['alembic', 'mako']", "[]"]
