"""A large store for the store-at-scale benchmark, generated fast and the same every time.

The schema is the app's own (its migrations). The rows are written in bulk — SQLite: one
transaction of `executemany`; PostgreSQL: COPY — with the secondary indexes, the full-text
triggers and the foreign keys dropped during the load and then recreated from their own stored
definitions, and the full-text index rebuilt: the state the app's inserts would have left,
reached in minutes instead of hours.

Shapes: four sources, 50 channels each (a few busy, many quiet), one conversation per thread,
5 messages per conversation (people and the agent taking turns), text made of words with a
Zipf-like frequency (a few very common words, a long tail of rare ones) and, in one
conversation in ten, an order number, as people quote them.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from core.tables import FTS_INDEX

VERSION = "store-v2"  # change when the shapes below change: the cached SQLite file is rebuilt
SEED = 20260601
MESSAGES_PER_CONVERSATION = 5
BATCH = 20_000  # conversations per batch
END = datetime(2026, 6, 1)  # naive UTC: conversations span the year before this
SPAN_S = 365 * 24 * 3600
CHUNK_WORDS = 3
ORDER_BASE = 3_000_000  # order numbers are ORDER_BASE + the conversation's number
TABLES = ("conversations", "thread_links", "messages")

WORKSPACES = {
    "slack": ("T01ACME", "T02GLOBEX"),
    "telegram": ("-",),
    "discord": ("812345678901234567", "812345678901234568"),
    "web": ("-",),
}
SOURCE_SHARE = {"slack": 0.4, "telegram": 0.25, "discord": 0.2, "web": 0.15}
CHANNELS_PER_SOURCE = 50
AGENTS = (("support", 0.6), ("sales", 0.25), ("triage", 0.15))
STATUSES = (("open", 0.85), ("closed", 0.10), ("failed", 0.05))  # closed threads are unlinked
ROLES = ("user", "assistant", "user", "assistant", "assistant")

COMMON = """
the to and a i you is it for of in my on that this can be with have not we your are do
please order help thanks account how what when will payment no yes me just was at but an
if so get from our there need refund delivery card invoice password login error issue
working still again today tomorrow update address email phone number plan subscription
cancel change price shipping tracking package arrived late missing wrong item return
reset code app website page support team agent ticket week month time could would should
sorry check let know see send sent received problem fixed right thank hello hi great
"""
SYLLABLES = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"] + ["an", "er", "in", "or"]
RARE_WORDS = 30_000


def channel_name(source: str, n: int) -> str:
    return {
        "slack": f"C0{n:08d}",
        "telegram": f"-100{1_700_000_000 + n}",
        "discord": f"9{n:017d}",
        "web": f"site-{n:02d}",
    }[source]


CHANNELS = [
    (source, WORKSPACES[source][n % len(WORKSPACES[source])], channel_name(source, n))
    for source in WORKSPACES
    for n in range(CHANNELS_PER_SOURCE)
]


def vocabulary() -> list[str]:
    """Common English words first, then made-up words: ranks for a Zipf-like frequency."""
    rng = random.Random(SEED)
    words = COMMON.split()
    seen, size = set(words), len(words) + RARE_WORDS
    while len(words) < size:
        word = "".join(rng.choices(SYLLABLES, k=rng.randint(2, 4)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def chunk_pool(words: list[str], size: int = 100_000) -> list[str]:
    """Runs of words drawn by frequency; messages are strung together from them."""
    rng = random.Random(SEED + 1)
    weights = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(words))))
    drawn = rng.choices(words, cum_weights=weights, k=size * CHUNK_WORDS)
    return [" ".join(drawn[i : i + CHUNK_WORDS]) for i in range(0, len(drawn), CHUNK_WORDS)]


@dataclass(slots=True)
class Batch:
    """Rows of one batch, backend-neutral (times are naive UTC)."""

    conversations: list[tuple[Any, ...]]
    links: list[tuple[str, str, datetime]]
    messages: list[tuple[Any, ...]]


def batches(count: int) -> Iterator[Batch]:
    """`count` conversations and their messages, in conversation-id order, in batches."""
    rng = random.Random(SEED + 2)
    ids = sorted(str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(count))
    pool = chunk_pool(vocabulary())
    shares = [
        SOURCE_SHARE[s] / sum(1 / (n + 1) ** 0.8 for n in range(CHANNELS_PER_SOURCE))
        for s in WORKSPACES
    ]
    channel_weights = [
        shares[i // CHANNELS_PER_SOURCE] / (i % CHANNELS_PER_SOURCE + 1) ** 0.8
        for i in range(len(CHANNELS))
    ]
    message_id = 0
    for start in range(0, count, BATCH):
        size = min(BATCH, count - start)
        scopes = rng.choices(CHANNELS, weights=channel_weights, k=size)
        agents = rng.choices([a for a, _ in AGENTS], weights=[w for _, w in AGENTS], k=size)
        statuses = rng.choices([s for s, _ in STATUSES], weights=[w for _, w in STATUSES], k=size)
        chunks = iter(rng.choices(pool, k=size * MESSAGES_PER_CONVERSATION * 6))
        batch = Batch([], [], [])
        for i in range(size):
            n = start + i
            cid = ids[n]
            source, workspace, channel = scopes[i]
            created = END - timedelta(seconds=rng.random() * SPAN_S)
            thread_key = f"{source}:{workspace}/{channel}/{1_700_000_000 + n}.{n % 997:06d}"
            user = f"u{rng.randrange(20_000)}"
            updated = created + timedelta(seconds=30 * MESSAGES_PER_CONVERSATION)
            batch.conversations.append(
                (
                    cid,
                    thread_key,
                    source,
                    workspace,
                    channel,
                    user,
                    agents[i],
                    f"rc_{n}",
                    statuses[i],
                    created,
                    updated,
                )
            )
            if statuses[i] != "closed":
                batch.links.append((thread_key, cid, created))
            for turn, role in enumerate(ROLES):
                message_id += 1
                words = [next(chunks) for _ in range(rng.randint(2, 6))]
                if turn == 0 and n % 10 == 0:
                    words.append(f"order {ORDER_BASE + n}")
                person = role == "user"
                batch.messages.append(
                    (
                        message_id,
                        cid,
                        role,
                        " ".join(words),
                        user if person else None,
                        f"Person {user}" if person else None,
                        f"ev-{n}-{turn}" if person else None,
                        created + timedelta(seconds=30 * turn),
                    )
                )
        yield batch


# -- SQLite ------------------------------------------------------------------------------------

SQLITE_INSERTS = {
    "conversations": "INSERT INTO conversations (id, thread_key, source, workspace, channel, "
    "user_id, agent, remote_id, status, created, updated, data) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '{}')",
    "thread_links": "INSERT INTO thread_links (thread_key, conversation_id, created) "
    "VALUES (?, ?, ?)",
    "messages": "INSERT INTO messages (id, conversation_id, role, author_id, author_name, "
    "content, event_id, created, kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'message')",
}


def _stamp(value: datetime) -> str:
    """A time as SQLAlchemy's SQLite dialect stores it."""
    return f"{value:%Y-%m-%d %H:%M:%S.%f}"


def fill_sqlite(path: str, count: int) -> dict[str, float]:
    """Load `count` conversations into a migrated, empty SQLite file; phase times in s."""
    con = sqlite3.connect(path, isolation_level=None)
    for pragma in (
        "journal_mode=OFF",
        "synchronous=OFF",
        "cache_size=-1000000",
        "temp_store=MEMORY",
    ):
        con.execute(f"PRAGMA {pragma}")
    names = ",".join(f"'{t}'" for t in TABLES)
    saved = con.execute(
        f"SELECT type, name, sql FROM sqlite_master WHERE type IN ('index', 'trigger') "
        f"AND tbl_name IN ({names}) AND sql IS NOT NULL"
    ).fetchall()
    for kind, name, _ in saved:
        con.execute(f"DROP {kind.upper()} {name}")
    times: dict[str, float] = {}
    started = time.perf_counter()
    _insert_rows(con, count)
    times["rows (generate + insert)"] = time.perf_counter() - started
    started = time.perf_counter()
    for _, _, statement in saved:
        con.execute(statement)
    times["indexes and triggers"] = time.perf_counter() - started
    started = time.perf_counter()
    con.execute("INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')")
    times["full-text rebuild"] = time.perf_counter() - started
    con.execute("PRAGMA journal_mode=WAL")
    con.close()
    return times


def _insert_rows(con: sqlite3.Connection, count: int) -> None:
    """Every row in one transaction, a batch per `executemany`."""
    con.execute("BEGIN")
    for batch in batches(count):
        con.executemany(
            SQLITE_INSERTS["conversations"],
            ((*c[:9], _stamp(c[9]), _stamp(c[10])) for c in batch.conversations),
        )
        con.executemany(
            SQLITE_INSERTS["thread_links"], ((k, c, _stamp(t)) for k, c, t in batch.links)
        )
        con.executemany(
            SQLITE_INSERTS["messages"],
            ((m[0], m[1], m[2], m[4], m[5], m[3], m[6], _stamp(m[7])) for m in batch.messages),
        )
    con.execute("COMMIT")


# -- PostgreSQL --------------------------------------------------------------------------------

PG_COLUMNS = {
    "conversations": (
        "id",
        "thread_key",
        "source",
        "workspace",
        "channel",
        "user_id",
        "agent",
        "remote_id",
        "status",
        "created",
        "updated",
        "data",
    ),
    "thread_links": ("thread_key", "conversation_id", "created"),
    "messages": (
        "id",
        "conversation_id",
        "role",
        "content",
        "author_id",
        "author_name",
        "event_id",
        "created",
        "kind",
    ),
}


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC)


async def fill_postgres(dsn: str, count: int) -> dict[str, float]:
    """Load `count` conversations into a migrated, empty PostgreSQL database; phase times."""
    import asyncpg

    con = await asyncpg.connect(dsn)
    try:
        indexes, keys = await _drop_secondary(con)
        times: dict[str, float] = {}
        started = time.perf_counter()
        for batch in batches(count):
            for table, records in _pg_records(batch).items():
                await con.copy_records_to_table(table, records=records, columns=PG_COLUMNS[table])
        times["rows (generate + COPY)"] = time.perf_counter() - started
        started = time.perf_counter()
        # The full-text index takes longest: it is built beside the others (two cores).
        slow = [i["indexdef"] for i in indexes if i["indexname"] == FTS_INDEX]
        rest = [i["indexdef"] for i in indexes if i["indexname"] != FTS_INDEX]
        await asyncio.gather(_run_all(dsn, slow), _run_all(dsn, rest))
        for key in keys:
            await con.execute(
                f'ALTER TABLE {key["tbl"]} ADD CONSTRAINT "{key["conname"]}" {key["def"]}'
            )
        await con.execute(
            "SELECT setval(pg_get_serial_sequence('messages', 'id'), "
            "(SELECT max(id) FROM messages))"
        )
        times["indexes (full-text incl.) and keys"] = time.perf_counter() - started
        started = time.perf_counter()
        await con.execute("VACUUM ANALYZE")
        times["vacuum analyze"] = time.perf_counter() - started
    finally:
        await con.close()
    return times


def _pg_records(batch: Batch) -> dict[str, list[tuple[Any, ...]]]:
    return {
        "conversations": [(*c[:9], _aware(c[9]), _aware(c[10]), "{}") for c in batch.conversations],
        "thread_links": [(k, c, _aware(t)) for k, c, t in batch.links],
        "messages": [(*m[:7], _aware(m[7]), "message") for m in batch.messages],
    }


async def _drop_secondary(con: Any) -> tuple[list[Any], list[Any]]:
    """Drop the loaded tables' indexes but their keys, and their foreign keys; return both."""
    indexes = await con.fetch(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = ANY($1::text[]) "
        "AND indexname NOT IN (SELECT conname FROM pg_constraint)",
        list(TABLES),
    )
    keys = await con.fetch(
        "SELECT conrelid::regclass::text AS tbl, conname, pg_get_constraintdef(oid) AS def "
        "FROM pg_constraint WHERE contype = 'f' AND conrelid::regclass::text = ANY($1::text[])",
        list(TABLES),
    )
    for key in keys:
        await con.execute(f'ALTER TABLE {key["tbl"]} DROP CONSTRAINT "{key["conname"]}"')
    for index in indexes:
        await con.execute(f'DROP INDEX "{index["indexname"]}"')
    return list(indexes), list(keys)


async def _run_all(dsn: str, statements: list[str]) -> None:
    """Run `statements` in turn on a connection of their own."""
    import asyncpg

    con = await asyncpg.connect(dsn)
    try:
        await con.execute("SET maintenance_work_mem = '512MB'")
        for statement in statements:
            await con.execute(statement)
    finally:
        await con.close()
