"""A circuit breaker per agent, and what the bridge does with messages while one is open.

    closed ──N failed turns in a row──▶ open ──cool-down──▶ half_open ──probe answered──▶ closed
                                          ▲                     │
                                          └────probe failed─────┘

A failed turn is one whose agent call raised AgentUnavailable after the client's own retries
(core.agents.base: timeouts, refused connections, 5xx, a 429 asking for too long a wait, a
body that is not JSON); any answer, a refusal included, shows the service is up. While a
breaker is open its agent is not called: each new message gets one notice that it is kept,
and its inbox item is handed back until the next probe. In half_open one turn is let through
as the probe; the turns that come meanwhile wait for its outcome, holding their claims, so the
kept messages are answered as soon as it succeeds — in arrival order per thread, because a
kept item stays unfinished and holds back its thread's later messages.

Each process keeps its own breakers (a restart starts closed): a kept message carries its mark
in the inbox, so it is never noticed twice and never failed for one more failure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from core.config import BridgeConfig
from core.errors import AgentServiceError, AgentUnavailable
from core.model import Conversation
from core.store import Claim, NewMessage, Store
from core.tables import utcnow

log = logging.getLogger(__name__)

State = Literal["closed", "open", "half_open"]
Verdict = Literal["call", "probe", "wait", "keep"]

KEPT = "kept"  # the inbox payload key that marks a message kept (and noticed)

KEPT_NOTICE = {
    "answer": (
        "The agent is unavailable right now; your message is kept and will be answered when "
        "it is back."
    ),
    "ask_resend": (
        "The agent is unavailable right now; your message is kept, and when the agent is back "
        "you will be asked to send it again."
    ),
}


class Breaker:
    """The circuit breaker of one agent: whether its turns may call it now.

    `clock` is monotonic seconds (tests pass a fake). Not thread-safe: one event loop owns it.
    """

    def __init__(
        self,
        agent: str,
        failures: int,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.agent = agent
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.answered = False  # the agent has answered since this process started
        self._clock = clock
        self._failed = 0
        self._opened_at: float | None = None
        self._open_for = cooldown_s
        self._probing = False
        self._settled = asyncio.Event()  # set when a probe ends or the breaker closes

    @property
    def state(self) -> State:
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at < self._open_for:
            return "open"
        return "half_open"

    def retry_in(self) -> float:
        """Seconds until a probe may go (0 unless open)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self._open_for - self._clock())

    def admit(self) -> Verdict:
        """May a turn call the agent: `call`, `probe` (call, and report back), `wait` for the
        probe in flight, or `keep` the message (open)?"""
        state = self.state
        if state == "closed":
            return "call"
        if state == "open":
            return "keep"
        if self._probing:
            return "wait"
        self._probing = True
        self._settled.clear()
        log.info("agent %s: circuit half-open; one turn probes the service", self.agent)
        return "probe"

    def success(self, probe: bool = False) -> None:
        """The agent answered: close."""
        self.answered = True
        self._failed = 0
        if self._opened_at is not None:
            self._opened_at = None
            log.warning("agent %s: circuit closed; the agent answers again", self.agent)
        if probe:
            self._probing = False
        self._settled.set()

    def failure(self, probe: bool = False, retry_after: float | None = None) -> None:
        """A turn failed with the agent unavailable: count it, or reopen after a probe.

        When this opens the breaker, a `Retry-After` longer than the cool-down is honoured.
        """
        if probe:
            self._probing = False
            self._open("the probe failed", retry_after)
            return
        if self._opened_at is not None:
            return  # open already; a call that started before says nothing new
        self._failed += 1
        if self._failed >= self.failures:
            self._open(f"{self._failed} failed turns in a row", retry_after)

    def abandon(self, probe: bool) -> None:
        """A probe ended without an outcome (cancelled, crashed): let another one go."""
        if probe and self._probing:
            self._probing = False
            self._settled.set()

    async def settled(self) -> None:
        """Wait until the probe in flight ends (or the breaker closes)."""
        await self._settled.wait()

    def wake(self) -> None:
        """Wake the turns waiting in `settled` (a probe may still be in flight)."""
        self._settled.set()

    def _open(self, why: str, retry_after: float | None) -> None:
        self._opened_at = self._clock()
        self._open_for = max(self.cooldown_s, retry_after or 0.0)
        self._settled.set()
        log.warning(
            "agent %s: circuit open (%s); messages are kept, next probe in %.1fs",
            self.agent,
            why,
            self._open_for,
        )


@dataclass(slots=True)
class Admission:
    """Leave for one turn to call its agent; report how it went exactly once."""

    breaker: Breaker
    probe: bool
    _done: bool = False

    def answered(self) -> None:
        if not self._done:
            self._done = True
            self.breaker.success(self.probe)

    def unavailable(self, retry_after: float | None = None) -> None:
        if not self._done:
            self._done = True
            self.breaker.failure(self.probe, retry_after)

    def close(self) -> None:
        """Called last: a turn that never reported lets the next probe go."""
        if not self._done:
            self._done = True
            self.breaker.abandon(self.probe)


class Keeper:
    """The bridge's side of the breakers: admit turns, keep messages, tell people."""

    def __init__(
        self,
        store: Store,
        settings: BridgeConfig,
        agents: Iterable[str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.settings = settings
        self.breakers = {
            name: Breaker(name, settings.breaker_failures, settings.breaker_cooldown_s, clock)
            for name in agents
        }
        self.kept_notice = settings.kept_notice or KEPT_NOTICE[settings.on_recovery]
        self.stopping = False

    async def admit(
        self, claim: Claim, conversation: Conversation, user: NewMessage
    ) -> Admission | None:
        """Leave to call the agent, or None: the message was kept for later (or, in
        `ask_resend` mode, its person asked to send it again)."""
        breaker = self.breakers[conversation.agent]
        kept = KEPT in claim.payload
        while True:
            verdict = breaker.admit()
            if verdict == "keep":
                await self.keep(claim, conversation, "the agent's circuit is open")
                return None
            if verdict == "probe":
                return Admission(breaker, probe=True)
            if verdict == "call":
                if kept and breaker.answered and self.settings.on_recovery == "ask_resend":
                    await self._ask_resend(claim, conversation, user)
                    return None
                return Admission(breaker, probe=False)
            if self.stopping:  # do not hold up the shutdown: wait in the inbox instead
                await self.keep(claim, conversation, "the agent was being probed at shutdown")
                return None
            if not kept:  # tell them now, not after the probe
                self._check_age(claim, "the agent is being probed")
                await self.store.keep_inbound(
                    str(claim.payload["event_id"]), conversation, self._notice()
                )
                kept = True
            await breaker.settled()

    def stop(self) -> None:
        """The bridge is stopping: turns waiting for a probe hand their messages back."""
        self.stopping = True
        for breaker in self.breakers.values():
            breaker.wake()

    async def unavailable(
        self, claim: Claim, conversation: Conversation, admission: Admission, exc: AgentUnavailable
    ) -> bool:
        """Count a failed call; True when the message was kept rather than failed: its agent
        is known to be down now, or the message was kept before."""
        admission.unavailable(exc.retry_after)
        if admission.breaker.state == "closed" and KEPT not in claim.payload:
            return False
        await self.keep(claim, conversation, str(exc))
        return True

    async def keep(self, claim: Claim, conversation: Conversation, reason: str) -> None:
        """Hand the item back until the next probe, telling its person once; past the maximum
        age, raise AgentServiceError instead (the turn fails with the usual notice)."""
        age = self._check_age(claim, reason)
        breaker = self.breakers[conversation.agent]
        left = self.settings.keep_max_age_s - age  # > 0: _check_age let it through
        delay = min(max(breaker.retry_in(), self.settings.poll_s), left)
        await self.store.keep_inbound(
            str(claim.payload["event_id"]),
            conversation,
            self._notice(),
            claim=claim,
            delay_s=delay,
            reason=f"kept: {reason}",
        )
        log.info("message %s kept for %.1fs: %s", claim.payload.get("event_id"), delay, reason)

    async def accepted(self, event_id: str, thread_key: str) -> None:
        """A message was accepted: while an agent is down (or being probed), tell its person
        at once if it is for that agent — a message behind a kept one in its thread is not
        taken until that one is done (keeping that one tells the others too, but only later)."""
        if all(b.state == "closed" for b in self.breakers.values()):
            return
        try:
            conversation = await self.store.conversation_for_thread(thread_key)
            breaker = self.breakers.get(conversation.agent) if conversation else None
            if conversation is not None and breaker is not None and breaker.state != "closed":
                await self.store.keep_inbound(event_id, conversation, self._notice())
        except Exception:  # the message is safe in the inbox; its turn will tell them
            log.exception("telling %s that message %s is kept failed", thread_key, event_id)

    def _notice(self) -> NewMessage:
        return NewMessage(role="system", kind="notice", post=True, content=self.kept_notice)

    def _check_age(self, claim: Claim, reason: str) -> float:
        created = claim.created or utcnow()
        age = (utcnow() - created).total_seconds()
        if age >= self.settings.keep_max_age_s:
            raise AgentServiceError(
                f"kept {_span(age)} while the agent was unavailable ({reason}); gave up"
            )
        return age

    async def _ask_resend(self, claim: Claim, conversation: Conversation, user: NewMessage) -> None:
        notice = NewMessage(
            role="system", kind="notice", post=True, content=self.settings.resend_notice
        )
        await self.store.finish_turn(claim, conversation, [user, notice])
        log.info("message %s: asked its person to send it again", claim.payload.get("event_id"))


def _span(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds:.0f} s"
