"""The async store: conversations, thread links, messages, routes, inbox and outbox.

SQLite (the default) gets one writer connection that opens every transaction with
`BEGIN IMMEDIATE`, so writers queue in Python instead of failing with "database is locked",
and a small pool of readers (WAL lets them read while the writer writes). PostgreSQL gets
one ordinary pool. Hot paths use SQLAlchemy Core statements over the SQLModel tables.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from core.model import Conversation, Inbound, ThreadRef
from core.tables import (
    ConversationRow,
    InboxRow,
    MessageRow,
    OutboxRow,
    RouteRow,
    ThreadLinkRow,
    utcnow,
)

log = logging.getLogger(__name__)

conversations = ConversationRow.__table__  # type: ignore[attr-defined]
links = ThreadLinkRow.__table__  # type: ignore[attr-defined]
messages = MessageRow.__table__  # type: ignore[attr-defined]
routes = RouteRow.__table__  # type: ignore[attr-defined]
inbox = InboxRow.__table__  # type: ignore[attr-defined]
outbox = OutboxRow.__table__  # type: ignore[attr-defined]

UNFINISHED = ("pending", "working")


def aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every time we store is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def as_utc(value: datetime | None) -> datetime | None:
    """A time as UTC (naive means UTC). SQLite compares stored times as text, so a bound with
    another offset must be converted before it is compared; the calendar's ends are clamped."""
    stamp = aware(value)
    if stamp is None:
        return None
    try:
        return stamp.astimezone(UTC)
    except OverflowError:  # within hours of year 1 or 9999
        return (datetime.min if stamp.year == 1 else datetime.max).replace(tzinfo=UTC)


@dataclass(slots=True)
class Claim:
    """A work item this process holds until it finishes or its lease lapses."""

    id: int
    thread_key: str
    payload: dict[str, Any]
    token: str
    attempts: int
    conversation_id: str | None = None
    created: datetime | None = None


@dataclass(slots=True)
class NewMessage:
    """A message to store with a finished turn."""

    role: str
    content: str
    kind: str = "message"
    name: str | None = None
    author_id: str | None = None
    author_name: str | None = None
    event_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    created: datetime | None = None
    post: bool = False  # also queue it in the outbox for the platform


@dataclass(slots=True)
class SearchFilters:
    """What `conversations search` and `GET /api/conversations` filter on."""

    source: str | None = None
    workspace: str | None = None
    channel: str | None = None
    user: str | None = None
    agent: str | None = None
    status: str | None = None
    text: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 20
    offset: int = 0
    reversed: bool = True  # newest first


class ClaimLost(Exception):
    """Our lease on a work item lapsed and another worker took it; drop our result."""


def row_to_conversation(row: Any) -> Conversation:
    return Conversation(
        id=row.id,
        thread_key=row.thread_key,
        source=row.source,
        agent=row.agent,
        data=dict(row.data or {}),
        remote_id=row.remote_id,
        state=row.state,
        status=row.status,
        created=aware(row.created),
        updated=aware(row.updated),
    )


class Store:
    """Everything threadbridge keeps, behind one async object."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite:
            database = parsed.database or ""
            if database and database != ":memory:" and not database.startswith("file:"):
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            self.writer = create_async_engine(
                url, echo=echo, pool_size=1, max_overflow=0, pool_timeout=600
            )
            self.reader = create_async_engine(url, echo=echo, pool_size=4, max_overflow=4)
            _sqlite_setup(self.writer, immediate=True)
            _sqlite_setup(self.reader, immediate=False)
        else:
            self.writer = create_async_engine(url, echo=echo, pool_size=20, max_overflow=20)
            self.reader = self.writer

    async def close(self) -> None:
        await self.writer.dispose()
        if self.reader is not self.writer:
            await self.reader.dispose()

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        async with self.writer.begin() as conn:
            yield conn

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self.reader.connect() as conn:
            yield conn

    async def migrate(self) -> None:
        """Bring the schema to the newest migration (safe to run every start)."""
        from core.migrate import upgrade

        async with self.writer.begin() as conn:
            await conn.run_sync(upgrade)

    # -- inbox -----------------------------------------------------------------------------

    async def add_inbound(self, inbound: Inbound) -> bool:
        """Keep a message for its turn; False when its event id was seen before."""
        now = utcnow()
        try:
            async with self.write() as conn:
                await conn.execute(
                    inbox.insert().values(
                        event_id=inbound.event_id,
                        thread_key=inbound.thread.key,
                        source=inbound.thread.source,
                        payload=inbound.to_json(),
                        status="pending",
                        attempts=0,
                        created=now,
                        updated=now,
                    )
                )
        except IntegrityError:
            return False
        return True

    async def claim_inbox(self, sources: Sequence[str], limit: int, lease_s: float) -> list[Claim]:
        """Take up to `limit` items: the oldest unfinished one of each thread no one holds."""
        return await self._claim(inbox, sources, limit, lease_s)

    async def claim_outbox(self, sources: Sequence[str], limit: int, lease_s: float) -> list[Claim]:
        """Take up to `limit` replies to post: the oldest unsent one of each thread."""
        return await self._claim(outbox, sources, limit, lease_s)

    async def _claim(
        self, table: sa.Table, sources: Sequence[str], limit: int, lease_s: float
    ) -> list[Claim]:
        if limit <= 0 or not sources:
            return []
        now = utcnow()
        inner = table.alias("inner")
        first = (
            sa.select(sa.func.min(inner.c.id))
            .where(inner.c.thread_key == table.c.thread_key, inner.c.status.in_(UNFINISHED))
            .scalar_subquery()
        )
        claimable = sa.or_(
            table.c.status == "pending",
            sa.and_(table.c.status == "working", table.c.lease_until < now),
        )
        conditions: list[Any] = [table.c.status.in_(UNFINISHED), table.c.source.in_(list(sources))]
        conditions += [table.c.id == first, claimable]
        if table is outbox:
            conditions.append(sa.or_(table.c.not_before.is_(None), table.c.not_before <= now))
        token = uuid.uuid4().hex
        async with self.write() as conn:
            ids = (
                (
                    await conn.execute(
                        sa.select(table.c.id).where(*conditions).order_by(table.c.id).limit(limit)
                    )
                )
                .scalars()
                .all()
            )
            if not ids:
                return []
            result = await conn.execute(
                table.update()
                .where(table.c.id.in_(ids), claimable)
                .values(
                    status="working",
                    claim_token=token,
                    lease_until=now + timedelta(seconds=lease_s),
                    attempts=table.c.attempts + 1,
                    updated=now,
                )
                .returning(
                    table.c.id,
                    table.c.thread_key,
                    table.c.payload,
                    table.c.attempts,
                    table.c.conversation_id,
                    table.c.created,
                )
            )
            rows = result.all()
        claims = [
            Claim(
                r.id,
                r.thread_key,
                r.payload,
                token,
                r.attempts,
                r.conversation_id,
                aware(r.created),
            )
            for r in rows
        ]
        claims.sort(key=lambda c: c.id)
        return claims

    async def renew(self, table_name: str, tokens: Sequence[str], lease_s: float) -> None:
        """Extend the leases of the items held under `tokens`."""
        if not tokens:
            return
        table = inbox if table_name == "inbox" else outbox
        async with self.write() as conn:
            await conn.execute(
                table.update()
                .where(table.c.claim_token.in_(list(tokens)), table.c.status == "working")
                .values(lease_until=utcnow() + timedelta(seconds=lease_s))
            )

    async def release(self, table_name: str, tokens: Sequence[str]) -> None:
        """Hand back the items held under `tokens` so any worker may take them now."""
        if not tokens:
            return
        table = inbox if table_name == "inbox" else outbox
        async with self.write() as conn:
            await conn.execute(
                table.update()
                .where(table.c.claim_token.in_(list(tokens)), table.c.status == "working")
                .values(status="pending", claim_token=None, lease_until=None)
            )

    async def release_stale(self, sources: Sequence[str]) -> int:
        """Hand back every claim on `sources` at start (one host owns a SQLite file)."""
        count = 0
        async with self.write() as conn:
            for table in (inbox, outbox):
                result = await conn.execute(
                    table.update()
                    .where(table.c.status == "working", table.c.source.in_(list(sources)))
                    .values(status="pending", claim_token=None, lease_until=None)
                )
                count += result.rowcount
        return count

    async def retry_outbox_later(self, claim: Claim, delay_s: float, error: str) -> None:
        async with self.write() as conn:
            await conn.execute(
                outbox.update()
                .where(outbox.c.id == claim.id, outbox.c.claim_token == claim.token)
                .values(
                    status="pending",
                    claim_token=None,
                    lease_until=None,
                    not_before=utcnow() + timedelta(seconds=delay_s),
                    error=error[:2000],
                    updated=utcnow(),
                )
            )

    async def finish_outbox(
        self,
        claim: Claim,
        *,
        sent: bool,
        platform_ids: list[str] | None = None,
        error: str | None = None,
    ) -> None:
        async with self.write() as conn:
            await conn.execute(
                outbox.update()
                .where(outbox.c.id == claim.id, outbox.c.claim_token == claim.token)
                .values(
                    status="sent" if sent else "failed",
                    platform_ids=platform_ids,
                    error=error[:2000] if error else None,
                    lease_until=None,
                    updated=utcnow(),
                )
            )

    async def queue_reply(
        self,
        thread: ThreadRef,
        payload: dict[str, Any],
        conversation_id: str | None = None,
        message_id: int | None = None,
        conn: AsyncConnection | None = None,
    ) -> None:
        """Put a reply in the outbox (inside `conn`'s transaction when given)."""
        values = {
            "thread_key": thread.key,
            "source": thread.source,
            "conversation_id": conversation_id,
            "message_id": message_id,
            "payload": payload,
            "status": "pending",
            "attempts": 0,
            "created": utcnow(),
            "updated": utcnow(),
        }
        if conn is not None:
            await conn.execute(outbox.insert().values(**values))
            return
        async with self.write() as own:
            await own.execute(outbox.insert().values(**values))

    # -- conversations ---------------------------------------------------------------------

    async def conversation_for_thread(self, thread_key: str) -> Conversation | None:
        """The conversation the thread continues now, if any."""
        query = (
            sa.select(conversations)
            .join(links, links.c.conversation_id == conversations.c.id)
            .where(links.c.thread_key == thread_key)
        )
        async with self.read() as conn:
            row = (await conn.execute(query)).first()
        return row_to_conversation(row) if row else None

    async def open_conversation(
        self, thread: ThreadRef, agent: str, data: dict[str, Any], user_id: str | None
    ) -> Conversation:
        """Create a conversation and link the thread to it (or return the one linked already)."""
        now = utcnow()
        conversation_id = str(uuid.uuid4())
        try:
            async with self.write() as conn:
                await conn.execute(
                    conversations.insert().values(
                        id=conversation_id,
                        thread_key=thread.key,
                        source=thread.source,
                        workspace=thread.workspace,
                        channel=thread.channel,
                        user_id=user_id,
                        agent=agent,
                        data=data,
                        status="open",
                        created=now,
                        updated=now,
                    )
                )
                await conn.execute(
                    links.insert().values(
                        thread_key=thread.key, conversation_id=conversation_id, created=now
                    )
                )
        except IntegrityError:
            existing = await self.conversation_for_thread(thread.key)
            if existing is None:
                raise
            return existing
        found = await self.get_conversation(conversation_id)
        assert found is not None
        return found

    async def set_remote(
        self,
        conversation_id: str,
        *,
        remote_id: str | None = None,
        state: dict[str, Any] | None = None,
    ) -> None:
        values: dict[str, Any] = {"updated": utcnow()}
        if remote_id is not None:
            values["remote_id"] = remote_id
        if state is not None:
            values["state"] = state
        async with self.write() as conn:
            await conn.execute(
                conversations.update().where(conversations.c.id == conversation_id).values(**values)
            )

    async def end_thread(self, thread_key: str) -> str | None:
        """Unlink the thread (`/new`); its next message opens a new conversation."""
        async with self.write() as conn:
            row = (
                await conn.execute(
                    sa.select(links.c.conversation_id).where(links.c.thread_key == thread_key)
                )
            ).first()
            if row is None:
                return None
            await conn.execute(links.delete().where(links.c.thread_key == thread_key))
            await conn.execute(
                conversations.update()
                .where(conversations.c.id == row.conversation_id)
                .values(status="closed", updated=utcnow())
            )
        return str(row.conversation_id)

    async def get_conversation(self, conversation_id: str) -> Conversation | None:
        async with self.read() as conn:
            row = (
                await conn.execute(
                    sa.select(conversations).where(conversations.c.id == conversation_id)
                )
            ).first()
        return row_to_conversation(row) if row else None

    async def finish_turn(
        self,
        claim: Claim,
        conversation: Conversation,
        new: Sequence[NewMessage],
        *,
        failed: str | None = None,
        remote_id: str | None = None,
        state: dict[str, Any] | None = None,
    ) -> None:
        """Store a turn's messages, queue its replies and close its inbox item, atomically."""
        now = utcnow()
        thread = ThreadRef.parse(conversation.thread_key)
        async with self.write() as conn:
            done = await conn.execute(
                inbox.update()
                .where(
                    inbox.c.id == claim.id,
                    inbox.c.claim_token == claim.token,
                    inbox.c.status == "working",
                )
                .values(
                    status="failed" if failed else "done",
                    conversation_id=conversation.id,
                    error=failed[:2000] if failed else None,
                    lease_until=None,
                    updated=now,
                )
            )
            if done.rowcount != 1:
                raise ClaimLost(f"inbox item {claim.id} was taken by another worker")
            for message in new:
                result = await conn.execute(
                    messages.insert().values(
                        conversation_id=conversation.id,
                        role=message.role,
                        kind=message.kind,
                        content=message.content,
                        name=message.name,
                        author_id=message.author_id,
                        author_name=message.author_name,
                        event_id=message.event_id,
                        tool_calls=message.tool_calls,
                        tool_call_id=message.tool_call_id,
                        created=message.created or now,
                    )
                )
                if message.post:
                    payload = {
                        "text": message.content,
                        "kind": message.kind,
                        "reply_to": claim.payload.get("event_id"),
                    }
                    await self.queue_reply(thread, payload, conversation.id, _new_id(result), conn)
            values: dict[str, Any] = {"updated": now, "status": "failed" if failed else "open"}
            if remote_id is not None:
                values["remote_id"] = remote_id
            if state is not None:
                values["state"] = state
            await conn.execute(
                conversations.update().where(conversations.c.id == conversation.id).values(**values)
            )

    async def history(self, conversation_id: str, limit: int | None = None) -> list[Any]:
        """The conversation's stored messages, oldest first (the newest `limit` of them)."""
        query = sa.select(messages).where(messages.c.conversation_id == conversation_id)
        if limit is not None:
            query = query.order_by(messages.c.id.desc()).limit(limit)
            async with self.read() as conn:
                rows = list((await conn.execute(query)).all())
            return rows[::-1]
        async with self.read() as conn:
            return list((await conn.execute(query.order_by(messages.c.id))).all())

    async def pending_for_thread(self, thread_key: str) -> list[Any]:
        """Messages accepted for the thread whose turn has not finished yet."""
        query = (
            sa.select(inbox.c.payload, inbox.c.created, inbox.c.status)
            .where(inbox.c.thread_key == thread_key, inbox.c.status.in_(UNFINISHED))
            .order_by(inbox.c.id)
        )
        async with self.read() as conn:
            return list((await conn.execute(query)).all())

    async def search(self, f: SearchFilters) -> tuple[list[Conversation], int]:
        """Conversations matching every filter given, a page of them and the total."""
        conditions: list[Any] = []
        for column, value in (
            (conversations.c.source, f.source),
            (conversations.c.workspace, f.workspace),
            (conversations.c.channel, f.channel),
            (conversations.c.user_id, f.user),
            (conversations.c.agent, f.agent),
            (conversations.c.status, f.status),
        ):
            if value is not None:
                conditions.append(column == value)
        if f.since is not None:
            conditions.append(conversations.c.created >= as_utc(f.since))
        if f.until is not None:
            conditions.append(conversations.c.created < as_utc(f.until))
        if f.text:
            pattern = (
                "%" + f.text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            )
            conditions.append(
                sa.exists().where(
                    messages.c.conversation_id == conversations.c.id,
                    messages.c.content.ilike(pattern, escape="\\"),
                )
            )
        order = conversations.c.created.desc() if f.reversed else conversations.c.created.asc()
        tie = conversations.c.id.desc() if f.reversed else conversations.c.id.asc()
        query = sa.select(conversations).where(*conditions).order_by(order, tie)
        async with self.read() as conn:
            total = (
                await conn.execute(
                    sa.select(sa.func.count()).select_from(conversations).where(*conditions)
                )
            ).scalar_one()
            rows = (await conn.execute(query.limit(f.limit).offset(f.offset))).all()
        return [row_to_conversation(r) for r in rows], int(total)

    async def turns_failed(self, conversation_id: str) -> list[Any]:
        query = sa.select(inbox.c.event_id, inbox.c.error, inbox.c.updated).where(
            inbox.c.conversation_id == conversation_id, inbox.c.status == "failed"
        )
        async with self.read() as conn:
            return list((await conn.execute(query.order_by(inbox.c.id))).all())

    # -- routes ----------------------------------------------------------------------------

    async def list_routes(self) -> list[Any]:
        async with self.read() as conn:
            return list((await conn.execute(sa.select(routes).order_by(routes.c.id))).all())

    async def set_route(
        self,
        source: str,
        workspace: str,
        channel: str,
        agent: str,
        *,
        situation: str | None = None,
        set_by: str | None = None,
    ) -> None:
        now = utcnow()
        async with self.write() as conn:
            updated = await conn.execute(
                routes.update()
                .where(
                    routes.c.source == source,
                    routes.c.workspace == workspace,
                    routes.c.channel == channel,
                )
                .values(agent=agent, situation=situation, set_by=set_by, updated=now)
            )
            if updated.rowcount == 0:
                await conn.execute(
                    routes.insert().values(
                        source=source,
                        workspace=workspace,
                        channel=channel,
                        agent=agent,
                        situation=situation,
                        set_by=set_by,
                        created=now,
                        updated=now,
                    )
                )

    async def delete_route(self, source: str, workspace: str, channel: str) -> bool:
        async with self.write() as conn:
            result = await conn.execute(
                routes.delete().where(
                    routes.c.source == source,
                    routes.c.workspace == workspace,
                    routes.c.channel == channel,
                )
            )
        return bool(result.rowcount)

    async def counts(self) -> dict[str, int]:
        """Queue depths for health pages and tests."""
        out: dict[str, int] = {}
        async with self.read() as conn:
            for name, table in (("inbox", inbox), ("outbox", outbox)):
                query = sa.select(table.c.status, sa.func.count()).group_by(table.c.status)
                for status, count in (await conn.execute(query)).all():
                    out[f"{name}_{status}"] = int(count)
        return out


def _new_id(result: Any) -> int:
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def _sqlite_setup(engine: AsyncEngine, *, immediate: bool) -> None:
    """WAL, a busy timeout, and our own BEGIN (IMMEDIATE for the writer)."""
    begin = "BEGIN IMMEDIATE" if immediate else "BEGIN"

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)
