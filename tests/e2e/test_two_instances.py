"""Fault 2: two `threadbridge serve` instances on one PostgreSQL share 1,000 Slack events, spread
across both, with Slack's retries (`X-Slack-Retry-Num`), the same event delivered to both, and
the same mention arriving as `app_mention` and as `message`. Each message must be answered
exactly once, and each thread's answers must come in the order of its messages.

`pytest -s` prints the figures.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.drive import (
    PLACEHOLDER,
    SECRET,
    Deliveries,
    Figures,
    Target,
    deliver_slack,
    queue_counts,
    quoted,
    slack_answers,
    stored_answers,
    stuck_placeholders,
)
from tests.e2e.serve import ServeProcess
from tests.fakes.slack import BOT_TOKEN, BOT_USER_ID, FakeSlack, app_mention, fake_slack, message
from tests.pg import PostgresServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

THREADS, PER_THREAD = 100, 10  # 1,000 messages, each one Slack event (and its redeliveries)
CHANNELS = 20
RETRY, BOTH, LATE = 0.25, 0.15, 0.05  # shares of messages redelivered in each way
MENTIONED = 0.2  # share of follow-ups that mention the bot: Slack sends both event types
ORDINAL = re.compile(r"This is message (\d+) of")


def config_text(store: str, slack_api: str) -> str:
    return f"""
default_agent = "demo"

[store]
url = "{store}"

[bridge]
poll_s = 0.05

[agents.demo]
service = "local"

[slack]
api_base_url = "{slack_api}"
post_rate_per_channel = 0
"""


@dataclass
class Plan:
    """How the messages were delivered."""

    deliveries: Counter[str] = field(default_factory=Counter)  # by kind
    late: list[tuple[dict[str, Any], str]] = field(default_factory=list)  # (event, event id)
    roots: dict[int, tuple[str, str]] = field(default_factory=dict)  # thread -> (channel, ts)


def token(thread: int, n: int) -> str:
    return f"t{thread:03d}n{n}"


async def user(
    client: httpx.AsyncClient,
    targets: list[Target],
    stats: dict[str, Deliveries],
    plan: Plan,
    thread: int,
) -> None:
    """One person's thread: a mention, then replies, each acknowledged before the next is sent
    (a person writes one message after another); duplicates and retries go alongside."""
    channel = f"C2{thread % CHANNELS:03d}"
    root_ts = ""
    await asyncio.sleep(random.uniform(0, 1))
    for n in range(PER_THREAD):
        text = f"question {token(thread, n)}"
        mention = n == 0 or random.random() < MENTIONED
        words = f"<@{BOT_USER_ID}> {text}" if mention else text
        if n == 0:
            event = app_mention(words, channel=channel)
            root_ts = event["ts"]
            plan.roots[thread] = (channel, root_ts)
        elif mention:
            event = app_mention(words, channel=channel, thread_ts=root_ts)
        else:
            event = message(words, channel=channel, thread_ts=root_ts)
        event_id = f"Ev{token(thread, n).upper()}"
        first, other = random.sample(targets, 2)
        sends = [deliver_slack(client, first, event, event_id, stats[first.name])]
        plan.deliveries["first delivery"] += 1
        if random.random() < RETRY:  # the first try timed out for Slack: its retry went elsewhere
            sends.append(
                deliver_slack(client, other, event, event_id, stats[other.name], first_retry=1)
            )
            plan.deliveries["retry (X-Slack-Retry-Num)"] += 1
        if random.random() < BOTH:  # the same event to both instances at once
            sends.append(deliver_slack(client, other, event, event_id, stats[other.name]))
            plan.deliveries["same event to both"] += 1
        if mention and event["type"] == "app_mention":  # and as message.channels
            as_message = message(
                words, channel=channel, ts=event["ts"], thread_ts=event.get("thread_ts")
            )
            twin = random.choice(targets)
            sends.append(deliver_slack(client, twin, as_message, event_id + "M", stats[twin.name]))
            plan.deliveries["mention also as message"] += 1
        if random.random() < LATE:
            plan.late.append((event, event_id))
        await asyncio.gather(*sends)


@dataclass
class Outcome:
    figures: Figures  # answers in Slack, per message
    stored: Figures  # replies in the store, per message
    queues: dict[str, int]
    out_of_order: list[tuple[int, list[str], list[int]]]  # thread, answers shown, their ordinals
    stuck: int  # placeholders never replaced by an answer


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer) -> Outcome:
    """Run the scenario once; the tests below judge its outcome."""
    with fake_slack() as slack:
        return run(tmp_path_factory.mktemp("two"), slack, postgres.database())


def run(tmp_path: Path, slack: FakeSlack, store: str) -> Outcome:
    started = time.monotonic()
    env = {"SLACK_BOT_TOKEN": BOT_TOKEN, "SLACK_SIGNING_SECRET": SECRET}
    for c in range(CHANNELS):
        slack.add_channel(f"C2{c:03d}", f"room-{c}")
    instances: list[ServeProcess] = []
    for name in ("a", "b"):
        workdir = tmp_path / name
        workdir.mkdir()
        instances.append(ServeProcess(workdir, config_text(store, slack.base_url), env=env))
    expected = {t: [token(t, n) for n in range(PER_THREAD)] for t in range(THREADS)}
    everything = [tok for tokens in expected.values() for tok in tokens]

    async def main() -> Outcome:
        targets = [Target("a", instances[0].url), Target("b", instances[1].url)]
        stats = {t.name: Deliveries() for t in targets}
        plan = Plan()
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        async with httpx.AsyncClient(limits=limits) as client:
            await asyncio.gather(*(user(client, targets, stats, plan, t) for t in range(THREADS)))
            for event, event_id in plan.late:  # Slack's later retries, after the thread moved on
                target = random.choice(targets)
                await deliver_slack(
                    client, target, event, event_id, stats[target.name], first_retry=2
                )
                plan.deliveries["late retry"] += 1
        acked_at = time.monotonic()

        deadline = time.monotonic() + 60
        while True:
            counts = await queue_counts(store)
            busy = sum(v for k, v in counts.items() if k.endswith(("_pending", "_working")))
            answered = Counter(
                tok for texts in slack_answers(slack).values() for tok in quoted(texts)
            )
            if not busy and all(answered[t] for t in everything):
                break
            assert time.monotonic() < deadline, f"queues {counts}, answered {len(answered)}"
            await asyncio.sleep(0.25)
        await asyncio.sleep(1.0)  # anything posted twice would show by now

        shown = slack_answers(slack)
        answered = Counter(tok for texts in shown.values() for tok in quoted(texts))
        result = Outcome(
            figures=Figures.of(everything, answered),
            stored=Figures.of(everything, await stored_answers(store)),
            queues=await queue_counts(store),
            out_of_order=[],
            stuck=stuck_placeholders(slack),
        )
        for t, tokens in expected.items():
            texts = shown.get(plan.roots[t], [])
            ordinals = [int(m.group(1)) for m in map(ORDINAL.search, texts) if m]
            if quoted(texts) != tokens or ordinals != list(range(1, PER_THREAD + 1)):
                result.out_of_order.append((t, quoted(texts), ordinals))
        requests = sum(s.sent for s in stats.values())

        print("\n=== fault 2: two instances, one PostgreSQL, 1,000 Slack events ===")
        print(
            f"events: {len(everything)} messages in {THREADS} threads, "
            f"{requests} deliveries: {dict(plan.deliveries)}"
        )
        print(
            "deliveries per instance: "
            + ", ".join(f"{n}: {s.sent}" for n, s in stats.items())
            + f"; cut off or refused, then sent again: {sum(s.failed for s in stats.values())}"
        )
        print(f"answers in Slack: {result.figures.line()}")
        print(f"stored replies: {result.stored.line()}")
        print(f"threads whose answers show out of order: {len(result.out_of_order)} of {THREADS}")
        print(f"stuck '{PLACEHOLDER}' placeholders: {result.stuck}")
        print(f"queues at the end: {result.queues}")
        print(
            f"runtime: {time.monotonic() - started:.1f}s "
            f"(all answered {time.monotonic() - acked_at:.1f}s after the last acknowledgement)"
        )
        for t, tokens, ordinals in result.out_of_order[:3]:
            print(f"  thread {t}: answers shown {tokens}, their ordinals {ordinals}")
        return result

    try:
        for process in instances:
            process.start()
        return asyncio.run(main())
    finally:
        for process in instances:
            process.stop()


def test_each_of_1000_events_is_answered_exactly_once(outcome: Outcome) -> None:
    assert outcome.figures.lost == 0, outcome.figures.line()
    assert outcome.figures.extra == 0, outcome.figures.line()
    assert outcome.stored.lost == 0, outcome.stored.line()
    assert outcome.stored.extra == 0, outcome.stored.line()
    assert outcome.queues == {"inbox_done": 1000, "outbox_sent": 1000}


def test_each_thread_shows_its_answers_in_order(outcome: Outcome) -> None:
    assert not outcome.out_of_order, outcome.out_of_order[:3]
    assert outcome.stuck == 0
