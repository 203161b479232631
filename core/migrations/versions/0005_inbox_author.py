"""inbox.author_id: who wrote each message, indexed for the per-user limits

Rows accepted before this migration keep NULL: they are at most a day old for the limits'
purposes, so they are simply not counted (no backfill from the JSON payload).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ALTER TABLE on both databases (SQLite adds a nullable column in place), so a big
    # inbox is not copied.
    op.add_column("inbox", sa.Column("author_id", sa.String(), nullable=True))
    # author_id leads: led by source, the index drew the claim queries (`source IN …`) away
    # from the status and thread indexes into scanning every item a source ever had.
    op.create_index("ix_inbox_author", "inbox", ["author_id", "source", "created"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_inbox_author", table_name="inbox")
    with op.batch_alter_table("inbox", schema=None) as batch_op:
        batch_op.drop_column("author_id")
