"""A search by text alone on PostgreSQL: its page and its total in one statement.

Every other search (and every search on SQLite, whose FTS5 answers fast enough through
`core.search.page`) reads the conversations that match. A search by text alone need not:
the conversation ids of the matching messages are the matches, and their count is the
total. Only the order (the conversations' creation time) needs the conversations, and the
page is taken from them one of two ways, both exact:

- Dense matches — the count says `WINDOW` conversations should hold the page twice over,
  by the planner's count of conversations (`pg_class.reltuples`): the newest conversations
  are read in order through ix_conversations_created, each checked against a hash of the
  matches, until the page is full. About `(offset + limit) * conversations / matches`
  index entries: a few hundred for a common word, where looking up every match would cost
  one index lookup each, tens of thousands.
- Otherwise, or when those `WINDOW` conversations hold too few (matches bunched in time):
  each match's creation time is looked up by key and the page sorted from them.

Per term the matching messages come from one bitmap scan of the full-text index; several
terms are intersected by conversation (never checked message by message, which would
compute `to_tsvector` again for every message of every candidate conversation).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from core.search import SearchFilters, ordering, pg_match, text_terms
from core.sql import conversations, messages

# How many of the newest (or oldest) conversations a dense search reads for its page before
# it looks up every match instead: at about 2 µs a row on the bench's 2 cores, 40 ms spent
# in vain when the matches are all old; and enough for a 20-row page twice over when 2,000
# of a million conversations match.
WINDOW = 20_000
CONVERSATIONS: Any = sa.literal_column("'conversations'::regclass")


def matches(text: str) -> Any:
    """The ids of the conversations with every term of `text`, from the messages alone."""
    found = [
        sa.select(messages.c.conversation_id.label("id")).where(pg_match(term))
        for term in text_terms(text)
    ]
    return sa.intersect(*found) if len(found) > 1 else found[0].distinct()


def count(f: SearchFilters) -> Any:
    """The number of matches (for a page past the last one, which cannot carry it)."""
    return sa.select(sa.func.count()).select_from(matches(f.text or "").subquery())


def page(f: SearchFilters, window: int = WINDOW) -> Any:
    """The page of conversations matching `f` (text alone) in its order; every row also
    carries the number of matches as `total`.

    The numbers are written into the statement, not bound: a plan made for any LIMIT
    could sort every conversation to find the newest.
    """
    wanted = _number(f.offset + f.limit)
    found = matches(f.text or "").cte("found")
    counted = sa.select(sa.func.count().label("total")).select_from(found).cte("counted")
    total = sa.select(counted.c.total).scalar_subquery()
    estimate: Any = sa.select(sa.column("reltuples")).select_from(sa.table("pg_class"))
    known = estimate.where(sa.column("oid") == CONVERSATIONS).scalar_subquery()
    dense = sa.and_(
        total >= wanted, total * _number(window) >= _number(2 * (f.offset + f.limit)) * known
    )
    # `hit` is in the select list, not the WHERE clause: PostgreSQL keeps it a hashed
    # subplan probed row by row, where a join would not keep the order or stop early.
    newest = (
        sa.select(
            conversations.c.id,
            conversations.c.created,
            conversations.c.id.in_(sa.select(found.c.id)).label("hit"),
        )
        .order_by(*ordering(f))
        .limit(_number(window))
        .subquery("newest")
    )
    recent = (
        sa.select(newest.c.id, newest.c.created)
        .where(dense, newest.c.hit)
        .order_by(*ordering(f, newest))
        .limit(wanted)
        .cte("recent")
    )
    enough = sa.select(sa.func.count()).select_from(recent).scalar_subquery() >= wanted
    match = conversations.alias("match")
    created = sa.select(match.c.created).where(match.c.id == found.c.id).scalar_subquery()
    chosen = sa.union_all(
        sa.select(recent.c.id, recent.c.created).where(enough),
        sa.select(found.c.id, created.label("created")).where(sa.not_(enough)),
    ).subquery("chosen")
    picked = (
        sa.select(chosen.c.id)
        .order_by(*ordering(f, chosen))
        .limit(_number(f.limit))
        .offset(_number(f.offset))
    )
    return (
        sa.select(conversations, total.label("total"))
        .where(conversations.c.id.in_(picked))
        .order_by(*ordering(f))
    )


def _number(value: int) -> Any:
    return sa.literal(value, sa.Integer, literal_execute=True)
