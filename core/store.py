"""The async store: conversations, thread links, messages, routes, inbox and outbox.

Every write is a small synchronous job over a connection. On SQLite (the default) one writer
thread commits the jobs waiting at any moment in one transaction (core.sqlite), while a small
pool of async readers reads beside it (WAL). On PostgreSQL each job runs in its own
transaction on the async pool. Hot paths use SQLAlchemy Core over the SQLModel tables.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from core import pg_quick, search_pg, sql, sqlite
from core import search as searching
from core.leader import FileLeadership, Leadership, PostgresLeadership, lock_file
from core.model import Conversation, Inbound, ThreadRef
from core.search import SearchFilters as SearchFilters  # where callers have imported it from
from core.sql import (
    UNFINISHED,
    conversations,
    inbox,
    links,
    messages,
    outbox,
    posts,
    route_changes,
    routes,
)
from core.tables import utcnow

log = logging.getLogger(__name__)


T = TypeVar("T")


def aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every time we store is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


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

    @classmethod
    def of_user(
        cls, inbound: Inbound, created: datetime | None, kind: str = "message"
    ) -> NewMessage:
        """What a person wrote, as stored with its turn (`refused`: not sent to the agent)."""
        return cls(
            role="user",
            content=inbound.text,
            kind=kind,
            name=inbound.author.name or None,
            author_id=inbound.author.id,
            author_name=inbound.author.name or None,
            event_id=inbound.event_id,
            created=created,
        )


@dataclass(frozen=True, slots=True)
class RouteChange:
    """One entry of the routes' audit log: who changed which scope when, old → new.

    `old_*` is the run-time route the change replaced or removed (None: there was none, so
    the config file's route or the default applied); `moved` counts the open threads that
    `move_open` ended.
    """

    at: datetime
    who: str | None
    source: str
    workspace: str | None  # None: any
    channel: str | None
    action: str  # "set" | "unset"
    old_agent: str | None
    new_agent: str | None
    old_situation: str | None
    new_situation: str | None
    moved: int = 0
    id: int | None = None


@dataclass(frozen=True, slots=True)
class Intake:
    """What `add_inbound` did: whether the message was new, and its claim if taken at once."""

    added: bool
    claim: Claim | None = None


@dataclass(frozen=True, slots=True)
class Handoff:
    """Work a finished turn hands straight to its worker: its first reply to post, and its
    thread's next message."""

    posts: list[Claim]
    next_turn: Claim | None


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
        # SQLite files: quick jobs run on the event loop's thread (core.sqlite.InlineWriter).
        self._quick_writer: sqlite.InlineWriter | None = None
        self._quick_reader: sqlite.InlineReader | None = None
        self._checkpointer: sqlite.Checkpointer | None = None
        self._engine: AsyncEngine | None = None
        self._held: pg_quick.HeldReaders | None = None  # PostgreSQL's quick reads
        self._database = parsed.database or ""
        if self.is_sqlite:
            database = self._database
            a_file = bool(database) and database != ":memory:" and not database.startswith("file:")
            if a_file:
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            sync_url = parsed.set(drivername="sqlite")
            self._writer = sqlite.WriterThread(sync_url, echo=echo, hot=sql.HOT)
            self._readers = sqlite.ReaderPool(sync_url, echo=echo, hot=sql.HOT)
            if a_file:
                self._quick_writer = sqlite.InlineWriter(
                    sync_url, self._writer, echo=echo, hot=sql.HOT
                )
                self._quick_reader = sqlite.InlineReader(
                    sync_url, self._quick_writer, self._readers, echo=echo, hot=sql.HOT
                )
                self._checkpointer = sqlite.Checkpointer(database)
        else:
            if parsed.get_backend_name() == "postgresql":  # "postgresql://…" means asyncpg here
                parsed = parsed.set(drivername="postgresql+asyncpg")
            # JIT compiles a plan whose estimated cost passes jit_above_cost, for 50-100 ms,
            # before it runs: a text search of a common word is estimated that high and
            # finished in less. Nothing here runs long enough to win that back.
            self._engine = create_async_engine(
                parsed,
                echo=echo,
                pool_size=20,
                max_overflow=20,
                connect_args={"server_settings": {"jit": "off"}},
            )
            self._held = pg_quick.HeldReaders(self._engine, self._pooled_read)

    async def close(self) -> None:
        if self._quick_writer is not None and self._quick_reader is not None:
            self._quick_reader.close()
            self._quick_writer.close()
        if self._writer is not None:
            await self._writer.close()
            self._readers.close()
        if self._checkpointer is not None:
            await self._checkpointer.close()
        if self._held is not None:
            await self._held.close()
        if self._engine is not None:
            await self._engine.dispose()

    def leadership(self, role: str) -> Leadership:
        """The lock that elects one instance on this store for `role` (see core.leader)."""
        if self._engine is None:
            return FileLeadership(role, lock_file(self._database, role))
        _, options = self._engine.dialect.create_connect_args(self._engine.url)
        return PostgresLeadership(role, options)

    async def write(self, job: Callable[[Connection], T], *, quick: bool = False) -> T:
        """Run `job` in a write transaction; its result once committed.

        A job that raises leaves nothing behind, and its exception reaches this caller only.
        A `quick` job (a few statements on indexed rows) runs on the event loop's thread on a
        SQLite file (core.sqlite.InlineWriter).
        """
        if quick and self._quick_writer is not None:
            return await self._quick_writer.run(job)
        if self._writer is not None:
            return await self._writer.run(job)
        assert self._engine is not None
        async with self._engine.begin() as conn:
            return await conn.run_sync(job)

    async def read(
        self, job: Callable[[Connection], T], *, snapshot: bool = False, quick: bool = False
    ) -> T:
        """Run `job` on a connection that sees everything committed so far.

        With `snapshot`, every statement of the job sees the same moment (SQLite's read
        transactions always do; PostgreSQL needs REPEATABLE READ for it). A `quick` job (a few
        rows by index) runs on the event loop's thread on a SQLite file, and on a connection
        held open for such reads on PostgreSQL (core.pg_quick).
        """
        if quick and self._quick_reader is not None:
            return await self._quick_reader.run(job)
        if quick and not snapshot and self._held is not None:
            return await self._held.run(job)
        if self._writer is not None:
            return await self._readers.run(job)
        return await self._pooled_read(job, snapshot=snapshot)

    async def _pooled_read(self, job: Callable[[Connection], T], *, snapshot: bool = False) -> T:
        assert self._engine is not None
        async with self._engine.connect() as conn:
            # Without a snapshot no transaction is opened: each statement still sees what was
            # committed before it (as under READ COMMITTED), and a read is one round trip
            # instead of three (BEGIN, the query, ROLLBACK).
            level = "REPEATABLE READ" if snapshot else "AUTOCOMMIT"
            conn = await conn.execution_options(isolation_level=level)
            return await conn.run_sync(job)

    async def migrate(self) -> None:
        """Bring the schema to the newest migration (safe to run every start)."""
        from core.migrate import upgrade

        await self.write(upgrade)

    # -- inbox -----------------------------------------------------------------------------

    async def add_inbound(self, inbound: Inbound, *, lease_s: float | None = None) -> Intake:
        """Keep a message for its turn; not `added` when its event id was seen before.

        With `lease_s` the caller takes the item at once, in the same transaction, unless its
        thread has an unfinished item before it: the turn starts without a trip through the
        claim loop, and the item is as safe as any claimed one (its lease lapses on a crash).
        """
        now = utcnow()
        values = {
            "event_id": inbound.event_id,
            "thread_key": inbound.thread.key,
            "source": inbound.thread.source,
            "author_id": inbound.author.id,
            "payload": inbound.to_json(),
            "status": "pending",
            "attempts": 0,
            "created": now,
            "updated": now,
        }
        try:
            claim = await self.write(
                lambda conn: _enqueue(conn, "inbox", values, lease_s), quick=True
            )
        except IntegrityError:
            return Intake(added=False)
        return Intake(added=True, claim=claim)

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
        params = {"b_sources": list(sources), "b_limit": limit}
        return await self.write(lambda conn: _take(conn, name, params, lease_s), quick=True)

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
        await self.write(lambda conn: conn.execute(statement), quick=True)

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
        await self.write(lambda conn: conn.execute(statement), quick=True)

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

    async def keep_inbound(
        self,
        event_id: str,
        conversation: Conversation,
        notice: NewMessage,
        *,
        claim: Claim | None = None,
        delay_s: float = 0.0,
        reason: str = "",
    ) -> bool:
        """Keep an unanswered message for later (its agent is down); True if `notice` went now.

        The first time, the item is marked `kept` and `notice` is stored and queued, so a person
        is told once however often the item comes round. With `claim`, the item is also handed
        back for `delay_s` under a lease no worker holds: it stays unfinished, so neither it nor
        its thread's later messages are taken before then, and the try is not counted; those
        later messages are kept (and told) with it.
        """
        thread = ThreadRef.parse(conversation.thread_key)
        columns = (inbox.c.id, inbox.c.event_id, inbox.c.payload, inbox.c.status)

        def job(conn: Connection) -> bool:
            _lock_thread(conn, conversation.thread_key)  # first: it may queue a notice
            now = utcnow()
            row = conn.execute(
                sa.select(*columns, inbox.c.claim_token, inbox.c.thread_key)
                .where(inbox.c.event_id == event_id)
                .with_for_update()
            ).first()
            if claim is not None and (
                row is None or (row.id, row.claim_token) != (claim.id, claim.token)
            ):
                raise ClaimLost(f"inbox item {claim.id} was taken by another worker")
            if row is None or row.status not in UNFINISHED:
                return False
            if claim is not None:
                conn.execute(
                    inbox.update()
                    .where(inbox.c.id == row.id)
                    .values(
                        status="working",
                        claim_token=None,
                        lease_until=now + timedelta(seconds=delay_s),
                        attempts=inbox.c.attempts - 1,
                        error=reason[:2000] or None,
                        updated=now,
                    )
                )
            items: list[Any] = [row]
            if claim is not None:
                items += conn.execute(
                    sa.select(*columns)
                    .where(
                        inbox.c.thread_key == row.thread_key,
                        inbox.c.id > row.id,
                        inbox.c.status == "pending",
                    )
                    .order_by(inbox.c.id)
                    .with_for_update()
                ).all()
            told = False
            for item in items:
                if "kept" in item.payload:
                    continue
                told = told or item.id == row.id
                conn.execute(
                    inbox.update()
                    .where(inbox.c.id == item.id)
                    .values(
                        payload={**item.payload, "kept": now.isoformat()},
                        conversation_id=conversation.id,
                        updated=now,
                    )
                )
                message = {
                    "conversation_id": conversation.id,
                    "role": notice.role,
                    "kind": notice.kind,
                    "content": notice.content,
                    "created": now,
                }
                result = conn.execute(sql.insert_message, message)
                reply = {"text": notice.content, "kind": notice.kind, "reply_to": item.event_id}
                _queue_reply(conn, thread, reply, conversation.id, _new_id(result))
            return told

        return await self._write_for(conversation, job)

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
        await self.write(lambda conn: conn.execute(statement), quick=True)

    async def finish_outbox(
        self,
        claim: Claim,
        *,
        sent: bool,
        platform_ids: list[str] | None = None,
        error: str | None = None,
        lease_s: float | None = None,
    ) -> Claim | None:
        """Close a posted (or given up) reply. With `lease_s`, the thread's next reply is
        taken in the same transaction and returned, so it goes out without waiting for the
        outbox loop."""
        params = {
            "b_id": claim.id,
            "b_token": claim.token,
            "b_status": "sent" if sent else "failed",
            "b_platform_ids": platform_ids,
            "b_error": error[:2000] if error else None,
            "b_now": utcnow(),
        }
        # A draft the reply went into is forgotten in the same transaction as the post is
        # marked sent: a crash before it repeats the same edit, never a second message.
        used = {"b_thread_key": claim.thread_key, "b_ids": list(platform_ids or ())}

        def job(conn: Connection) -> Claim | None:
            # Under the thread's lock, as a turn queuing the next reply is: else each could
            # miss the other's uncommitted row, and that reply would wait for the poll.
            _lock_thread(conn, claim.thread_key)
            conn.execute(sql.finish_post, params)
            if sent and platform_ids:
                conn.execute(sql.drop_used_drafts, used)
            return _take_next(conn, "outbox", claim.thread_key, lease_s)

        return await self.write(job, quick=True)

    async def queue_reply(
        self, thread: ThreadRef, payload: dict[str, Any], conversation_id: str | None = None
    ) -> None:
        """Put a reply in the outbox."""
        await self.write(
            lambda conn: _queue_reply(conn, thread, payload, conversation_id, None), quick=True
        )

    # -- conversations ---------------------------------------------------------------------

    async def conversation_for_thread(self, thread_key: str) -> Conversation | None:
        """The conversation the thread continues now, if any."""
        params = {"thread_key": thread_key}
        row = await self.read(
            lambda conn: conn.execute(sql.conversation_by_thread, params).first(), quick=True
        )
        return row_to_conversation(row) if row else None

    async def open_conversation(
        self,
        thread: ThreadRef,
        agent: str,
        data: dict[str, Any],
        user_id: str | None,
        *,
        with_turn: bool = False,
    ) -> Conversation:
        """Create a conversation and link the thread to it (or return the one linked already).

        `with_turn` writes nothing now: the first write that refers to the conversation (the
        turn's finish, `keep_inbound`, `save_remote`) writes it first, in its own transaction.
        A new thread's turn then commits once less, and a turn that ends without a write
        leaves no empty conversation behind.
        """
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
        params = {"thread_key": thread.key}
        previous = await self.read(
            lambda conn: conn.execute(sql.latest_of_thread, params).first(), quick=True
        )
        if previous is not None and (previous.data or {}).get("moved_to_agent") is not None:
            # The thread was moved to another agent: its new conversation names the old one.
            row["data"] = created.data = {**data, "previous_conversation_id": previous.id}
        created.unsaved = (row, link)
        if not with_turn:
            await self._write_for(created, _nothing)
        return created

    async def _write_for(self, conversation: Conversation, job: Callable[[Connection], T]) -> T:
        """Run the quick write `job`, which refers to `conversation`; first, in the same
        transaction, write the conversation if it was opened `with_turn` and is not written yet.

        Should its thread be linked to another conversation already (the link's key is
        taken), `conversation` becomes that one and `job` runs again: so `open_conversation`
        returns the conversation a thread has, and a turn is stored in it.
        """
        unsaved = conversation.unsaved
        if unsaved is None:
            return await self.write(job, quick=True)
        row, link = unsaved

        def with_conversation(conn: Connection) -> T:
            conn.execute(sql.insert_conversation, row)
            conn.execute(sql.insert_link, link)
            return job(conn)

        try:
            result = await self.write(with_conversation, quick=True)
        except IntegrityError:
            existing = await self.conversation_for_thread(conversation.thread_key)
            if existing is None or existing.id == conversation.id:
                raise
            for name in _STORED:
                setattr(conversation, name, getattr(existing, name))
            conversation.unsaved = None
            return await self.write(job, quick=True)
        conversation.unsaved = None
        return result

    async def save_remote(self, conversation: Conversation) -> None:
        """Write the conversation's remote session id now (and the conversation, if it is not
        written yet): an agent call that follows may fail or be cut short by a crash, and the
        session it opened must not be lost."""
        remote_id, state = conversation.remote_id, conversation.state
        values: dict[str, Any] = {"updated": utcnow(), "remote_id": remote_id}
        if state is not None:
            values["state"] = state

        def job(conn: Connection) -> None:
            statement = conversations.update().where(conversations.c.id == conversation.id)
            conn.execute(statement.values(**values))

        await self._write_for(conversation, job)
        conversation.remote_id, conversation.state = remote_id, state

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
        row = await self.read(
            lambda conn: conn.execute(sql.conversation_by_id, params).first(), quick=True
        )
        return row_to_conversation(row) if row else None

    async def finish_turn(
        self,
        claim: Claim,
        conversation: Conversation,
        new: Sequence[NewMessage],
        *,
        failed: str | None = None,
        refused: str | None = None,
        remote_id: str | None = None,
        state: dict[str, Any] | None = None,
        lease_s: float | None = None,
    ) -> Handoff:
        """Store a turn's messages, queue its replies and close its inbox item, atomically;
        `refused` (the reason) closes it as refused: not sent to the agent (core/access.py).

        With `lease_s` the first reply is taken at once for posting (see `add_inbound`), and
        so is the thread's next message waiting for its turn; their claims are returned.
        """
        thread = ThreadRef.parse(conversation.thread_key)
        status = "failed" if failed else "open"
        if conversation.unsaved is not None:  # written first by `_write_for`, as it ends
            row = conversation.unsaved[0]
            row.update(status=status, updated=utcnow())
            row["remote_id"] = remote_id or row.get("remote_id")
            row["state"] = row.get("state") if state is None else state

        def job(conn: Connection) -> Handoff:
            _lock_thread(conn, conversation.thread_key)  # first: it queues the replies
            now = utcnow()
            taken: list[Claim] = []
            done = conn.execute(
                sql.finish_inbox,
                {
                    "b_id": claim.id,
                    "b_token": claim.token,
                    "b_status": "failed" if failed else "refused" if refused else "done",
                    "b_conversation_id": conversation.id,
                    "b_error": (failed or refused or "")[:2000] or None,
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
                    claim_now = None if taken else lease_s
                    queued = _queue_reply(
                        conn, thread, payload, conversation.id, _new_id(result), claim_now
                    )
                    taken += [queued] if queued else []
            if conversation.unsaved is None:  # (else written just now with these values: above)
                conn.execute(
                    sql.finish_conversation,
                    {
                        "b_id": conversation.id,
                        "b_status": status,
                        "b_remote_id": remote_id,
                        "b_state": state,
                        "b_now": now,
                    },
                )
            return Handoff(taken, _take_next(conn, "inbox", claim.thread_key, lease_s))

        return await self._write_for(conversation, job)

    async def history(self, conversation_id: str, limit: int | None = None) -> list[Any]:
        """The conversation's stored messages, oldest first (the newest `limit` of them)."""
        if limit is not None:
            params: dict[str, Any] = {"conversation_id": conversation_id, "limit": limit}
            rows = await self.read(
                lambda conn: list(conn.execute(sql.newest_messages, params)), quick=True
            )
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

        await self.write(job, quick=True)

    async def draft_of(self, thread_key: str) -> str | None:
        """The message the thread's next answer goes into, if one was posted (see DraftRow)."""
        params = {"b_thread_key": thread_key}
        return await self.read(lambda conn: conn.execute(sql.draft_of, params).scalar(), quick=True)

    async def keep_draft(self, thread_key: str, message_id: str) -> bool:
        """Note the thread's draft message; False when the thread already has one."""
        row = {"thread_key": thread_key, "message_id": message_id, "created": utcnow()}
        try:
            await self.write(lambda conn: conn.execute(sql.insert_draft, row), quick=True)
        except IntegrityError:
            return False
        return True

    async def fill_draft(self, thread_key: str, message_id: str) -> None:
        """Give a draft noted as "" (being posted) the id the platform gave it."""
        params = {"b_thread_key": thread_key, "b_message_id": message_id}
        await self.write(lambda conn: conn.execute(sql.fill_draft, params), quick=True)

    async def drop_draft(self, thread_key: str, message_id: str) -> None:
        """Forget the thread's draft once the answer is in it (a newer one stays)."""
        params = {"b_thread_key": thread_key, "b_message_id": message_id}
        await self.write(lambda conn: conn.execute(sql.drop_draft, params), quick=True)

    async def thread_of_post(self, key: str) -> str | None:
        """The thread of a message the bot posted, by its platform key."""
        statement = sa.select(posts.c.thread_key).where(posts.c.key == key)
        return await self.read(lambda conn: conn.execute(statement).scalar(), quick=True)

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

        return await self.read(job, quick=True)

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

    @property
    def dialect(self) -> str:
        return "sqlite" if self.is_sqlite else "postgresql"

    async def search(self, f: SearchFilters) -> tuple[list[Conversation], int]:
        """Conversations matching every filter given, a page of them and the total."""
        if not self.is_sqlite and searching.text_only(f):
            page, count = search_pg.page(f), search_pg.count(f)
        else:
            where = searching.conditions(f, self.dialect)
            page = searching.page(f, where)
            count = sa.select(sa.func.count()).select_from(conversations).where(*where)

        def job(conn: Connection) -> tuple[list[Any], int]:
            rows = list(conn.execute(page).all())
            if not rows and f.offset == 0:
                return rows, 0
            if rows and f.text:
                return rows, int(rows[0].total)
            return rows, int(conn.execute(count).scalar_one())

        rows, total = await self.read(job, snapshot=True)
        return [row_to_conversation(r) for r in rows], total

    async def conversation_pages(
        self, f: SearchFilters, page_size: int = 200
    ) -> AsyncIterator[list[Conversation]]:
        """Every conversation matching `f` (its limit and offset aside), a page at a time, in
        its order; pages follow the last row seen, so each costs the same however deep."""
        where = searching.conditions(f, self.dialect)
        last: Conversation | None = None
        while True:
            query = sa.select(conversations).where(*where)
            if last is not None:
                assert last.created is not None
                query = query.where(searching.after(f, last.created, last.id))
            rows = await self.read(_all_of(query.order_by(*searching.ordering(f)).limit(page_size)))
            if not rows:
                return
            page = [row_to_conversation(r) for r in rows]
            yield page
            if len(rows) < page_size:
                return
            last = page[-1]

    async def messages_of(self, conversation_ids: Sequence[str]) -> dict[str, list[Any]]:
        """The stored messages of several conversations, oldest first, by conversation id."""
        found: dict[str, list[Any]] = {cid: [] for cid in conversation_ids}
        if not found:
            return found
        query = (
            sa.select(messages)
            .where(messages.c.conversation_id.in_(list(found)))
            .order_by(messages.c.conversation_id, messages.c.id)
        )
        for row in await self.read(lambda conn: list(conn.execute(query).all())):
            found[row.conversation_id].append(row)
        return found

    async def thread_conversations(self, thread_key: str) -> list[Conversation]:
        """Every conversation a thread has had, oldest first (`/new`, moves)."""
        query = (
            sa.select(conversations)
            .where(conversations.c.thread_key == thread_key)
            .order_by(conversations.c.created, conversations.c.id)
        )
        rows = await self.read(lambda conn: list(conn.execute(query).all()))
        return [row_to_conversation(r) for r in rows]

    async def open_conversations(
        self,
        source: str,
        workspace: str | None = None,
        channel: str | None = None,
        agent: str | None = None,
    ) -> list[Conversation]:
        """The conversations threads continue now (linked) in a scope; None or '' is any."""
        query = (
            sa.select(conversations)
            .join(links, links.c.conversation_id == conversations.c.id)
            .where(*_in_scope(source, workspace, channel))
            .order_by(conversations.c.created)
        )
        if agent is not None:
            query = query.where(conversations.c.agent == agent)
        rows = await self.read(lambda conn: list(conn.execute(query).all()))
        return [row_to_conversation(r) for r in rows]

    async def update_conversation(
        self,
        conversation_id: str,
        *,
        data: Mapping[str, Any] | None = None,
        source: str | None = None,
    ) -> Conversation | None:
        """Merge `data` into the conversation's (a key set to None is removed) and/or set its
        `source` label; None when there is no such conversation."""

        def job(conn: Connection) -> Any:
            row = conn.execute(
                sa.select(conversations)
                .where(conversations.c.id == conversation_id)
                .with_for_update()
            ).first()
            if row is None:
                return None
            values: dict[str, Any] = {"updated": utcnow()}
            if data is not None:
                values["data"] = merge_data(row.data or {}, data)
            if source is not None:
                values["source"] = source
            statement = (
                conversations.update()
                .where(conversations.c.id == conversation_id)
                .values(**values)
                .returning(*conversations.c)
            )
            return conn.execute(statement).first()

        row = await self.write(job)
        return row_to_conversation(row) if row is not None else None

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
        workspace: str | None,
        channel: str | None,
        agent: str,
        *,
        situation: str | None = None,
        set_by: str | None = None,
        move_open: bool = False,
        spare: Iterable[tuple[str | None, str | None]] = (),
    ) -> RouteChange:
        """Route a scope ('' or None: any) to `agent`, replacing its run-time route, and log
        the change. With `move_open`, end the open threads of the scope served by another
        agent, so their next message opens a conversation with `agent`; threads under a more
        specific route (the run-time ones, and `spare`: the config file's (workspace, channel)
        scopes of this source) keep theirs. A moved conversation is closed and kept, with
        `moved_to_agent`, `moved_at` and `moved_by` in its data; the thread's next conversation
        gets `previous_conversation_id`."""
        ws, ch = workspace or "", channel or ""
        spared = [(w or "", c or "") for w, c in spare]

        def job(conn: Connection) -> RouteChange:
            now = utcnow()
            scope = (routes.c.source == source, routes.c.workspace == ws, routes.c.channel == ch)
            old = conn.execute(
                sa.select(routes.c.agent, routes.c.situation).where(*scope).with_for_update()
            ).first()
            values = {"agent": agent, "situation": situation, "set_by": set_by, "updated": now}
            if old is not None:
                conn.execute(routes.update().where(*scope).values(**values))
            else:
                conn.execute(
                    routes.insert().values(
                        source=source, workspace=ws, channel=ch, created=now, **values
                    )
                )
            moved = 0
            if move_open:
                moved = _move_open(conn, (source, ws, ch), agent, spared, set_by, now)
            change = RouteChange(
                at=now,
                who=set_by,
                source=source,
                workspace=ws or None,
                channel=ch or None,
                action="set",
                old_agent=old.agent if old else None,
                new_agent=agent,
                old_situation=old.situation if old else None,
                new_situation=situation,
                moved=moved,
            )
            return _log_change(conn, change)

        return await self.write(job)

    async def unset_route(
        self, source: str, workspace: str | None, channel: str | None, *, set_by: str | None = None
    ) -> RouteChange | None:
        """Remove the run-time route of a scope and log it; None when it had none."""
        ws, ch = workspace or "", channel or ""
        scope = (routes.c.source == source, routes.c.workspace == ws, routes.c.channel == ch)

        def job(conn: Connection) -> RouteChange | None:
            old = conn.execute(
                sa.select(routes.c.agent, routes.c.situation).where(*scope).with_for_update()
            ).first()
            if old is None:
                return None
            conn.execute(routes.delete().where(*scope))
            change = RouteChange(
                at=utcnow(),
                who=set_by,
                source=source,
                workspace=ws or None,
                channel=ch or None,
                action="unset",
                old_agent=old.agent,
                new_agent=None,
                old_situation=old.situation,
                new_situation=None,
            )
            return _log_change(conn, change)

        return await self.write(job)

    async def delete_route(
        self, source: str, workspace: str, channel: str, *, set_by: str | None = None
    ) -> bool:
        """Remove the run-time route of a scope (logged); False when it had none."""
        return await self.unset_route(source, workspace, channel, set_by=set_by) is not None

    async def route_changes(self, limit: int = 100, offset: int = 0) -> list[RouteChange]:
        """The routes' audit log, newest first."""
        query = (
            sa.select(route_changes).order_by(route_changes.c.id.desc()).limit(limit).offset(offset)
        )
        rows = await self.read(lambda conn: list(conn.execute(query).all()))
        return [_change_from_row(r) for r in rows]

    async def count_route_changes(self) -> int:
        query = sa.select(sa.func.count()).select_from(route_changes)
        return int(await self.read(lambda conn: conn.execute(query).scalar_one()))

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


def _all_of(query: Any) -> Callable[[Connection], list[Any]]:
    return lambda conn: list(conn.execute(query).all())


def merge_data(current: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """`current` with `patch` applied key by key: a value of None removes the key."""
    merged = dict(current)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def _in_scope(source: str, workspace: str | None, channel: str | None) -> list[Any]:
    where = [conversations.c.source == source]
    if workspace:
        where.append(conversations.c.workspace == workspace)
    if channel:
        where.append(conversations.c.channel == channel)
    return where


def _rank(workspace: str, channel: str) -> tuple[int, int]:
    """How specific a scope is, as core.routing ranks routes: tier, then a named workspace."""
    return (2 if channel else 1 if workspace else 0, 1 if workspace else 0)


def _move_open(
    conn: Connection,
    scope: tuple[str, str, str],
    agent: str,
    spare: list[tuple[str, str]],
    who: str | None,
    now: datetime,
) -> int:
    """End the scope's open threads served by another agent (see `Store.set_route`)."""
    source, workspace, channel = scope
    kept = sa.select(routes.c.workspace, routes.c.channel).where(routes.c.source == source)
    narrower = [
        (w, c)
        for w, c in [*spare, *((r.workspace, r.channel) for r in conn.execute(kept))]
        if _rank(w, c) > _rank(workspace, channel)
    ]
    found = conn.execute(
        sa.select(
            links.c.thread_key,
            conversations.c.id,
            conversations.c.workspace,
            conversations.c.channel,
            conversations.c.data,
        )
        .join(conversations, links.c.conversation_id == conversations.c.id)
        .where(*_in_scope(source, workspace, channel), conversations.c.agent != agent)
    ).all()
    moving = [
        row
        for row in found
        if not any(w in ("", row.workspace) and c in ("", row.channel) for w, c in narrower)
    ]
    note = {"moved_to_agent": agent, "moved_at": now.isoformat()}
    if who:
        note["moved_by"] = who
    for row in moving:
        conn.execute(
            conversations.update()
            .where(conversations.c.id == row.id)
            .values(status="closed", data={**(row.data or {}), **note}, updated=now)
        )
        conn.execute(links.delete().where(links.c.thread_key == row.thread_key))
    return len(moving)


def _log_change(conn: Connection, change: RouteChange) -> RouteChange:
    values = {
        "at": change.at,
        "who": change.who,
        "source": change.source,
        "workspace": change.workspace or "",
        "channel": change.channel or "",
        "action": change.action,
        "old_agent": change.old_agent,
        "new_agent": change.new_agent,
        "old_situation": change.old_situation,
        "new_situation": change.new_situation,
        "moved": change.moved,
    }
    result = conn.execute(route_changes.insert().values(**values))
    return replace(change, id=_new_id(result))


def _change_from_row(row: Any) -> RouteChange:
    stamp = aware(row.at)
    assert stamp is not None
    return RouteChange(
        at=stamp,
        who=row.who,
        source=row.source,
        workspace=row.workspace or None,
        channel=row.channel or None,
        action=row.action,
        old_agent=row.old_agent,
        new_agent=row.new_agent,
        old_situation=row.old_situation,
        new_situation=row.new_situation,
        moved=row.moved,
        id=row.id,
    )


# What a Conversation takes from its row (`_write_for` adopting one); its thread and source
# are the same by then, and `situation` is the route's, not stored.
_STORED = ("id", "agent", "data", "remote_id", "state", "status", "created", "updated")


def _nothing(conn: Connection) -> None:
    """A write job that writes nothing of its own (see `Store.open_conversation`)."""


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
    lease_s: float | None = None,
) -> Claim | None:
    now = utcnow()
    values = {
        "thread_key": thread.key,
        "source": thread.source,
        "conversation_id": conversation_id,
        "message_id": message_id,
        "payload": payload,
        "status": "pending",
        "attempts": 0,
        "created": now,
        "updated": now,
    }
    return _enqueue(conn, "outbox", values, lease_s)


def _take(conn: Connection, name: str, params: dict[str, Any], lease_s: float) -> list[Claim]:
    """Claim what `params` finds (the oldest unfinished item of each thread) under a new token."""
    find, _ = sql.CLAIM[name]
    ids = conn.execute(find, {**params, "b_now": utcnow()}).scalars().all()
    return _take_ids(conn, name, list(ids), lease_s)


def _take_ids(conn: Connection, name: str, ids: list[int], lease_s: float) -> list[Claim]:
    """Claim the items `ids` that are still claimable, under a new token."""
    if not ids:
        return []
    now, token = utcnow(), uuid.uuid4().hex
    _, take = sql.CLAIM[name]
    params = {
        "b_now": now,
        "b_ids": ids,
        "b_token": token,
        "b_lease_until": now + timedelta(seconds=lease_s),
    }
    claims = [
        Claim(r.id, r.thread_key, r.payload, token, r.attempts, r.conversation_id, aware(r.created))
        for r in conn.execute(take, params).all()
    ]
    claims.sort(key=lambda c: c.id)
    return claims


def _take_next(conn: Connection, name: str, thread_key: str, lease_s: float | None) -> Claim | None:
    """The thread's next item, claimed, when it may go now (None without `lease_s`): its
    oldest unfinished one, unless a live worker holds it or (a reply) it waits for a retry."""
    if lease_s is None:
        return None
    row = conn.execute(sql.NEXT_IN_THREAD[name], {"b_thread_key": thread_key}).first()
    if row is None:
        return None
    now = utcnow()
    lease_until, not_before = aware(row.lease_until), aware(getattr(row, "not_before", None))
    held = row.status == "working" and (lease_until is None or lease_until >= now)
    if held or (not_before is not None and not_before > now):
        return None
    taken = _take_ids(conn, name, [row.id], lease_s)
    return taken[0] if taken else None


def _lock_thread(conn: Connection, thread_key: str) -> None:
    """PostgreSQL: hold the thread's queue lock until commit (see `sql.lock_thread`). A job
    that queues items takes it before any row lock: taken after one, two jobs could each wait
    for the other (a deadlock). Taking it again in the same transaction is free."""
    if conn.dialect.name == "postgresql":
        conn.execute(sql.lock_thread, {"b_thread_key": thread_key})


def _enqueue(
    conn: Connection, name: str, values: dict[str, Any], lease_s: float | None
) -> Claim | None:
    """Insert an inbox or outbox item. With `lease_s` it is taken at once under a new claim,
    as the claim loop would take it, when its thread has no unfinished item before it."""
    key = values["thread_key"]
    _lock_thread(conn, key)
    busy = lease_s is None or conn.execute(sql.THREAD_BUSY[name], {"b_thread_key": key}).first()
    if busy:
        conn.execute(sql.INSERT[name], values)
        return None
    assert lease_s is not None
    token, now = uuid.uuid4().hex, values["created"]
    taken = {
        **values,
        "status": "working",
        "claim_token": token,
        "lease_until": now + timedelta(seconds=lease_s),
        "attempts": 1,
    }
    new_id = conn.execute(sql.INSERT_ID[name], taken).scalar_one()
    return Claim(new_id, key, values["payload"], token, 1, values.get("conversation_id"), now)
