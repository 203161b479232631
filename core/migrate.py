"""Alembic, driven from code: `threadbridge db upgrade` and every start call `upgrade`.

A store already at the newest migration (every start but the first after an upgrade) is told
so by one query, without importing Alembic: with Mako, which brings Pygments' lexers, it was a
fifth of start-up's imports (benchmark 7).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_ASSIGNED = re.compile(r"""^(revision|down_revision)\s*(?::[^=]*)?=\s*(?:["']([^"']+)["']|None)""")


def alembic_config(connection: Any = None) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def upgrade(sync_connection: Any) -> None:
    """Run every migration not yet applied, on an open (sync-facing) connection."""
    head = head_revision()
    if head is not None and applied(sync_connection) == head:
        return
    from alembic import command

    command.upgrade(alembic_config(sync_connection), "head")


@functools.cache
def head_revision() -> str | None:
    """The newest migration's revision, read from the files of `migrations/versions`; None
    when they do not name exactly one (Alembic then works it out)."""
    revisions: set[str] = set()
    replaced: set[str] = set()
    for path in (MIGRATIONS / "versions").glob("*.py"):
        for line in path.read_text(encoding="utf-8").splitlines():
            found = _ASSIGNED.match(line)
            if found and found.group(2):
                (revisions if found.group(1) == "revision" else replaced).add(found.group(2))
    heads = revisions - replaced
    return heads.pop() if len(heads) == 1 else None


def applied(sync_connection: Any) -> str | None:
    """The store's revision, or None when it has none (a new store)."""
    if not sa.inspect(sync_connection).has_table("alembic_version"):
        return None
    rows = sync_connection.execute(sa.text("SELECT version_num FROM alembic_version")).all()
    return rows[0][0] if len(rows) == 1 else None
