"""Telegram long polling with two `threadbridge serve` instances on one PostgreSQL: one elected
instance polls (Telegram allows one poller per bot), the other stands by; `kill -9` of the
poller hands polling to the standby within seconds, and every message is answered once —
including those the dead poller stored but never confirmed, which Telegram gives again.

Each instance reaches the fake Bot API through its own base URL, so every getUpdates call is
known by its caller. `pytest -s` prints the figures.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from tests.e2e.drive import Figures, queue_counts, quoted, stored_answers
from tests.e2e.serve import ServeProcess
from tests.fakes.telegram import BOT_ID, BOT_TOKEN, Call, FakeTelegram, fake_telegram
from tests.pg import PostgresServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

T = TypeVar("T")
LEADING = "polling Telegram (leader)"
STANDING_BY = "standing by: another instance polls Telegram"
GAUGE = re.compile(rf'threadbridge_leader\{{role="telegram-poll:{BOT_ID}"\}} (\S+)')
USERS = 10  # private chats, each a conversation


def config_text(store: str, api: str) -> str:
    return f"""
default_agent = "demo"

[store]
url = "{store}"

[bridge]
poll_s = 0.05

[agents.demo]
service = "local"

[telegram]
api_base_url = "{api}"
poll_timeout_s = 2
standby_retry_s = 0.5
post_rate_per_chat = 0
"""


@pytest.fixture
def tg() -> Iterator[FakeTelegram]:
    with fake_telegram() as fake:
        yield fake


def wait_for(found: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while not (value := found()):
        assert time.monotonic() < deadline, f"no {what} within {timeout}s"
        time.sleep(0.05)
    return value


def answers(tg: FakeTelegram) -> Counter[str]:
    """How many of the bot's messages quote each question token."""
    return Counter(quoted([str(m["message"]["text"]) for m in tg.sent()]))


def ask(tg: FakeTelegram, tokens: list[str]) -> list[int]:
    """Each token's question from one of the users, queued for getUpdates; the update ids."""
    return [
        tg.queue_update(tg.private_message(f"question {tok}", chat_id=3000 + n % USERS))[
            "update_id"
        ]
        for n, tok in enumerate(tokens)
    ]


def wait_answered(tg: FakeTelegram, tokens: list[str]) -> None:
    wait_for(lambda: all(answers(tg)[t] for t in tokens), f"answers to {tokens[0]}…", 60)


def leader_gauge(serve: ServeProcess) -> float:
    body = httpx.get(f"{serve.url}/metrics", timeout=10).text
    found = GAUGE.search(body)
    assert found, body
    return float(found.group(1))


def polls(tg: FakeTelegram) -> list[Call]:
    return tg.calls_to("getUpdates")


def test_one_instance_polls_and_the_standby_takes_over_after_a_kill(
    tmp_path: Path, tg: FakeTelegram, postgres: PostgresServer
) -> None:
    store = postgres.database()
    env = {"TELEGRAM_BOT_TOKEN": BOT_TOKEN}
    instances = []
    for name in ("a", "b"):  # each reaches Telegram by its own URL: its calls show its name
        (tmp_path / name).mkdir()
        instances.append(
            ServeProcess(tmp_path / name, config_text(store, tg.base_url_for(name)), env=env)
        )
    a, b = instances
    try:
        a.start()
        wait_for(lambda: LEADING in a.log(), "leader line from a")
        b.start()
        wait_for(lambda: STANDING_BY in b.log(), "standby line from b")

        # Both serve: one polls, the other stands by, and both are ready.
        first = [f"one{n:02d}" for n in range(20)]
        ask(tg, first)
        wait_answered(tg, first)
        assert (leader_gauge(a), leader_gauge(b)) == (1.0, 0.0)
        for serve in (a, b):
            ready = httpx.get(f"{serve.url}/readyz", timeout=10)
            assert ready.status_code == 200, ready.text

        # a stores these and answers them, but its confirmations never reach Telegram.
        tg.confirming = False
        unconfirmed = [f"unconf{n:02d}" for n in range(10)]
        unconfirmed_ids = set(ask(tg, unconfirmed))
        wait_answered(tg, unconfirmed)
        # Killed with nothing in flight: a reply posted but not yet marked sent would be posted
        # again (fault 1's crash test counts those); this test is about who polls.
        wait_for(lambda: not asyncio.run(busy(store)), "a's queues empty", 30)
        a.kill()
        killed_at = time.time()
        tg.confirming = True
        during = [f"gap{n:02d}" for n in range(10)]  # sent while no one polls
        ask(tg, during)

        took_over = wait_for(
            lambda: next((c for c in polls(tg) if c.via == "b"), None), "getUpdates from b", 30
        )
        wait_answered(tg, during)
        after = [f"after{n:02d}" for n in range(10)]
        ask(tg, after)
        wait_answered(tg, after)
        wait_for(lambda: not asyncio.run(busy(store)), "empty queues", 30)
        time.sleep(1.0)  # an answer posted twice would show by now

        everything = first + unconfirmed + during + after
        shown = Figures.of(everything, answers(tg))
        stored = Figures.of(everything, asyncio.run(stored_answers(store)))
        before_kill = [c for c in polls(tg) if c.at < killed_at]
        redelivered = {
            u["update_id"] for c in polls(tg) if c.via == "b" for u in c.response["result"]
        }
        print("\n=== Telegram polling: two instances, one PostgreSQL, kill -9 of the poller ===")
        print(f"getUpdates before the kill: {Counter(c.via for c in before_kill)}")
        print(f"standby's first getUpdates {took_over.at - killed_at:.2f}s after the kill")
        print(
            f"unconfirmed updates given again to the standby: {len(unconfirmed_ids & redelivered)}"
        )
        print(f"answers in Telegram: {shown.line()}")
        print(f"stored answers: {stored.line()}")

        assert before_kill and {c.via for c in before_kill} == {"a"}  # b never polled
        assert {c.via for c in polls(tg) if c.at > killed_at} == {"b"}
        assert unconfirmed_ids <= redelivered  # Telegram gave them again; the inbox kept them out
        doubled = [t for t, n in answers(tg).items() if n > 1]
        assert (shown.lost, shown.extra) == (0, 0), f"{shown.line()}: {doubled}"
        assert (stored.lost, stored.extra) == (0, 0), stored.line()
        assert LEADING in b.log() and STANDING_BY not in a.log()
        assert leader_gauge(b) == 1.0
    finally:
        for serve in (a, b):
            serve.stop()


async def busy(store: str) -> int:
    counts = await queue_counts(store)
    return sum(v for k, v in counts.items() if k.endswith(("_pending", "_working")))
