"""The async store: conversations, thread links, messages, routes, inbox and outbox.

Every write is a small synchronous job over a connection. On SQLite (the default) one writer
thread commits the jobs waiting at any moment in one transaction (core.sqlite), while a small
pool of async readers reads beside it (WAL). On PostgreSQL each job runs in its own
transaction on the async pool. Hot paths use SQLAlchemy Core over the SQLModel tables.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from core import sql, sqlite
from core.model import Conversation, Inbound, ThreadRef
from core.sql import UNFINISHED, conversations, inbox, links, messages, outbox, posts, routes
from core.tables import utcnow

log = logging.getLogger(__name__)


T = TypeVar("T")


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
        self._writer: sqlite.WriterThread | None = None
        self._engine: AsyncEngine | None = None
        if self.is_sqlite:
            database = parsed.database or ""
            if database and database != ":memory:" and not database.startswith("file:"):
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            sync_url = parsed.set(drivername="sqlite")
            self._writer = sqlite.WriterThread(sync_url, echo=echo)
            self._readers = sqlite.ReaderPool(sync_url, echo=echo)
        else:
            if parsed.get_backend_name() == "postgresql":  # "postgresql://…" means asyncpg here
                parsed = parsed.set(drivername="postgresql+asyncpg")
            self._engine = create_async_engine(parsed, echo=echo, pool_size=20, max_overflow=20)

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer.close()
            self._readers.close()
        if self._engine is not None:
            await self._engine.dispose()

    async def write(self, job: Callable[[Connection], T]) -> T:
        """Run `job` in a write transaction; its result once committed.

        A job that raises leaves nothing behind, and its exception reaches this caller only.
        """
        if self._writer is not None:
            return await self._writer.run(job)
        assert self._engine is not None
        async with self._engine.begin() as conn:
            return await conn.run_sync(job)

    async def read(self, job: Callable[[Connection], T], *, snapshot: bool = False) -> T:
        """Run `job` on a connection that sees everything committed so far.

        With `snapshot`, every statement of the job sees the same moment (SQLite's read
        transactions always do; PostgreSQL needs REPEATABLE READ for it).
        """
        if self._writer is not None:
            return await self._readers.run(job)
        assert self._engine is not None
        async with self._engine.connect() as conn:
            if snapshot:
                conn = await conn.execution_options(isolation_level="REPEATABLE READ")
            return await conn.run_sync(job)

    async def migrate(self) -> None:
        """Bring the schema to the newest migration (safe to run every start)."""
        from core.migrate import upgrade

        await self.write(upgrade)

    # -- inbox -----------------------------------------------------------------------------

    async def add_inbound(self, inbound: Inbound) -> bool:
        """Keep a message for its turn; False when its event id was seen before."""
        now = utcnow()
        values = {
            "event_id": inbound.event_id,
            "thread_key": inbound.thread.key,
            "source": inbound.thread.source,
            "payload": inbound.to_json(),
            "status": "pending",
            "attempts": 0,
            "created": now,
            "updated": now,
        }
        try:
            await self.write(lambda conn: conn.execute(sql.insert_inbox, values))
        except IntegrityError:
            return False
        return True

    async def claim_inbox(self, sources: Sequence[str], limit: int, lease_s: float) -> list[Claim]:
        """Take up to `limit` items: the oldest unfinished one of each thread no one holds."""
        return await self._claim("inbox", sources, limit, lease_s)

    async def claim_outbox(self, sources: Sequence[str], limit: int, lease_s: float) -> list[Claim]:
        """Take up to `limit` replies to post: the oldest unsent one of each thread."""
        return await self._claim("outbox", sources, limit, lease_s)

    async def _claim(
        self, name: str, sources: Sequence[str], limit: int, lease_s: float
    ) -> list[Claim]:
        if limit <= 0 or not sources:
            return []
        token = uuid.uuid4().hex
        find, take = sql.CLAIM[name]

        def job(conn: Connection) -> list[Any]:
            now = utcnow()
            params = {"b_now": now, "b_sources": list(sources), "b_limit": limit}
            ids = conn.execute(find, params).scalars().all()
            if not ids:
                return []
            params.update(
                b_ids=list(ids), b_token=token, b_lease_until=now + timedelta(seconds=lease_s)
            )
            return list(conn.execute(take, params).all())

        rows = await self.write(job)
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
        statement = (
            table.update()
            .where(table.c.claim_token.in_(list(tokens)), table.c.status == "working")
            .values(lease_until=utcnow() + timedelta(seconds=lease_s))
        )
        await self.write(lambda conn: conn.execute(statement))

    async def release(self, table_name: str, tokens: Sequence[str]) -> None:
        """Hand back the items held under `tokens` so any worker may take them now."""
        if not tokens:
            return
        table = inbox if table_name == "inbox" else outbox
        statement = (
            table.update()
            .where(table.c.claim_token.in_(list(tokens)), table.c.status == "working")
            .values(status="pending", claim_token=None, lease_until=None)
        )
        await self.write(lambda conn: conn.execute(statement))

    async def release_stale(self, sources: Sequence[str]) -> int:
        """Hand back every claim on `sources` at start (one host owns a SQLite file)."""

        def job(conn: Connection) -> int:
            count = 0
            for table in (inbox, outbox):
                result = conn.execute(
                    table.update()
                    .where(table.c.status == "working", table.c.source.in_(list(sources)))
                    .values(status="pending", claim_token=None, lease_until=None)
                )
                count += result.rowcount
            return count

        return await self.write(job)

    async def retry_outbox_later(
        self, claim: Claim, delay_s: float, error: str, payload: dict[str, Any] | None = None
    ) -> None:
        """Hand the item back for a later try; `payload` replaces its payload (progress)."""
        values: dict[str, Any] = {
            "status": "pending",
            "claim_token": None,
            "lease_until": None,
            "not_before": utcnow() + timedelta(seconds=delay_s),
            "error": error[:2000],
            "updated": utcnow(),
        }
        if payload is not None:
            values["payload"] = payload
        statement = (
            outbox.update()
            .where(outbox.c.id == claim.id, outbox.c.claim_token == claim.token)
            .values(**values)
        )
        await self.write(lambda conn: conn.execute(statement))

    async def finish_outbox(
        self,
        claim: Claim,
        *,
        sent: bool,
        platform_ids: list[str] | None = None,
        error: str | None = None,
    ) -> None:
        params = {
            "b_id": claim.id,
            "b_token": claim.token,
            "b_status": "sent" if sent else "failed",
            "b_platform_ids": platform_ids,
            "b_error": error[:2000] if error else None,
            "b_now": utcnow(),
        }
        await self.write(lambda conn: conn.execute(sql.finish_post, params))

    async def queue_reply(
        self, thread: ThreadRef, payload: dict[str, Any], conversation_id: str | None = None
    ) -> None:
        """Put a reply in the outbox."""
        await self.write(lambda conn: _queue_reply(conn, thread, payload, conversation_id, None))

    # -- conversations ---------------------------------------------------------------------

    async def conversation_for_thread(self, thread_key: str) -> Conversation | None:
        """The conversation the thread continues now, if any."""
        params = {"thread_key": thread_key}
        row = await self.read(lambda conn: conn.execute(sql.conversation_by_thread, params).first())
        return row_to_conversation(row) if row else None

    async def open_conversation(
        self, thread: ThreadRef, agent: str, data: dict[str, Any], user_id: str | None
    ) -> Conversation:
        """Create a conversation and link the thread to it (or return the one linked already)."""
        now = utcnow()
        created = Conversation(
            id=str(uuid.uuid4()),
            thread_key=thread.key,
            source=thread.source,
            agent=agent,
            data=data,
            status="open",
            created=now,
            updated=now,
        )

        row = {
            "id": created.id,
            "thread_key": thread.key,
            "source": thread.source,
            "workspace": thread.workspace,
            "channel": thread.channel,
            "user_id": user_id,
            "agent": agent,
            "data": data,
            "status": "open",
            "created": now,
            "updated": now,
        }
        link = {"thread_key": thread.key, "conversation_id": created.id, "created": now}

        def job(conn: Connection) -> None:
            conn.execute(sql.insert_conversation, row)
            conn.execute(sql.insert_link, link)

        try:
            await self.write(job)
        except IntegrityError:
            existing = await self.conversation_for_thread(thread.key)
            if existing is None:
                raise
            return existing
        return created

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
        statement = (
            conversations.update().where(conversations.c.id == conversation_id).values(**values)
        )
        await self.write(lambda conn: conn.execute(statement))

    async def end_thread(self, thread_key: str) -> str | None:
        """Unlink the thread (`/new`); its next message opens a new conversation."""
        ended = await self._end_threads(links.c.thread_key == thread_key)
        return ended[0] if ended else None

    async def end_threads_under(self, prefix: str) -> list[str]:
        """Unlink every thread whose key starts with `prefix` (all threads of a DM channel)."""
        return await self._end_threads(links.c.thread_key.startswith(prefix, autoescape=True))

    async def _end_threads(self, where: Any) -> list[str]:
        def job(conn: Connection) -> list[str]:
            ids = [str(r.conversation_id) for r in conn.execute(sa.select(links).where(where))]
            if not ids:
                return []
            conn.execute(links.delete().where(where))
            conn.execute(
                conversations.update()
                .where(conversations.c.id.in_(ids))
                .values(status="closed", updated=utcnow())
            )
            return ids

        return await self.write(job)

    async def get_conversation(self, conversation_id: str) -> Conversation | None:
        params = {"id": conversation_id}
        row = await self.read(lambda conn: conn.execute(sql.conversation_by_id, params).first())
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
        thread = ThreadRef.parse(conversation.thread_key)

        def job(conn: Connection) -> None:
            now = utcnow()
            done = conn.execute(
                sql.finish_inbox,
                {
                    "b_id": claim.id,
                    "b_token": claim.token,
                    "b_status": "failed" if failed else "done",
                    "b_conversation_id": conversation.id,
                    "b_error": failed[:2000] if failed else None,
                    "b_now": now,
                },
            )
            if done.rowcount != 1:
                raise ClaimLost(f"inbox item {claim.id} was taken by another worker")
            for message in new:
                result = conn.execute(
                    sql.insert_message,
                    {
                        "conversation_id": conversation.id,
                        "role": message.role,
                        "kind": message.kind,
                        "content": message.content,
                        "name": message.name,
                        "author_id": message.author_id,
                        "author_name": message.author_name,
                        "event_id": message.event_id,
                        "tool_calls": message.tool_calls,
                        "tool_call_id": message.tool_call_id,
                        "created": message.created or now,
                    },
                )
                if message.post:
                    payload = {
                        "text": message.content,
                        "kind": message.kind,
                        "reply_to": claim.payload.get("event_id"),
                    }
                    _queue_reply(conn, thread, payload, conversation.id, _new_id(result))
            conn.execute(
                sql.finish_conversation,
                {
                    "b_id": conversation.id,
                    "b_status": "failed" if failed else "open",
                    "b_remote_id": remote_id,
                    "b_state": state,
                    "b_now": now,
                },
            )

        await self.write(job)

    async def history(self, conversation_id: str, limit: int | None = None) -> list[Any]:
        """The conversation's stored messages, oldest first (the newest `limit` of them)."""
        if limit is not None:
            params: dict[str, Any] = {"conversation_id": conversation_id, "limit": limit}
            rows = await self.read(lambda conn: list(conn.execute(sql.newest_messages, params)))
            return rows[::-1]
        params = {"conversation_id": conversation_id}
        return await self.read(lambda conn: list(conn.execute(sql.all_messages, params)))

    async def remember_posts(self, thread_key: str, keys: Sequence[str]) -> None:
        """Note which thread the bot's posted messages belong to (see `thread_of_post`)."""
        if not keys:
            return
        rows = [{"key": k, "thread_key": thread_key, "created": utcnow()} for k in keys]

        def job(conn: Connection) -> None:
            conn.execute(posts.delete().where(posts.c.key.in_(list(keys))))
            conn.execute(posts.insert(), rows)

        await self.write(job)

    async def thread_of_post(self, key: str) -> str | None:
        """The thread of a message the bot posted, by its platform key."""
        statement = sa.select(posts.c.thread_key).where(posts.c.key == key)
        return await self.read(lambda conn: conn.execute(statement).scalar())

    async def move_threads(self, old_prefix: str, new_prefix: str, channel: str) -> int:
        """Re-key every thread under `old_prefix` (a chat that got a new id); return how many
        links moved. Conversations keep their history and continue under the new keys."""

        def moved(column: Any) -> Any:
            return sa.literal(new_prefix) + sa.func.substr(column, len(old_prefix) + 1)

        def job(conn: Connection) -> int:
            under = links.c.thread_key.startswith(old_prefix, autoescape=True)
            count = conn.execute(
                links.update().where(under).values(thread_key=moved(links.c.thread_key))
            ).rowcount
            conn.execute(
                conversations.update()
                .where(conversations.c.thread_key.startswith(old_prefix, autoescape=True))
                .values(thread_key=moved(conversations.c.thread_key), channel=channel)
            )
            conn.execute(
                posts.update()
                .where(posts.c.thread_key.startswith(old_prefix, autoescape=True))
                .values(thread_key=moved(posts.c.thread_key))
            )
            return int(count or 0)

        return await self.write(job)

    async def thread_known(self, thread_key: str) -> bool:
        """Whether the thread is ours: linked to a conversation, or with a message accepted."""
        linked = sa.select(links.c.thread_key).where(links.c.thread_key == thread_key)
        accepted = sa.select(inbox.c.id).where(inbox.c.thread_key == thread_key).limit(1)

        def job(conn: Connection) -> bool:
            return bool(conn.execute(linked).first() or conn.execute(accepted).first())

        return await self.read(job)

    async def thread_view(self, thread_key: str) -> tuple[list[Any], list[Any]]:
        """A thread as its person sees it, at one moment: the linked conversation's stored
        messages, and the messages accepted whose turn has not finished yet."""
        pending = (
            sa.select(inbox.c.payload, inbox.c.created, inbox.c.status)
            .where(inbox.c.thread_key == thread_key, inbox.c.status.in_(UNFINISHED))
            .order_by(inbox.c.id)
        )

        def job(conn: Connection) -> tuple[list[Any], list[Any]]:
            linked = conn.execute(sql.conversation_by_thread, {"thread_key": thread_key}).first()
            stored = []
            if linked is not None:
                stored = list(conn.execute(sql.all_messages, {"conversation_id": linked.id}))
            return stored, list(conn.execute(pending))

        return await self.read(job, snapshot=True)

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
        page = (
            sa.select(conversations)
            .where(*conditions)
            .order_by(order, tie)
            .limit(f.limit)
            .offset(f.offset)
        )
        count = sa.select(sa.func.count()).select_from(conversations).where(*conditions)

        def job(conn: Connection) -> tuple[list[Any], int]:
            return list(conn.execute(page).all()), int(conn.execute(count).scalar_one())

        rows, total = await self.read(job, snapshot=True)
        return [row_to_conversation(r) for r in rows], total

    async def turns_failed(self, conversation_id: str) -> list[Any]:
        query = sa.select(inbox.c.event_id, inbox.c.error, inbox.c.updated).where(
            inbox.c.conversation_id == conversation_id, inbox.c.status == "failed"
        )
        ordered = query.order_by(inbox.c.id)
        return await self.read(lambda conn: list(conn.execute(ordered).all()))

    # -- routes ----------------------------------------------------------------------------

    async def list_routes(self) -> list[Any]:
        query = sa.select(routes).order_by(routes.c.id)
        return await self.read(lambda conn: list(conn.execute(query).all()))

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
        def job(conn: Connection) -> None:
            now = utcnow()
            scope = (
                routes.c.source == source,
                routes.c.workspace == workspace,
                routes.c.channel == channel,
            )
            updated = conn.execute(
                routes.update()
                .where(*scope)
                .values(agent=agent, situation=situation, set_by=set_by, updated=now)
            )
            if updated.rowcount == 0:
                conn.execute(
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

        await self.write(job)

    async def delete_route(self, source: str, workspace: str, channel: str) -> bool:
        statement = routes.delete().where(
            routes.c.source == source, routes.c.workspace == workspace, routes.c.channel == channel
        )
        result = await self.write(lambda conn: conn.execute(statement))
        return bool(result.rowcount)

    async def counts(self) -> dict[str, int]:
        """Queue depths for health pages and tests."""

        def job(conn: Connection) -> dict[str, int]:
            out: dict[str, int] = {}
            for name, table in (("inbox", inbox), ("outbox", outbox)):
                query = sa.select(table.c.status, sa.func.count()).group_by(table.c.status)
                for status, count in conn.execute(query).all():
                    out[f"{name}_{status}"] = int(count)
            return out

        return await self.read(job)


def _new_id(result: Any) -> int:
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def _queue_reply(
    conn: Connection,
    thread: ThreadRef,
    payload: dict[str, Any],
    conversation_id: str | None,
    message_id: int | None,
) -> None:
    now = utcnow()
    conn.execute(
        sql.insert_outbox,
        {
            "thread_key": thread.key,
            "source": thread.source,
            "conversation_id": conversation_id,
            "message_id": message_id,
            "payload": payload,
            "status": "pending",
            "attempts": 0,
            "created": now,
            "updated": now,
        },
    )
