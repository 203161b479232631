"""The database schema (SQLModel tables). Alembic migrations in core/migrations follow it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")
Stamp = sa.DateTime(timezone=True)


def utcnow() -> datetime:
    return datetime.now(UTC)


class ConversationRow(SQLModel, table=True):
    """One agent conversation, opened for one platform thread."""

    __tablename__ = "conversations"
    __table_args__ = (
        sa.Index("ix_conversations_source_created", "source", "created"),
        sa.Index("ix_conversations_scope", "source", "workspace", "channel", "created"),
        sa.Index("ix_conversations_channel", "source", "channel", "created", "id"),
        sa.Index("ix_conversations_user", "user_id", "created"),
        sa.Index("ix_conversations_agent", "agent", "created"),
        sa.Index("ix_conversations_created", "created"),
    )

    id: str = Field(primary_key=True, max_length=36)
    thread_key: str = Field(index=True)
    source: str = Field(max_length=32)
    workspace: str
    channel: str
    user_id: str | None = None
    agent: str
    remote_id: str | None = Field(default=None, index=True)
    state: dict[str, Any] | None = Field(default=None, sa_type=JSONType)
    data: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    status: str = Field(default="open", max_length=16)
    created: datetime = Field(default_factory=utcnow, sa_type=Stamp)
    updated: datetime = Field(default_factory=utcnow, sa_type=Stamp)


class ThreadLinkRow(SQLModel, table=True):
    """The conversation a thread continues now; `/new` deletes the link."""

    __tablename__ = "thread_links"

    thread_key: str = Field(primary_key=True)
    conversation_id: str = Field(foreign_key="conversations.id", index=True)
    created: datetime = Field(default_factory=utcnow, sa_type=Stamp)


class DraftRow(SQLModel, table=True):
    """The message a thread's next answer goes into (a "thinking…" placeholder, a streamed
    draft), kept here so that any instance, or the same one after a restart, edits it instead
    of posting the answer again."""

    __tablename__ = "drafts"

    thread_key: str = Field(primary_key=True)
    message_id: str
    created: datetime = Field(default_factory=utcnow, sa_type=Stamp)


class PostRow(SQLModel, table=True):
    """A message the bot posted, by platform key, and its thread: a person replying to it
    continues that thread (Telegram groups, where a thread is a chain of replies)."""

    __tablename__ = "posts"

    key: str = Field(primary_key=True)  # e.g. "telegram:CHAT:MESSAGE_ID"
    thread_key: str = Field(index=True)
    created: datetime = Field(default_factory=utcnow, sa_type=Stamp)


class MessageRow(SQLModel, table=True):
    """One stored turn: what a person wrote, what the agent said, tool calls and notices."""

    __tablename__ = "messages"
    __table_args__ = (sa.Index("ix_messages_conversation", "conversation_id", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    conversation_id: str = Field(foreign_key="conversations.id")
    role: str = Field(max_length=16)
    kind: str = Field(default="message", max_length=16)  # message | notice
    content: str = Field(sa_type=sa.Text)
    name: str | None = None
    author_id: str | None = None
    author_name: str | None = None
    event_id: str | None = Field(default=None, unique=True)
    tool_calls: list[dict[str, Any]] | None = Field(default=None, sa_type=JSONType)
    tool_call_id: str | None = None
    created: datetime = Field(default_factory=utcnow, sa_type=Stamp)


class RouteRow(SQLModel, table=True):
    """A run-time route set by an admin; '' in workspace/channel means any."""

    __tablename__ = "routes"
    __table_args__ = (
        sa.UniqueConstraint("source", "workspace", "channel", name="uq_routes_scope"),
    )

    id: int | None = Field(default=None, primary_key=True)
    source: str = Field(max_length=32)
    workspace: str = ""
    channel: str = ""
    agent: str
    situation: str | None = None
    respond: str | None = None
    set_by: str | None = None
    created: datetime = Field(default_factory=utcnow, sa_type=Stamp)
    updated: datetime = Field(default_factory=utcnow, sa_type=Stamp)


class RouteChangeRow(SQLModel, table=True):
    """One change to the run-time routes, kept for the audit log (`routes history`)."""

    __tablename__ = "route_changes"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, sa_type=Stamp)
    who: str | None = None
    source: str = Field(max_length=32)
    workspace: str = ""  # '' means any, as in `routes`
    channel: str = ""
    action: str = Field(max_length=16)  # set | unset
    old_agent: str | None = None
    new_agent: str | None = None
    old_situation: str | None = Field(default=None, sa_type=sa.Text)
    new_situation: str | None = Field(default=None, sa_type=sa.Text)
    moved: int = 0  # open threads ended by `--move-open`


class InboxRow(SQLModel, table=True):
    """A message accepted from a platform, waiting for (or done with) its turn."""

    __tablename__ = "inbox"
    __table_args__ = (
        sa.Index("ix_inbox_status", "status", "id"),
        sa.Index("ix_inbox_thread", "thread_key", "status", "id"),
        # A person's recent messages, for the per-user limits (core/access.py).
        sa.Index("ix_inbox_author", "author_id", "source", "created"),
    )

    id: int | None = Field(default=None, primary_key=True)
    event_id: str = Field(unique=True)
    thread_key: str
    source: str = Field(max_length=32)
    author_id: str | None = None
    payload: dict[str, Any] = Field(sa_type=JSONType)
    status: str = Field(default="pending", max_length=16)  # pending|working|done|failed|refused
    attempts: int = 0
    claim_token: str | None = None
    lease_until: datetime | None = Field(default=None, sa_type=Stamp)
    conversation_id: str | None = None
    error: str | None = Field(default=None, sa_type=sa.Text)
    created: datetime = Field(default_factory=utcnow, sa_type=Stamp)
    updated: datetime = Field(default_factory=utcnow, sa_type=Stamp)


class OutboxRow(SQLModel, table=True):
    """A reply waiting to be posted by the adapter that owns its source."""

    __tablename__ = "outbox"
    __table_args__ = (
        sa.Index("ix_outbox_status", "status", "id"),
        sa.Index("ix_outbox_thread", "thread_key", "status", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    thread_key: str
    source: str = Field(max_length=32)
    conversation_id: str | None = None
    message_id: int | None = None
    payload: dict[str, Any] = Field(sa_type=JSONType)
    status: str = Field(default="pending", max_length=16)  # pending|working|sent|failed
    attempts: int = 0
    claim_token: str | None = None
    lease_until: datetime | None = Field(default=None, sa_type=Stamp)
    not_before: datetime | None = Field(default=None, sa_type=Stamp)
    platform_ids: list[str] | None = Field(default=None, sa_type=JSONType)
    error: str | None = Field(default=None, sa_type=sa.Text)
    created: datetime = Field(default_factory=utcnow, sa_type=Stamp)
    updated: datetime = Field(default_factory=utcnow, sa_type=Stamp)


metadata = SQLModel.metadata

# Full-text search lives outside the models: migration 0003 builds it per database (an FTS5
# table kept in sync by triggers on SQLite, a GIN expression index on PostgreSQL).
FTS_TABLE = "messages_fts"  # SQLite; FTS5 adds shadow tables named messages_fts_*
FTS_INDEX = "ix_messages_fts"  # PostgreSQL


def outside_models(name: str | None, type_: str) -> bool:
    """Whether a database object is one of the full-text objects the models do not describe
    (for comparing the migrated schema with the models)."""
    if name is None:
        return False
    if type_ == "table":
        return name == FTS_TABLE or name.startswith(FTS_TABLE + "_")
    return type_ == "index" and name == FTS_INDEX
