"""Who is answered, and how often: the routes' access rules and the per-user limits.

Two checks, both in the bridge, so every adapter gets them:

- `channel_open` at submit: a message in a channel its route's `allow_channels` leaves out is
  ignored silently (nothing kept, no notice; logged once per channel), as `[slack] channels` does.
- `turned_away` at the start of a turn: `deny_users`, `allow_users`, then the `[limits]`. A
  refused message is not sent to the agent. It is stored in its conversation with kind
  `refused` and its inbox item closed as `refused` with the reason, so admins see it; the
  person is told (a notice) once per thread: once a UTC day when refused by the rules, once a
  minute for the rate limit, once a UTC day for the daily budget.

The access rules live in the config file's routes (an admin's run-time route changes the agent
of a scope, never who may use it). Over the file's routes that match a thread: `deny_users` add
up (a person denied anywhere above is denied); `allow_users`, `allow_channels` and
`refused_notice` come from the most specific route that sets them.

The limits count a person's accepted messages (by source and platform user id) in the inbox,
which every instance shares: those that came in before this one — a redelivered event is
never accepted twice, and refused messages do not count. So they hold across instances and
across the threads a person writes in at once, for one indexed query per turn; with no rule
and no limit configured, there is no query at all. Platform admins are exempt from the limits.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import bindparam
from sqlalchemy.engine import Connection

from core.config import PLATFORMS, Config
from core.model import Conversation, Inbound, ThreadRef
from core.routing import Route
from core.sql import inbox
from core.store import Claim, ClaimLost, NewMessage, Store, aware
from core.tables import utcnow

log = logging.getLogger(__name__)

REFUSED_NOTICE = (
    "Sorry, I can't answer you here: only some people can use me in this place. "
    "Please ask an admin if you need access."
)
# The reasons a refused inbox item keeps in `error` (also what the notice checks look for).
DENIED = "denied"  # prefix of the two below
DENIED_LISTED = "denied: in the route's deny_users"
DENIED_UNLISTED = "denied: not in the route's allow_users"
OVER_RATE = "limit: per_user_per_minute"
OVER_BUDGET = "limit: per_user_per_day"
MINUTE = timedelta(minutes=1)
DAY = timedelta(days=1)
_REMEMBERED = 10_000  # cached policies, channels logged


def is_direct(thread: ThreadRef) -> bool:
    """Whether a thread is a direct message, by the ThreadRef conventions (DESIGN.md §3): a
    Slack D… channel, Discord's `@me` guild, a Telegram private chat (a positive chat id)."""
    if thread.source == "slack":
        return thread.channel.startswith("D")
    if thread.source == "discord":
        return thread.workspace == "@me"
    if thread.source == "telegram":
        return not thread.channel.startswith("-")
    return True  # the web chat and the terminal have no channels


@dataclass(frozen=True, slots=True)
class Policy:
    """The access rules that hold in one channel (None: not set, anyone)."""

    allow_users: frozenset[str] | None = None
    deny_users: frozenset[str] = frozenset()
    allow_channels: frozenset[str] | None = None
    channel_routed: bool = False  # a channel route of the file names this channel
    refused_notice: str = REFUSED_NOTICE

    def channel_open(self, thread: ThreadRef) -> bool:
        """Direct messages and channels with their own route are never left out."""
        return (
            self.allow_channels is None
            or self.channel_routed
            or thread.channel in self.allow_channels
            or is_direct(thread)
        )

    def refuses(self, user: str) -> str | None:
        """Why `user` is not answered here (deny wins over allow), or None."""
        if user in self.deny_users:
            return DENIED_LISTED
        if self.allow_users is not None and user not in self.allow_users:
            return DENIED_UNLISTED
        return None


def policy_for(routes: list[Route], thread: ThreadRef) -> Policy:
    """The rules of the config file's `routes` that hold in `thread`'s channel."""
    matching = sorted((r for r in routes if r.matches(thread)), key=Route.rank, reverse=True)
    allow = next((r.allow_users for r in matching if r.allow_users is not None), None)
    channels = next((r.allow_channels for r in matching if r.allow_channels is not None), None)
    notice = next((r.refused_notice for r in matching if r.refused_notice is not None), None)
    return Policy(
        allow_users=frozenset(allow) if allow is not None else None,
        deny_users=frozenset(u for r in matching for u in r.deny_users or ()),
        allow_channels=frozenset(channels) if channels is not None else None,
        channel_routed=any(r.tier == "channel" for r in matching),
        refused_notice=REFUSED_NOTICE if notice is None else notice,
    )


@dataclass(frozen=True, slots=True)
class Usage:
    """A person's messages before one of theirs: counts, and when they were last told."""

    today: int
    last_minute: int
    oldest_in_minute: datetime | None
    told_denied: datetime | None
    told_rate: datetime | None
    told_budget: datetime | None


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str  # kept in the inbox item's error
    notice: str  # "" : say nothing


def _sum(condition: Any) -> Any:
    return sa.func.coalesce(sa.func.sum(sa.case((condition, 1), else_=0)), 0)


def _last_told(condition: Any) -> Any:
    here = sa.and_(inbox.c.status == "refused", inbox.c.thread_key == bindparam("thread_key"))
    return sa.func.max(sa.case((sa.and_(here, condition), inbox.c.created)))


def _usage_statement() -> Any:
    stamp = inbox.c.created.type
    counted = inbox.c.status != "refused"
    minute = inbox.c.created >= bindparam("minute_start", type_=stamp)
    day = inbox.c.created >= bindparam("day_start", type_=stamp)
    return sa.select(
        _sum(sa.and_(counted, day)).label("today"),
        _sum(sa.and_(counted, minute)).label("last_minute"),
        sa.func.min(sa.case((sa.and_(counted, minute), inbox.c.created))).label("oldest"),
        _last_told(sa.and_(day, inbox.c.error.startswith(DENIED))).label("told_denied"),
        _last_told(sa.and_(minute, inbox.c.error == OVER_RATE)).label("told_rate"),
        _last_told(sa.and_(day, inbox.c.error == OVER_BUDGET)).label("told_budget"),
    ).where(
        inbox.c.source == bindparam("source"),
        inbox.c.author_id == bindparam("author_id"),
        inbox.c.created >= bindparam("since", type_=stamp),
        inbox.c.id < bindparam("before_id"),
    )


USAGE = _usage_statement()

OpenConversation = Callable[[Inbound], Awaitable[Conversation]]


class Gate:
    """Applies the routes' access rules and the `[limits]` (see the module docstring)."""

    def __init__(self, config: Config, routes: list[Route], store: Store) -> None:
        self.limits = config.limits
        self.store = store
        self._routes = [r for r in routes if r.has_access_rules]
        self._policies: dict[tuple[str, str, str], Policy] = {}
        self._ignored: set[tuple[str, str]] = set()
        self._limited = bool(self.limits.per_user_per_minute or self.limits.per_user_per_day)
        self._admins = {  # each platform section's `admins`: not limited
            (name, str(user))
            for name in PLATFORMS
            for user in (config.platform(name) or {}).get("admins") or ()
        }

    def policy(self, thread: ThreadRef) -> Policy:
        """The rules in `thread`'s channel (remembered: the file's routes do not change)."""
        scope = (thread.source, thread.workspace, thread.channel)
        found = self._policies.get(scope)
        if found is None:
            if len(self._policies) >= _REMEMBERED:
                self._policies.clear()
            found = self._policies[scope] = policy_for(self._routes, thread)
        return found

    def channel_open(self, thread: ThreadRef) -> bool:
        """False for a channel its route's allow_channels leaves out (logged once)."""
        if not self._routes or self.policy(thread).channel_open(thread):
            return True
        where = (thread.source, f"{thread.workspace}/{thread.channel}")
        if where not in self._ignored:
            if len(self._ignored) >= _REMEMBERED:
                self._ignored.clear()
            self._ignored.add(where)
            log.info("%s: ignoring channel %s (not in its route's allow_channels)", *where)
        return False

    async def turned_away(
        self, claim: Claim, inbound: Inbound, open_conversation: OpenConversation
    ) -> bool:
        """Refuse the message if a rule or a limit says so: store it as refused, tell its
        person if they have not been told yet, close the inbox item; True when refused."""
        denied = self.policy(inbound.thread).refuses(inbound.author.id) if self._routes else None
        limited = self._limited and not self._is_admin(inbound)
        if denied is None and not limited:
            return False
        now = aware(claim.created) or utcnow()
        usage = await self._usage(claim, inbound, now)
        if denied is not None:
            told = usage.told_denied is not None
            refusal = Refusal(denied, "" if told else self.policy(inbound.thread).refused_notice)
        else:
            over = self._over_limit(usage, now)
            if over is None:
                return False
            refusal = over
        conversation = await open_conversation(inbound)
        await self._refuse(claim, conversation, inbound, refusal)
        return True

    def _is_admin(self, inbound: Inbound) -> bool:
        author = inbound.author
        return author.is_admin or (inbound.thread.source, author.id) in self._admins

    async def _usage(self, claim: Claim, inbound: Inbound, now: datetime) -> Usage:
        day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        minute_start = now - MINUTE
        params = {
            "source": inbound.thread.source,
            "author_id": inbound.author.id,
            "thread_key": inbound.thread.key,
            "before_id": claim.id,
            "day_start": day_start,
            "minute_start": minute_start,
            "since": min(day_start, minute_start),
        }

        def job(conn: Connection) -> Any:
            return conn.execute(USAGE, params).one()

        row = await self.store.read(job, quick=True)
        return Usage(
            today=int(row.today),
            last_minute=int(row.last_minute),
            oldest_in_minute=aware(row.oldest),
            told_denied=aware(row.told_denied),
            told_rate=aware(row.told_rate),
            told_budget=aware(row.told_budget),
        )

    def _over_limit(self, usage: Usage, now: datetime) -> Refusal | None:
        per_day, per_minute = self.limits.per_user_per_day, self.limits.per_user_per_minute
        if per_day is not None and usage.today >= per_day:
            midnight = now.replace(hour=0, minute=0, second=0, microsecond=0) + DAY
            text = _fill(self.limits.budget_notice, per_day, midnight)
            return Refusal(OVER_BUDGET, "" if usage.told_budget else text)
        if per_minute is not None and usage.last_minute >= per_minute:
            free_at = (usage.oldest_in_minute or now) + MINUTE
            text = _fill(self.limits.rate_notice, per_minute, free_at)
            return Refusal(OVER_RATE, "" if usage.told_rate else text)
        return None

    async def _refuse(
        self, claim: Claim, conversation: Conversation, inbound: Inbound, refusal: Refusal
    ) -> None:
        new = [NewMessage.of_user(inbound, claim.created, kind="refused")]
        if refusal.notice.strip():
            new.append(NewMessage(role="system", kind="notice", post=True, content=refusal.notice))
        try:
            await self.store.finish_turn(claim, conversation, new, refused=refusal.reason)
        except ClaimLost as exc:
            log.warning("%s; dropping this worker's refusal", exc)
            return
        log.info(
            "message %s from %s:%s refused (%s)%s",
            inbound.event_id,
            inbound.thread.source,
            inbound.author.id,
            refusal.reason,
            "" if new[1:] else "; told before, so silently",
        )


def _fill(template: str, limit: int, free_at: datetime) -> str:
    wait = max(1.0, (free_at - utcnow()).total_seconds())
    return template.format(limit=limit, wait=_span(wait), at=free_at.strftime("%H:%M UTC"))


def _span(seconds: float) -> str:
    """A wait as people say it: "40 seconds", "3 minutes", "5 hours 20 minutes"."""
    if seconds <= 90:
        return _count(math.ceil(seconds), "second")
    minutes = math.ceil(seconds / 60)
    if minutes < 60:
        return _count(minutes, "minute")
    hours, minutes = divmod(minutes, 60)
    return _count(hours, "hour") + (f" {_count(minutes, 'minute')}" if minutes else "")


def _count(n: int, unit: str) -> str:
    return f"{n} {unit}" if n == 1 else f"{n} {unit}s"
