"""route_changes (the routes' audit log) and full-text search over messages

SQLite: an FTS5 table over messages.content (external content, so the text is stored once),
kept in sync by triggers and filled for the rows already there. PostgreSQL: a GIN index on
the message's tsvector ('simple' configuration: no stemming, no stop words, any language).
core/search.py queries both; its expressions must stay the same as these.

A later migration that rebuilds `messages` in batch mode on SQLite (copy, drop, rename) drops
these triggers with the old table: create them again after it (see `_sqlite_fts`).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

SQLITE_FTS = [
    "CREATE VIRTUAL TABLE messages_fts USING fts5("
    "content, content='messages', content_rowid='id', tokenize='unicode61 remove_diacritics 2')",
    "CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN "
    "INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content); END",
    "CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN "
    "INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content); "
    "END",
    "CREATE TRIGGER messages_fts_update AFTER UPDATE OF content ON messages BEGIN "
    "INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content); "
    "INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content); END",
    "INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')",
]
# left(): a tsvector holds at most 1 MB; a huge tool result must not make its INSERT fail.
POSTGRES_FTS = (
    "CREATE INDEX ix_messages_fts ON messages "
    "USING gin (to_tsvector('simple'::regconfig, left(content, 100000)))"
)


def upgrade() -> None:
    op.create_table(
        "route_changes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("who", sa.String(), nullable=True),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("workspace", sa.String(), nullable=False),
        sa.Column("channel", sa.String(), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("old_agent", sa.String(), nullable=True),
        sa.Column("new_agent", sa.String(), nullable=True),
        sa.Column("old_situation", sa.Text(), nullable=True),
        sa.Column("new_situation", sa.Text(), nullable=True),
        sa.Column("moved", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for statement in SQLITE_FTS:
            op.execute(statement)
    elif dialect == "postgresql":
        op.execute(POSTGRES_FTS)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for trigger in ("insert", "delete", "update"):
            op.execute(f"DROP TRIGGER IF EXISTS messages_fts_{trigger}")
        op.execute("DROP TABLE IF EXISTS messages_fts")
    elif dialect == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_messages_fts")
    op.drop_table("route_changes")
