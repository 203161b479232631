"""Users at scale for the fault tests: Slack events and web chat posts sent the way the platforms
send them (each retried until acknowledged, Slack's retries marked), and the answers the users
then see, counted per message.

A `Target` is where an instance listens now: a killed instance has none, a restarted one a new
port, and a delivery waits for it as Slack's redelivery would.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from core.sql import inbox, messages
from core.store import Store
from tests.fakes.slack import FakeSlack, event_callback, sign

T = TypeVar("T")
Request = Callable[[int], tuple[bytes, dict[str, str]]]  # attempt -> (body, headers)
SECRET = "signing-secret-for-tests"
PLACEHOLDER = "is thinking"


@dataclass
class Target:
    """One instance's current base URL ('' while it is down), and how often it was restarted."""

    name: str
    url: str = ""
    cycle: int = 0
    _restart: asyncio.Event | None = None

    def restarted(self, url: str) -> None:
        self.url = url
        self.cycle += 1
        if self._restart is not None:
            self._restart.set()
        self._restart = None

    async def cycle_at_least(self, cycle: int) -> None:
        """Wait for the `cycle`-th restart: spreads the users' messages over the restarts,
        however long each takes on a busy machine."""
        while self.cycle < cycle:
            if self._restart is None:
                self._restart = asyncio.Event()
            await self._restart.wait()


@dataclass
class Deliveries:
    """What the senders did: requests made, refused or cut off, and the ones in flight now."""

    sent: int = 0
    failed: int = 0  # no answer (the instance died or was down) or not a 2xx: sent again
    duplicates_acked: int = 0  # acknowledged as already seen
    in_flight: int = 0
    acked: set[str] = field(default_factory=set)


async def _send(
    client: httpx.AsyncClient,
    target: Target,
    path: str,
    build: Request,
    stats: Deliveries,
    *,
    deadline_s: float,
) -> httpx.Response:
    """POST what `build(attempt)` makes ((body, headers)) until a 2xx comes back."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline_s
    attempt = 0
    while True:
        if target.url:
            body, headers = build(attempt)
            stats.sent += 1
            stats.in_flight += 1
            try:
                response = await client.post(
                    f"{target.url}{path}", content=body, headers=headers, timeout=10
                )
            except httpx.TransportError:
                response = None
            finally:
                stats.in_flight -= 1
            if response is not None and response.is_success:
                return response
            stats.failed += 1
            attempt += 1
        if loop.time() > give_up:
            raise AssertionError(f"{path}: not acknowledged within {deadline_s}s")
        await asyncio.sleep(random.uniform(0.05, 0.2))


async def deliver_slack(
    client: httpx.AsyncClient,
    target: Target,
    event: dict[str, Any],
    event_id: str,
    stats: Deliveries,
    *,
    first_retry: int = 0,
    deadline_s: float = 600.0,
) -> None:
    """Deliver an Events API event as Slack does: signed, and on each failure sent again with
    `X-Slack-Retry-Num` (Slack gives up after 3; so would a test that waited for that)."""
    body = json.dumps(event_callback(event, event_id=event_id)).encode()

    def build(attempt: int) -> tuple[bytes, dict[str, str]]:
        headers = {"Content-Type": "application/json", **sign(body, SECRET)}
        if first_retry + attempt:
            headers["X-Slack-Retry-Num"] = str(first_retry + attempt)
            headers["X-Slack-Retry-Reason"] = "http_error" if attempt else "http_timeout"
        return body, headers

    await _send(client, target, "/slack/events", build, stats, deadline_s=deadline_s)
    stats.acked.add(event_id)


async def post_web(
    client: httpx.AsyncClient,
    target: Target,
    thread: str,
    text: str,
    message_id: str,
    stats: Deliveries,
    *,
    deadline_s: float = 600.0,
) -> None:
    """Post in the web chat with a client message id, so a resend is recognised."""
    body = json.dumps({"text": text, "user": "tester", "id": message_id}).encode()

    def build(attempt: int) -> tuple[bytes, dict[str, str]]:
        return body, {"Content-Type": "application/json"}

    response = await _send(
        client, target, f"/api/chat/{thread}", build, stats, deadline_s=deadline_s
    )
    if response.json().get("duplicate"):
        stats.duplicates_acked += 1
    stats.acked.add(f"web:{thread}:{message_id}")


# The emulators answer "… received: TEXT", the demo agent "You said: “TEXT”".
ANSWER = re.compile(r"(?:received: |You said: “)question ([A-Za-z0-9]+)")


def quoted(texts: Sequence[str]) -> list[str]:
    """The tokens of the messages (`question TOKEN`) that the agents' answers quote, in order."""
    return [m.group(1) for m in (ANSWER.search(t) for t in texts) if m]


def slack_answers(slack: FakeSlack) -> dict[tuple[str, str], list[str]]:
    """Per (channel, thread_ts): the bot's visible messages, placeholders left out, in the order
    Slack shows them (by ts)."""
    threads: dict[tuple[str, str], list[str]] = {}
    for posted in slack.posted():
        text = str(posted.get("text", ""))
        if PLACEHOLDER in text or "thread_ts" not in posted:
            continue
        threads.setdefault((posted["channel"], posted["thread_ts"]), []).append(text)
    return threads


def stuck_placeholders(slack: FakeSlack) -> int:
    """Placeholders ("…is thinking…") still showing: ones no answer replaced."""
    return sum(PLACEHOLDER in str(m.get("text", "")) for m in slack.posted())


async def _read(url: str, job: Callable[[Connection], T]) -> T:
    store = Store(url)
    try:
        return await store.read(job)
    finally:
        await store.close()


async def queue_counts(url: str) -> dict[str, int]:
    """Inbox and outbox rows by status (`inbox_done`, `outbox_working`, …)."""
    store = Store(url)
    try:
        return await store.counts()
    finally:
        await store.close()


async def stored_answers(url: str) -> Counter[str]:
    """How many stored agent messages quote each message token."""

    def job(conn: Connection) -> Counter[str]:
        rows = conn.execute(sa.select(messages.c.content).where(messages.c.role == "agent"))
        return Counter(quoted([r.content for r in rows]))

    return await _read(url, job)


async def stored_notices(url: str) -> int:
    """How many failure notices were stored (turns the agent never answered)."""

    def job(conn: Connection) -> int:
        query = sa.select(sa.func.count()).where(messages.c.kind == "notice")
        return int(conn.execute(query).scalar_one())

    return await _read(url, job)


async def failed_turns(url: str) -> list[tuple[str, str]]:
    """(event id, reason) of every turn that ended failed."""

    def job(conn: Connection) -> list[tuple[str, str]]:
        query = sa.select(inbox.c.event_id, inbox.c.error).where(inbox.c.status == "failed")
        return [(str(row.event_id), str(row.error or "")) for row in conn.execute(query)]

    return await _read(url, job)


@dataclass
class Figures:
    """The outcome per user message, from what was posted where the user reads."""

    messages: int
    answered: int  # at least one answer
    lost: int  # no answer at all
    duplicated: int  # messages answered more than once
    extra: int  # answers beyond the first, summed

    @property
    def duplicate_rate(self) -> float:
        return self.extra / self.messages if self.messages else 0.0

    @classmethod
    def of(cls, expected: Sequence[str], answers: Counter[str]) -> Figures:
        counts = [answers.get(token, 0) for token in expected]
        return cls(
            messages=len(expected),
            answered=sum(c >= 1 for c in counts),
            lost=sum(c == 0 for c in counts),
            duplicated=sum(c > 1 for c in counts),
            extra=sum(max(0, c - 1) for c in counts),
        )

    def line(self) -> str:
        return (
            f"messages {self.messages}, answered {self.answered}, lost {self.lost}, "
            f"duplicated {self.duplicated} (+{self.extra} extra answers), "
            f"duplicate rate {self.duplicate_rate:.2%}"
        )
