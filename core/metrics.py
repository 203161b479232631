"""What the bridge counts, exposed at `/metrics` in the Prometheus text format.

The bridge calls one hook at each step of a message (accepted, turn finished, reply posted,
post retried or given up); each hook counts and writes one INFO line on the
`threadbridge.events` logger, which carries the message's trace id. Queue depths and breaker
states are read when Prometheus scrapes, not kept up to date on the hot path.

Each `Metrics` has its own registry, so several bridges in one process (the tests) never share
counters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from enum import Enum
from typing import Any

import sqlalchemy as sa
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.engine import Connection

from core.errors import AgentServiceError
from core.leader import Leadership
from core.model import Inbound
from core.sql import UNFINISHED, inbox, outbox
from core.store import Store

events = logging.getLogger("threadbridge.events")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Agents take seconds; a turn with tool calls or retries can take minutes.
TURN_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
BREAKER_STATES = ("closed", "half_open", "open")
SCRAPE_TIMEOUT_S = 2.0


class Metrics:
    """Counters and histograms of one bridge, and the scrape-time gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "threadbridge_messages_received",
            "Messages accepted into the inbox, per source.",
            ["source"],
            registry=r,
        )
        self.duplicates = Counter(
            "threadbridge_messages_duplicate",
            "Deliveries dropped because their event id was seen before (retries, redeliveries).",
            ["source"],
            registry=r,
        )
        self.turns = Histogram(
            "threadbridge_turn_seconds",
            "Time from taking a message to storing the agent's answer (or the failure), "
            "agent calls, retries and tool calls included.",
            ["agent", "outcome"],
            buckets=TURN_BUCKETS,
            registry=r,
        )
        self.agent_errors = Counter(
            "threadbridge_agent_errors",
            "Turns that failed, per agent and error (AgentUnavailable, AgentRejected, …).",
            ["agent", "error"],
            registry=r,
        )
        self.posted = Counter(
            "threadbridge_replies_posted",
            "Replies posted to the platform, per source and kind (answer, notice).",
            ["source", "kind"],
            registry=r,
        )
        self.post_retries = Counter(
            "threadbridge_post_retries",
            "Posts that failed and were put back in the outbox for a later try.",
            ["source"],
            registry=r,
        )
        self.post_failures = Counter(
            "threadbridge_replies_failed",
            "Replies given up: refused by the platform, or out of retries.",
            ["source"],
            registry=r,
        )
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self._scraped = _Scraped()
        r.register(self._scraped)

    # -- hooks the bridge calls ----------------------------------------------------------------

    def accepted(self, inbound: Inbound, *, duplicate: bool) -> None:
        source = inbound.thread.source
        if duplicate:
            self.duplicates.labels(source).inc()
            events.info("duplicate of %s dropped", inbound.event_id, extra={"source": source})
            return
        self.received.labels(source).inc()
        events.info(
            "accepted %s in %s",
            inbound.event_id,
            inbound.thread.key,
            extra={"source": source, "event_id": inbound.event_id},
        )

    def turn_answered(self, agent: str, started: float) -> None:
        seconds = time.monotonic() - started
        self.turns.labels(agent, "answered").observe(seconds)
        events.info(
            "turn answered by %s in %.2fs",
            agent,
            seconds,
            extra={"agent": agent, "seconds": seconds},
        )

    def turn_failed(self, agent: str, error: BaseException, started: float) -> None:
        seconds = time.monotonic() - started
        kind = type(error).__name__ if isinstance(error, AgentServiceError) else "internal"
        self.turns.labels(agent, "failed").observe(seconds)
        self.agent_errors.labels(agent, kind).inc()
        events.info(
            "turn failed (%s) in %.2fs",
            kind,
            seconds,
            extra={"agent": agent, "seconds": seconds, "error": kind},
        )

    def reply_posted(self, source: str, kind: str) -> None:
        self.posted.labels(source, kind).inc()
        events.info("%s posted to %s", kind, source, extra={"source": source})

    def post_retried(self, source: str) -> None:
        self.post_retries.labels(source).inc()

    def post_failed(self, source: str) -> None:
        self.post_failures.labels(source).inc()

    def watch(self, leadership: Leadership) -> None:
        """Expose whether this instance holds `leadership`'s role (`threadbridge_leader`)."""
        self._scraped.leaderships[leadership.role] = leadership

    # -- scraping ------------------------------------------------------------------------------

    async def render(
        self, store: Store, sources: Iterable[str], breakers: Mapping[str, Any] | None = None
    ) -> bytes:
        """The text Prometheus scrapes: counters, then queue depths read from the store now
        (at most SCRAPE_TIMEOUT_S; `threadbridge_store_up` 0 when it did not answer)."""
        try:
            depths = await asyncio.wait_for(store.read(_depths), SCRAPE_TIMEOUT_S)
        except Exception as exc:  # the scrape must answer, and say the store is down
            logging.getLogger(__name__).debug("metrics: queue depths unavailable: %r", exc)
            depths = None
        self._scraped.update(list(sources), depths, breakers or {})
        return generate_latest(self.registry)


def _depths(conn: Connection) -> dict[tuple[str, str, str], int]:
    """(queue, source, status) -> unfinished items; the status indexes keep this cheap."""
    found: dict[tuple[str, str, str], int] = {}
    for name, table in (("inbox", inbox), ("outbox", outbox)):
        query = (
            sa.select(table.c.source, table.c.status, sa.func.count())
            .where(table.c.status.in_(UNFINISHED))
            .group_by(table.c.source, table.c.status)
        )
        for source, status, count in conn.execute(query).all():
            found[(name, str(source), str(status))] = int(count)
    return found


def breaker_state(breaker: Any) -> str:
    """A breaker's state as a label: closed, half_open or open (or whatever it calls it)."""
    state = getattr(breaker, "state", breaker)
    if isinstance(state, Enum):
        state = state.value if isinstance(state.value, str) else state.name
    return str(state).lower().replace("-", "_").replace(" ", "_")


class _Scraped(Collector):
    """The gauges read at scrape time (a custom collector: no state between scrapes)."""

    def __init__(self) -> None:
        self._sources: list[str] = []
        self._depths: dict[tuple[str, str, str], int] | None = None
        self._breakers: dict[str, str] = {}
        self.leaderships: dict[str, Leadership] = {}

    def update(
        self,
        sources: list[str],
        depths: dict[tuple[str, str, str], int] | None,
        breakers: Mapping[str, Any],
    ) -> None:
        self._sources = sources
        self._depths = depths
        self._breakers = {agent: breaker_state(b) for agent, b in breakers.items()}

    def describe(self) -> list[Metric]:
        return []  # the families depend on the scrape; skip the registry's describe check

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "threadbridge_store_up", "1 when the store answered the last scrape's query."
        )
        up.add_metric([], 0 if self._depths is None else 1)
        yield up
        if self._depths is not None:
            for queue, what in (("inbox", "turns to run"), ("outbox", "replies to post")):
                family = GaugeMetricFamily(
                    f"threadbridge_{queue}_depth",
                    f"Unfinished {queue} items ({what}), per source and status "
                    "(pending, working), across every instance on the store.",
                    labels=["source", "status"],
                )
                sources = sorted({*self._sources, *(s for q, s, _ in self._depths if q == queue)})
                for source in sources:
                    for status in UNFINISHED:
                        count = self._depths.get((queue, source, status), 0)
                        family.add_metric([source, status], count)
                yield family
        if self._breakers:
            family = GaugeMetricFamily(
                "threadbridge_breaker_state",
                "1 for the state each agent's circuit breaker is in, 0 for the others.",
                labels=["agent", "state"],
            )
            for agent, current in sorted(self._breakers.items()):
                for state in sorted({*BREAKER_STATES, current}):
                    family.add_metric([agent, state], 1 if state == current else 0)
            yield family
        if self.leaderships:
            family = GaugeMetricFamily(
                "threadbridge_leader",
                "1 while this instance holds the role (e.g. telegram-poll:<bot id>: it polls "
                "Telegram), 0 while it stands by.",
                labels=["role"],
            )
            for role, leadership in sorted(self.leaderships.items()):
                family.add_metric([role], 1 if leadership.leading else 0)
            yield family
