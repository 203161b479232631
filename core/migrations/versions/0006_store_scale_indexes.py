"""a channel's conversations, newest first, without naming the workspace

The admin search by source + channel (the search page, `conversations search --channel`,
`GET /api/conversations?channel=`) gives no workspace, so ix_conversations_scope (source,
workspace, channel, created) could only narrow it to the source: at a million conversations a
page of a quiet channel read a whole source's rows. This index leads with source and channel
and ends with the search's full order (created, id), so a page is the index's first rows.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.create_index(
            "ix_conversations_channel", ["source", "channel", "created", "id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.drop_index("ix_conversations_channel")
