"""Leadership (core/leader.py): one instance per store holds a role, on SQLite and PostgreSQL;
a holder whose lock connection is lost stops, and a standby takes over."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from core.leader import Candidate, FileLeadership, LeadershipLost, advisory_key, lock_file
from core.store import Store
from tests.pg import PostgresServer

ROLE = "telegram-poll:7000000001"


@pytest.fixture
async def stores(store_url: str) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores on one database, as two instances have."""
    a, b = Store(store_url), Store(store_url)
    yield a, b
    await a.close()
    await b.close()


async def kill_lock_holder(store: Store) -> int:
    """End, from another session, the PostgreSQL session that holds an advisory lock."""
    key = advisory_key(ROLE) & 0xFFFFFFFF  # pg_locks shows a bigint key as two halves
    query = sa.text(
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
        "AND granted AND objid::bigint = :low"
    )
    return len(await store.read(lambda conn: list(conn.execute(query, {"low": key}))))


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.02)


async def test_one_store_holds_a_role_until_it_lets_go(stores: tuple[Store, Store]) -> None:
    a, b = stores
    first, second = a.leadership(ROLE), b.leadership(ROLE)
    assert await first.acquire()
    assert await first.acquire()  # holding it already
    assert not await second.acquire()
    assert not await second.acquire()
    other = b.leadership("another-role")
    assert await other.acquire()  # roles are independent
    await first.ensure()
    await first.release()
    with pytest.raises(LeadershipLost):
        await first.ensure()
    assert await second.acquire()
    assert not await first.acquire()
    for leadership in (first, second, other):  # a standby's connection is closed too
        await leadership.release()


async def test_sqlite_locks_a_file_beside_the_database(tmp_path: Path) -> None:
    store = Store(f"sqlite+aiosqlite:///{tmp_path}/tb.db")
    leadership = store.leadership(ROLE)
    assert await leadership.acquire()
    assert (tmp_path / "tb.db.telegram-poll-7000000001.lock").exists()
    await leadership.release()
    await store.close()


async def test_an_in_memory_database_always_leads(tmp_path: Path) -> None:
    assert lock_file(":memory:", ROLE) is None
    assert lock_file("file:tb?mode=memory&cache=shared", ROLE) is None
    assert lock_file(f"file:{tmp_path}/tb.db?mode=rwc", ROLE) == tmp_path / (
        "tb.db.telegram-poll-7000000001.lock"
    )
    a, b = FileLeadership(ROLE, None), FileLeadership(ROLE, None)
    assert await a.acquire()
    assert await b.acquire()  # no other process can see an in-memory database


async def test_postgresql_a_lost_lock_connection_ends_the_lead(postgres: PostgresServer) -> None:
    url = postgres.database()
    a, b = Store(url), Store(url)
    leader, standby = a.leadership(ROLE), b.leadership(ROLE)
    assert await leader.acquire()
    assert not await standby.acquire()

    assert await kill_lock_holder(b) == 1
    await asyncio.wait_for(leader.lost.wait(), 10)  # told while idle: no query needed
    assert not leader.leading
    with pytest.raises(LeadershipLost):
        await leader.ensure()
    assert await standby.acquire()
    assert not await leader.acquire()
    await standby.release()
    await leader.release()
    await a.close()
    await b.close()


class Worker:
    """A candidate's work: counts its starts, runs until cancelled."""

    def __init__(self, store: Store, name: str) -> None:
        self.name = name
        self.running = False
        self.starts = 0
        self.candidate = Candidate(
            store.leadership(ROLE),
            self.work,
            retry_s=0.05,
            on_lead=self.lead,
            on_standby=lambda: None,
        )

    async def lead(self) -> None:
        self.starts += 1

    async def work(self) -> None:
        self.running = True
        try:
            while True:
                await self.candidate.leadership.ensure()
                await asyncio.sleep(0.02)
        finally:
            self.running = False


async def test_a_standby_candidate_takes_over_when_the_leader_stops(
    stores: tuple[Store, Store],
) -> None:
    a, b = Worker(stores[0], "a"), Worker(stores[1], "b")
    await a.candidate.start()
    await b.candidate.start()
    await wait_until(lambda: a.running, "a works")
    await asyncio.sleep(0.3)  # b keeps standing by
    assert not b.running and b.starts == 0
    assert a.candidate.running and b.candidate.running  # both healthy

    await a.candidate.stop()
    assert not a.running
    await wait_until(lambda: b.running, "b takes over")
    assert b.starts == 1
    await b.candidate.stop()


async def test_postgresql_the_leader_stops_working_when_its_lock_is_lost(
    postgres: PostgresServer,
) -> None:
    url = postgres.database()
    stores = Store(url), Store(url)
    a, b = Worker(stores[0], "a"), Worker(stores[1], "b")
    await a.candidate.start()
    await b.candidate.start()
    await wait_until(lambda: a.running, "a works")

    assert await kill_lock_holder(stores[1]) == 1
    await wait_until(lambda: not a.running, "a stops")
    await wait_until(lambda: b.running, "b takes over")
    assert a.candidate.running  # a stands by now, and may lead again later
    await b.candidate.stop()
    await wait_until(lambda: a.running, "a leads again once b is gone")
    assert a.starts == 2
    await a.candidate.stop()
    for store in stores:
        await store.close()
