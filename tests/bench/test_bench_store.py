"""Store at scale (issue 9, benchmark 5): 1,000,000 conversations, 5,000,000 messages.

Targets: thread-key lookup p99 ≤ 1 ms; a search page by source + channel, newest first,
p95 ≤ 25 ms; text search p95 ≤ 100 ms — on SQLite and on PostgreSQL, through the app's own
paths: `Store.conversation_for_thread` (every turn), and `search_filters` + `Store.search`
(what `threadbridge conversations search` and `GET /api/conversations` call: a page of 20 and
the total).

The SQLite file is kept under .bench-data/ (named by the generator's version and size), so a
re-run measures without generating; PostgreSQL is generated on each run on the tests' throwaway
server, or once in the database BENCH_STORE_PG_URL names (filled when empty, then reused).
BENCH_STORE_CONVERSATIONS=50000 makes a quick, smaller run. BENCH_EXPLAIN=1 prints the query
plan of the slowest query of each kind.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from core.search import search_filters
from core.store import Store
from tests.bench import store_data
from tests.bench.common import percentile
from tests.pg import PostgresServer

COUNT = int(os.environ.get("BENCH_STORE_CONVERSATIONS", "1000000"))
LOOKUPS = 1000
SEARCHES = 200
WARMUP = 20
DATA = Path(__file__).resolve().parents[2] / ".bench-data"
TARGETS = {"lookup": ("p99", 1.0), "channel page": ("p95", 25.0), "text search": ("p95", 100.0)}

ANY_ROW = sa.text("SELECT 1 FROM conversations LIMIT 1")  # whether a database is filled

FIGURES: list[tuple[str, str, str, bool]] = []


def figures() -> list[tuple[str, str, str, bool]]:
    """(name, value, target, passed) of every target measured so far, for a shared table."""
    return list(FIGURES)


def text_queries(rng: random.Random, count: int) -> list[str]:
    """What an admin types: a word, two words, a word's start, a phrase, an order number.

    Words are drawn from the whole vocabulary but its 50 most common (the, to, and, …),
    which match nearly every conversation and which no one searches for; a phrase is two
    words that follow each other in some message, not both of them among those 50.
    """
    vocabulary = store_data.vocabulary()
    words = vocabulary[50:]
    common = set(vocabulary[:50])
    pairs = [
        pair
        for chunk in store_data.chunk_pool(vocabulary)
        if not common.issuperset(pair := chunk.split()[:2])
    ]
    makers: list[Callable[[], str]] = [
        lambda: rng.choice(words),
        lambda: f"{rng.choice(words)} {rng.choice(words)}",
        lambda: rng.choice(words)[:4],
        lambda: '"' + " ".join(rng.choice(pairs)) + '"',
        lambda: str(store_data.ORDER_BASE + 10 * rng.randrange(COUNT // 10)),
    ]
    return [makers[n % len(makers)]() for n in range(count)]


async def timed(inputs: list[Any], call: Callable[[Any], Awaitable[Any]]) -> list[float]:
    """The time in ms of `call` on each input but the first WARMUP (unmeasured), in turn."""
    for given in inputs[:WARMUP]:
        await call(given)
    spent = []
    for given in inputs[WARMUP:]:
        started = time.perf_counter()
        await call(given)
        spent.append((time.perf_counter() - started) * 1000)
    return spent


async def workload(store: Store) -> dict[str, tuple[list[Any], Callable[[Any], Any]]]:
    """Per figure: its inputs (WARMUP more than measured) and the app call that takes one."""
    rng = random.Random(7)
    picked = sa.text("SELECT thread_key FROM thread_links ORDER BY random() LIMIT :n")
    keys = await store.read(
        lambda conn: list(conn.execute(picked, {"n": LOOKUPS + WARMUP}).scalars())
    )
    keys[::10] = [key + "-missing" for key in keys[::10]]  # one lookup in ten finds nothing
    scopes = [rng.choice(store_data.CHANNELS) for _ in range(SEARCHES + WARMUP)]
    return {
        "lookup": (keys, store.conversation_for_thread),
        "channel page": (
            scopes,
            lambda scope: store.search(search_filters(source=scope[0], channel=scope[2])),
        ),
        "text search": (
            text_queries(rng, SEARCHES + WARMUP),
            lambda text: store.search(search_filters(text=text)),
        ),
    }


async def measure(store: Store, label: str) -> None:
    """Time the three query paths on a filled store; print them and record the figures."""
    load = os.getloadavg()[0]
    work = await workload(store)
    spent = {name: await timed(inputs, call) for name, (inputs, call) in work.items()}
    rows: list[tuple[str, Any]] = [
        (
            "load average (1 min) before, after",
            f"{load:.1f}, {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        )
    ]
    for name, values in spent.items():
        which, target = TARGETS[name]
        value = percentile(values, float(which[1:]))
        shown = (percentile(values, 50), percentile(values, 95), percentile(values, 99))
        rows.append(
            (
                f"{name} p50 / p95 / p99 / max (ms)",
                " / ".join(f"{v:.2f}" for v in (*shown, max(values))),
            )
        )
        FIGURES.append(
            (
                f"store {label}: {name} {which}",
                f"{value:.2f} ms",
                f"≤ {target:g} ms",
                value <= target,
            )
        )
    texts = work["text search"][0][WARMUP:]
    worst = sorted(zip(spent["text search"], texts, strict=True), reverse=True)[:5]
    rows.append(("slowest text searches (ms)", ", ".join(f"{t!r} {ms:.0f}" for ms, t in worst)))
    show(f"store at scale, {label}: {LOOKUPS} lookups, {SEARCHES} pages, {SEARCHES} searches", rows)
    print_table([f for f in FIGURES if f[0].startswith(f"store {label}")])
    if os.environ.get("BENCH_EXPLAIN"):
        for name, (inputs, call) in work.items():
            slowest = max(zip(spent[name], inputs[WARMUP:], strict=True))[1]
            await explain(store, f"{name}: {slowest!r}", call, slowest)


async def explain(
    store: Store, title: str, call: Callable[[Any], Awaitable[Any]], given: Any
) -> None:
    """Print the plan of every statement `call` runs: EXPLAIN QUERY PLAN on SQLite, EXPLAIN
    ANALYZE on PostgreSQL (the statements are caught as the driver receives them)."""
    engine = store._readers.engine if store.is_sqlite else store._engine.sync_engine  # type: ignore[union-attr]
    caught: list[tuple[str, Any]] = []

    def catch(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            caught.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", catch)
    try:
        await call(given)
    finally:
        sa.event.remove(engine, "before_cursor_execute", catch)
    prefix = "EXPLAIN QUERY PLAN " if store.is_sqlite else "EXPLAIN (ANALYZE, BUFFERS) "
    print(f"\n  plan of the slowest {title}")
    for statement, parameters in caught:
        print("    " + " ".join(statement.split())[:400])

        def job(conn: Any, sql: str = prefix + statement, given: Any = parameters) -> list[Any]:
            return list(conn.exec_driver_sql(sql, given).all())

        for row in await store.read(job):
            print("      " + " ".join(str(v) for v in row))


def print_table(found: list[tuple[str, str, str, bool]]) -> None:
    print(f"  {'figure':<44} | {'value':>12} | {'target':>10} | result")
    for name, value, target, passed in found:
        print(f"  {name:<44} | {value:>12} | {target:>10} | {'PASS' if passed else 'FAIL'}")


def show(title: str, rows: list[tuple[str, Any]]) -> None:
    print(f"\n{title}")
    for name, value in rows:
        print(f"  {name:<38} {value}")


async def upgraded(store: Store, label: str) -> None:
    """Apply migrations newer than the data (the app does at every start); say how long."""
    started = time.perf_counter()
    await store.migrate()
    show(
        f"store {label}: migrations at start", [("took", f"{time.perf_counter() - started:.1f} s")]
    )


async def migrated(url: str) -> None:
    store = Store(url)
    await store.migrate()
    await store.close()


async def sqlite_file() -> tuple[Path, str]:
    """The generated SQLite file, made now unless an earlier run left it; how it was made."""
    path = DATA / f"{store_data.VERSION}-{COUNT}.db"
    meta = path.with_suffix(".times")
    if path.exists() and meta.exists():
        return path, "cached; generated earlier in" + meta.read_text()
    DATA.mkdir(exist_ok=True)
    for stale in DATA.glob(f"{store_data.VERSION}-{COUNT}.*"):
        stale.unlink()
    partial = path.with_suffix(".partial")
    started = time.perf_counter()
    await migrated(f"sqlite+aiosqlite:///{partial}")
    times = await asyncio.to_thread(store_data.fill_sqlite, str(partial), COUNT)
    times["total"] = time.perf_counter() - started
    partial.rename(path)
    meta.write_text(shown(times))
    return path, "generated now in" + shown(times)


def shown(times: dict[str, float]) -> str:
    return "".join(f"\n  {name:<38} {spent:.1f} s" for name, spent in times.items())


@pytest.mark.timeout(1200)
async def test_store_at_scale_sqlite() -> None:
    path, made = await sqlite_file()
    print(f"\nstore generator, SQLite, {COUNT:,} conversations, {made}")
    store = Store(f"sqlite+aiosqlite:///{path}")
    try:
        await upgraded(store, "SQLite")
        await measure(store, "SQLite")
    finally:
        await store.close()


@pytest.mark.timeout(1800)
async def test_store_at_scale_postgresql(request: pytest.FixtureRequest) -> None:
    url = os.environ.get("BENCH_STORE_PG_URL", "")
    if not url:
        server: PostgresServer = request.getfixturevalue("postgres")
        url = server.database()
    store = Store(url)
    try:
        await upgraded(store, "PostgreSQL")
        if await store.read(lambda conn: conn.execute(ANY_ROW).first()) is None:
            started = time.perf_counter()
            times = await store_data.fill_postgres(url.replace("+asyncpg", ""), COUNT)
            times["total"] = time.perf_counter() - started
            print(f"\nstore generator, PostgreSQL, {COUNT:,} conversations{shown(times)}")
        await measure(store, "PostgreSQL")
    finally:
        await store.close()
