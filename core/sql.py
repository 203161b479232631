"""The statements on the hot path, built once with bind parameters.

Building a SQLAlchemy statement and its cache key costs more than SQLite takes to run it;
these are built at import and executed with parameters, so a turn pays only for execution.
Parameters are named `b_*` where a column of the same name is also being set.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import bindparam

from core.tables import (
    ConversationRow,
    DraftRow,
    InboxRow,
    MessageRow,
    OutboxRow,
    PostRow,
    RouteChangeRow,
    RouteRow,
    ThreadLinkRow,
)

conversations: sa.Table = ConversationRow.__table__  # type: ignore[attr-defined]
links: sa.Table = ThreadLinkRow.__table__  # type: ignore[attr-defined]
messages: sa.Table = MessageRow.__table__  # type: ignore[attr-defined]
routes: sa.Table = RouteRow.__table__  # type: ignore[attr-defined]
route_changes: sa.Table = RouteChangeRow.__table__  # type: ignore[attr-defined]
inbox: sa.Table = InboxRow.__table__  # type: ignore[attr-defined]
outbox: sa.Table = OutboxRow.__table__  # type: ignore[attr-defined]
posts: sa.Table = PostRow.__table__  # type: ignore[attr-defined]
drafts: sa.Table = DraftRow.__table__  # type: ignore[attr-defined]

UNFINISHED = ("pending", "working")

INSERT = {"inbox": inbox.insert(), "outbox": outbox.insert()}
INSERT_ID = {name: insert.returning(insert.table.c.id) for name, insert in INSERT.items()}
insert_message = messages.insert()
insert_conversation = conversations.insert()
insert_link = links.insert()

conversation_by_thread = (
    sa.select(conversations)
    .join(links, links.c.conversation_id == conversations.c.id)
    .where(links.c.thread_key == bindparam("thread_key"))
)
latest_of_thread = (
    sa.select(conversations.c.id, conversations.c.data)
    .where(conversations.c.thread_key == bindparam("thread_key"))
    .order_by(conversations.c.created.desc(), conversations.c.id.desc())
    .limit(1)
)
conversation_by_id = sa.select(conversations).where(conversations.c.id == bindparam("id"))
newest_messages = (
    sa.select(messages)
    .where(messages.c.conversation_id == bindparam("conversation_id"))
    .order_by(messages.c.id.desc())
    .limit(bindparam("limit"))
)
all_messages = (
    sa.select(messages)
    .where(messages.c.conversation_id == bindparam("conversation_id"))
    .order_by(messages.c.id)
)

finish_inbox = (
    inbox.update()
    .where(
        inbox.c.id == bindparam("b_id"),
        inbox.c.claim_token == bindparam("b_token"),
        inbox.c.status == "working",
    )
    .values(
        status=bindparam("b_status"),
        conversation_id=bindparam("b_conversation_id"),
        error=bindparam("b_error"),
        lease_until=None,
        updated=bindparam("b_now"),
    )
)
finish_conversation = (
    conversations.update()
    .where(conversations.c.id == bindparam("b_id"))
    .values(
        # A turn that finishes after its thread was ended (`/new`, a move) leaves it closed.
        status=sa.case((conversations.c.status == "closed", "closed"), else_=bindparam("b_status")),
        remote_id=sa.func.coalesce(bindparam("b_remote_id"), conversations.c.remote_id),
        state=sa.func.coalesce(
            bindparam("b_state", type_=conversations.c.state.type), conversations.c.state
        ),
        updated=bindparam("b_now"),
    )
)
finish_post = (
    outbox.update()
    .where(outbox.c.id == bindparam("b_id"), outbox.c.claim_token == bindparam("b_token"))
    .values(
        status=bindparam("b_status"),
        platform_ids=bindparam("b_platform_ids"),
        error=bindparam("b_error"),
        lease_until=None,
        updated=bindparam("b_now"),
    )
)

draft_of = sa.select(drafts.c.message_id).where(drafts.c.thread_key == bindparam("b_thread_key"))
insert_draft = drafts.insert()
fill_draft = (  # a draft noted as "" (being posted) gets the id the platform gave it
    drafts.update()
    .where(drafts.c.thread_key == bindparam("b_thread_key"), drafts.c.message_id == "")
    .values(message_id=bindparam("b_message_id"))
)
drop_draft = drafts.delete().where(
    drafts.c.thread_key == bindparam("b_thread_key"),
    drafts.c.message_id == bindparam("b_message_id"),
)
# A draft the reply went into is forgotten as the post is marked sent (core/store.py).
drop_used_drafts = drafts.delete().where(
    drafts.c.thread_key == bindparam("b_thread_key"),
    drafts.c.message_id.in_(bindparam("b_ids", expanding=True)),
)


def _claim_statements(table: sa.Table) -> tuple[Any, Any]:
    """Find, then take, the claimable items: the oldest unfinished one of each thread.

    Only claimable rows are candidates, so the cost does not grow with the turns in flight.
    """
    now: Any = bindparam("b_now")
    earlier = table.alias("earlier")
    claimable = sa.or_(
        table.c.status == "pending",
        sa.and_(table.c.status == "working", table.c.lease_until < now),
    )
    conditions: list[Any] = [
        claimable,
        table.c.source.in_(bindparam("b_sources", expanding=True)),
        ~sa.exists().where(
            earlier.c.thread_key == table.c.thread_key,
            earlier.c.status.in_(UNFINISHED),
            earlier.c.id < table.c.id,
        ),
    ]
    if table is outbox:
        conditions.append(sa.or_(table.c.not_before.is_(None), table.c.not_before <= now))
    find = sa.select(table.c.id).where(*conditions).order_by(table.c.id).limit(bindparam("b_limit"))
    take = (
        table.update()
        .where(table.c.id.in_(bindparam("b_ids", expanding=True)), claimable)
        .values(
            status="working",
            claim_token=bindparam("b_token"),
            lease_until=bindparam("b_lease_until"),
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
    return find, take


CLAIM = {"inbox": _claim_statements(inbox), "outbox": _claim_statements(outbox)}


def _next_in_thread(table: sa.Table) -> Any:
    """A thread's oldest unfinished item: the next one its worker hands itself (core/store.py)."""
    columns = [table.c.id, table.c.status, table.c.lease_until]
    if table is outbox:
        columns.append(table.c.not_before)
    return (
        sa.select(*columns)
        .where(table.c.thread_key == bindparam("b_thread_key"), table.c.status.in_(UNFINISHED))
        .order_by(table.c.id)
        .limit(1)
    )


NEXT_IN_THREAD = {"inbox": _next_in_thread(inbox), "outbox": _next_in_thread(outbox)}


def _thread_busy(table: sa.Table) -> Any:
    """Whether a thread has an unfinished item: a new one then waits its turn in the queue."""
    return (
        sa.select(table.c.id)
        .where(table.c.thread_key == bindparam("b_thread_key"), table.c.status.in_(UNFINISHED))
        .limit(1)
    )


THREAD_BUSY = {"inbox": _thread_busy(inbox), "outbox": _thread_busy(outbox)}
# PostgreSQL: writers of one thread's items take turns until commit, so "is the thread busy?"
# and the insert that follows are one step (SQLite's single writer gives that already).
lock_thread = sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtext(bindparam("b_thread_key"))))

# Built once and run every turn: on SQLite these go straight to the driver (core.sqlite.Plan).
HOT = frozenset(
    id(statement)
    for statement in (
        *INSERT.values(),
        *INSERT_ID.values(),
        insert_message,
        insert_conversation,
        insert_link,
        conversation_by_thread,
        latest_of_thread,
        conversation_by_id,
        newest_messages,
        all_messages,
        finish_inbox,
        finish_conversation,
        finish_post,
        draft_of,
        insert_draft,
        fill_draft,
        drop_draft,
        drop_used_drafts,
        *NEXT_IN_THREAD.values(),
        *THREAD_BUSY.values(),
        *(statement for pair in CLAIM.values() for statement in pair),
    )
)
