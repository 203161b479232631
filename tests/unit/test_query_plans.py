"""The hot-path queries use the indexes meant for them (SQLite's planner, on the migrated
schema): a new index that draws a claim into scanning a table's whole history shows here, not
as a slow bridge in production."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy.dialects import sqlite

from core import sql
from core.access import USAGE
from core.store import Store


def plan(db: Path, statement: object) -> str:
    text = str(statement.compile(dialect=sqlite.dialect()))  # type: ignore[attr-defined]
    text = re.sub(r"\(__\[POSTCOMPILE_\w+\]\)", "(?)", text)
    with sqlite3.connect(db) as conn:
        rows = conn.execute("EXPLAIN QUERY PLAN " + text, ["x"] * text.count("?")).fetchall()
    return " | ".join(row[-1] for row in rows)


@pytest.fixture
async def db(tmp_path: Path) -> Path:
    store = Store(f"sqlite:///{tmp_path}/tb.db")
    await store.migrate()
    await store.close()
    return tmp_path / "tb.db"


@pytest.mark.parametrize("name", ["inbox", "outbox"])
def test_claims_search_by_status_or_by_thread(db: Path, name: str) -> None:
    claim_all = plan(db, sql.CLAIM[name][0])
    assert f"SEARCH {name} USING INDEX ix_{name}_status (status=?)" in claim_all, claim_all
    next_in_thread = plan(db, sql.NEXT_IN_THREAD[name])
    assert f"ix_{name}_thread (thread_key=? AND status=?)" in next_in_thread, next_in_thread
    busy = plan(db, sql.THREAD_BUSY[name])
    assert f"ix_{name}_thread (thread_key=? AND status=?)" in busy, busy


def test_the_limits_count_one_persons_messages(db: Path) -> None:
    usage = plan(db, USAGE)
    assert "ix_inbox_author (author_id=? AND source=?" in usage, usage
