"""Conversation search: the filters, read once from what an admin typed, and the SQL for them.

Text is matched through the database's full-text index (migration 0003): SQLite FTS5, and on
PostgreSQL a GIN index on `to_tsvector('simple', …)`. Every word must occur somewhere in the
conversation (in any of its messages, hidden turns and notices included); a bare word also
matches words it begins ("pens" finds "pension"); text in double quotes is a phrase, matched
as written inside one message. `data` filters compare one key of the conversation's `data`
as text (numbers and booleans by their JSON spelling: `5`, `true`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from typing import Any

import sqlalchemy as sa

from core.sql import conversations, messages

STATUSES = ("open", "closed", "failed")
MAX_LIMIT = 200
MAX_OFFSET = 10_000_000
MAX_TEXT = 500
MAX_TERMS = 16
MAX_DATA_FILTERS = 10
DATA_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
_TERM = re.compile(r'"([^"]*)"?|(\S+)')
_BARE = re.compile(r"[^\W_]+")  # letters and digits only: a prefix term
_WORD = re.compile(r"[^\W_]")


@dataclass(slots=True)
class SearchFilters:
    """What `conversations search`, `GET /api/conversations` and the search page filter on."""

    source: str | None = None
    workspace: str | None = None
    channel: str | None = None
    user: str | None = None
    agent: str | None = None
    status: str | None = None
    text: str | None = None
    data: dict[str, str] = field(default_factory=dict)  # key -> value: every one must match
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 20
    offset: int = 0
    reversed: bool = True  # newest first


def storable(text: str) -> bool:
    """Whether every database can keep `text`: UTF-8 (no lone surrogate from a JSON escape)
    without NUL, which PostgreSQL refuses."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def made_storable(value: Any) -> Any:
    """`value` with what no database can keep (NUL, a lone surrogate) in its strings, however
    deeply nested, replaced by U+FFFD: a name or field a platform sends that way is still kept,
    instead of a write that fails every time the platform sends the event again."""
    if isinstance(value, str):
        return value if storable(value) else "".join(_storable_char(c) for c in value)
    if isinstance(value, dict):
        return {made_storable(k): made_storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [made_storable(v) for v in value]
    return value


def _storable_char(char: str) -> str:
    return "\ufffd" if char == "\x00" or "\ud800" <= char <= "\udfff" else char


class FilterError(ValueError):
    """A search parameter that cannot be used; `param` names it, the message says why."""

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"{param}: {reason}")
        self.param = param
        self.reason = reason


def search_filters(
    *,
    source: str | None = None,
    workspace: str | None = None,
    channel: str | None = None,
    user: str | None = None,
    agent: str | None = None,
    status: str | None = None,
    text: str | None = None,
    data: Sequence[str] = (),
    since: datetime | date | str | None = None,
    until: datetime | date | str | None = None,
    limit: int = 20,
    offset: int = 0,
    reversed: bool = True,
) -> SearchFilters:
    """The filters from parameters as an admin gave them (CLI options, query parameters, a
    form); empty strings mean "not given". Raise FilterError on the first bad one.

    `data` items are `KEY=VALUE` (split at the first `=`); `since`/`until` are ISO dates or
    times (a time without an offset is UTC).
    """
    named = {"source": source, "workspace": workspace, "channel": channel, "user": user}
    named.update(agent=agent, text=text, data="".join(data))
    for param, value in named.items():
        if value and not storable(value):
            raise FilterError(param, "contains a NUL character or invalid Unicode")
        if value and len(value) > MAX_TEXT and param != "data":
            raise FilterError(param, f"at most {MAX_TEXT} characters")
    if status and status not in STATUSES:
        raise FilterError("status", "use open, closed or failed")
    if not 1 <= limit <= MAX_LIMIT:
        raise FilterError("limit", f"must be between 1 and {MAX_LIMIT}")
    if not 0 <= offset <= MAX_OFFSET:
        raise FilterError("offset", f"must be between 0 and {MAX_OFFSET}")
    if text:
        if len(text) > MAX_TEXT:
            raise FilterError("text", f"at most {MAX_TEXT} characters")
        terms = text_terms(text)
        if not terms:
            raise FilterError("text", "no words to search for (letters or digits)")
        if len(terms) > MAX_TERMS:
            raise FilterError("text", f"at most {MAX_TERMS} words or phrases")
    first, last = _moment("since", since), _moment("until", until)
    if first is not None and last is not None and first > last:
        raise FilterError("until", "is before since")
    return SearchFilters(
        source=source or None,
        workspace=workspace or None,
        channel=channel or None,
        user=user or None,
        agent=agent or None,
        status=status or None,
        text=text or None,
        data=data_filters(data),
        since=first,
        until=last,
        limit=limit,
        offset=offset,
        reversed=reversed,
    )


def data_filters(items: Sequence[str]) -> dict[str, str]:
    """`KEY=VALUE` items as a dict; FilterError names a malformed or repeated one."""
    if len(items) > MAX_DATA_FILTERS:
        raise FilterError("data", f"at most {MAX_DATA_FILTERS} filters")
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise FilterError("data", f"{item!r} is not KEY=VALUE")
        if not DATA_KEY.fullmatch(key):
            raise FilterError(
                "data", f"key {key!r}: use 1-100 letters, digits or . _ : - before the '='"
            )
        if len(value) > MAX_TEXT:
            raise FilterError("data", f"the value of {key!r} is over {MAX_TEXT} characters")
        if key in pairs:
            raise FilterError("data", f"key {key!r} is given twice")
        pairs[key] = value
    return pairs


def _moment(param: str, value: datetime | date | str | None) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except (ValueError, TypeError):
            raise FilterError(param, f"{value!r} is not an ISO date or time") from None
    if not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Term:
    """One thing to find: a word (and the words it begins) or a phrase."""

    text: str
    phrase: bool


def text_terms(text: str) -> list[Term]:
    """Words and "quoted phrases" of a search; pieces with no letter or digit are dropped."""
    terms = []
    for match in _TERM.finditer(text):
        quoted, bare = match.group(1), match.group(2)
        piece = quoted if quoted is not None else bare
        if not piece or not _WORD.search(piece):
            continue
        prefix = quoted is None and _BARE.fullmatch(piece) is not None
        terms.append(Term(piece.strip(), phrase=not prefix))
    return terms


SIMPLE: Any = sa.literal_column("'simple'::regconfig")
# The expression ix_messages_fts indexes (migration 0003): the query must say the same, with
# the length written out. As a bound parameter it matched only while PostgreSQL planned each
# execution with its values; from the sixth on one connection the cached generic plan could
# not use the index and read every message.
PG_DOCUMENT = sa.func.to_tsvector(
    SIMPLE, sa.func.left(messages.c.content, sa.literal_column("100000"))
)
FTS = sa.table("messages_fts", sa.column("rowid"))


def _text_condition(term: Term, dialect: str) -> Any:
    """Conversations with a message that has `term`, found through the full-text index."""
    if dialect == "sqlite":
        quoted = '"' + term.text.replace('"', '""') + '"'
        query = quoted if term.phrase else quoted + "*"
        hits = sa.select(FTS.c.rowid).where(sa.literal_column("messages_fts").op("MATCH")(query))
        having = messages.c.id.in_(hits)
    else:
        having = pg_match(term)
    return conversations.c.id.in_(sa.select(messages.c.conversation_id).where(having))


def pg_match(term: Term) -> Any:
    """Whether a message has `term` (PostgreSQL, through the full-text index)."""
    if term.phrase:
        tsquery = sa.func.phraseto_tsquery(SIMPLE, term.text)
    else:
        tsquery = sa.func.to_tsquery(SIMPLE, term.text + ":*")
    return PG_DOCUMENT.op("@@")(tsquery)


def _data_value(key: str, dialect: str) -> Any:
    """`data[key]` as text on either database (strings bare, other values as JSON spells them)."""
    column = conversations.c.data
    if dialect == "sqlite":
        path = '$."' + key + '"'
        kind = sa.func.json_type(column, path)
        value = sa.func.json_extract(column, path)
        return sa.case(
            (kind == "text", value),
            (kind == "true", "true"),
            (kind == "false", "false"),
            (kind == "null", None),
            else_=sa.cast(value, sa.Text),
        )
    return column.op("->>", return_type=sa.Text)(sa.literal(key, sa.Text))


def conditions(f: SearchFilters, dialect: str) -> list[Any]:
    """The WHERE clauses of `f` (dialect: "sqlite" or "postgresql")."""
    found: list[Any] = []
    for column, value in (
        (conversations.c.source, f.source),
        (conversations.c.workspace, f.workspace),
        (conversations.c.channel, f.channel),
        (conversations.c.user_id, f.user),
        (conversations.c.agent, f.agent),
        (conversations.c.status, f.status),
    ):
        if value is not None:
            found.append(column == value)
    if f.since is not None:
        found.append(conversations.c.created >= _utc(f.since))
    if f.until is not None:
        found.append(conversations.c.created < _utc(f.until))
    for key, value in f.data.items():
        found.append(_data_value(key, dialect) == value)
    if f.text:
        found.extend(_text_condition(term, dialect) for term in text_terms(f.text))
    return found


def text_only(f: SearchFilters) -> bool:
    """Whether `f` has words to search for and no other filter (in either dialect)."""
    others = conditions(replace(f, text=None), "sqlite")
    return bool(f.text and text_terms(f.text)) and not others


def _utc(value: datetime) -> datetime:
    """SQLite compares stored times as text: a bound with another offset must be converted;
    the calendar's ends are clamped."""
    stamp = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    try:
        return stamp.astimezone(UTC)
    except OverflowError:  # within hours of year 1 or 9999
        return (datetime.min if stamp.year == 1 else datetime.max).replace(tzinfo=UTC)


def ordering(f: SearchFilters, rows: Any = conversations) -> tuple[Any, Any]:
    """Newest first unless `reversed` is off; the id breaks ties. `rows`: the conversations
    or a selection of their `created` and `id`."""
    if f.reversed:
        return rows.c.created.desc(), rows.c.id.desc()
    return rows.c.created.asc(), rows.c.id.asc()


def page(f: SearchFilters, where: list[Any]) -> Any:
    """The page of conversations matching `where` in `f`'s order; with text, every row also
    carries the number of matches as `total`.

    Text is matched through each message that has it, thousands for a common word: the
    matches are found once for the page and the total together (a CTE used twice is
    computed once, on SQLite and PostgreSQL alike) rather than once for each. Without text a
    page reads a few index entries and the total counts an index range: two statements.
    A search by text alone on PostgreSQL has its own statement (core.search_pg).
    """
    if not f.text:
        query = sa.select(conversations).where(*where).order_by(*ordering(f))
        return query.limit(f.limit).offset(f.offset)
    found = sa.select(conversations.c.id, conversations.c.created).where(*where).cte("found")
    total = sa.select(sa.func.count()).select_from(found).scalar_subquery()
    chosen = sa.select(found.c.id).order_by(*ordering(f, found)).limit(f.limit).offset(f.offset)
    return (
        sa.select(conversations, total.label("total"))
        .where(conversations.c.id.in_(chosen))
        .order_by(*ordering(f))
    )


def after(f: SearchFilters, created: datetime, conversation_id: str) -> Any:
    """The rows that come after (`created`, `conversation_id`) in `f`'s order (keyset paging)."""
    stamp = _utc(created)
    if f.reversed:
        return sa.or_(
            conversations.c.created < stamp,
            sa.and_(conversations.c.created == stamp, conversations.c.id < conversation_id),
        )
    return sa.or_(
        conversations.c.created > stamp,
        sa.and_(conversations.c.created == stamp, conversations.c.id > conversation_id),
    )
