"""The bridge: accepts messages, runs agent turns, and hands replies to the adapters.

    adapter ─submit()─▶ inbox ─claim─▶ turn (route, open, respond, tools) ─▶ messages + outbox
                                                                               │
    adapter ◀──────────────────────────── post() ◀──────── claim ◀─────────────┘

Each arrow that crosses the database is a transaction, so a crash anywhere leaves work that
the next start picks up. Turns run one at a time per thread, in arrival order, and up to
`bridge.max_turns` at once across threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any, Protocol, cast

from core.access import Gate
from core.agents.base import AgentResponse, AgentService, StreamingService
from core.breaker import Admission, Breaker, Keeper
from core.config import Config
from core.errors import (
    AgentServiceError,
    AgentUnavailable,
    MessageRejected,
    PlatformRejected,
    PlatformRetryable,
)
from core.logs import bind_trace
from core.metrics import Metrics
from core.model import Conversation, Inbound, Reply, ReplyKind, ThreadRef, ToolCall, Turn
from core.outage import StoreOutage, store_unavailable
from core.routing import Router
from core.search import made_storable
from core.store import Claim, ClaimLost, NewMessage, Store
from core.tools import NoTools, ToolRunner

log = logging.getLogger(__name__)


class ChannelAdapter(Protocol):
    """A platform (or the web chat, or the terminal) the bridge serves."""

    source: str
    working_every_s: float | None  # how often to renew the "working" sign; None: once

    async def start(self, bridge: Bridge) -> None:
        """Connect and begin handing messages to `bridge.submit`."""
        ...

    async def stop(self) -> None:
        """Stop taking messages and disconnect."""
        ...

    async def post(self, reply: Reply) -> list[str]:
        """Post a reply in its thread; return the platform's message ids."""
        ...

    async def show_working(self, thread: ThreadRef) -> None:
        """Show that the agent is working on the thread (typing, a status line)."""
        ...


class DraftingAdapter(ChannelAdapter, Protocol):
    """A channel that can show an answer while it is being written (a streaming agent): `draft`
    shows the text so far in the thread, and the next `post` there turns the draft into the
    answer instead of posting it again."""

    async def draft(self, thread: ThreadRef, text: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Submitted:
    """What `submit` did with a message."""

    event_id: str
    duplicate: bool
    ignored: bool = False  # its channel is not in its route's allow_channels; not kept


class Bridge:
    """The core: owns the workers that turn inbox items into stored, posted replies."""

    def __init__(
        self,
        config: Config,
        store: Store,
        router: Router,
        services: dict[str, AgentService],
        tools: ToolRunner | None = None,
    ) -> None:
        self.config = config
        self.settings = config.bridge
        self.store = store
        self.router = router
        self.services = services
        self.tools = tools or NoTools()
        self.keeper = Keeper(store, self.settings, services)
        self.gate = Gate(config, router.file_routes(), store)
        self.breakers: dict[str, Breaker] = self.keeper.breakers  # agent -> its circuit breaker
        self.adapters: dict[str, ChannelAdapter] = {}
        self._turns: dict[int, asyncio.Task[None]] = {}
        self._posts: dict[int, asyncio.Task[None]] = {}
        self._tokens: dict[str, dict[str, int]] = {"inbox": {}, "outbox": {}}
        self._inbox_wake = asyncio.Event()
        self._outbox_wake = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = False
        self.listeners: list[Callable[[str, str], Awaitable[None]]] = []
        self.metrics = Metrics()  # counted here, scraped at /metrics
        self.outage = StoreOutage(log)  # the loops' store failures, said in a few lines

    # -- lifecycle ---------------------------------------------------------------------------

    def add_adapter(self, adapter: ChannelAdapter) -> None:
        self.adapters[adapter.source] = adapter

    async def start(self) -> None:
        """Pick up work a crash left behind, then run the inbox and outbox loops."""
        sources = list(self.adapters)
        if self.store.is_sqlite:
            handed_back = await self.store.release_stale(sources)
            if handed_back:
                log.info("picked up %d unfinished item(s) from before the restart", handed_back)
        self._loops = [
            asyncio.create_task(self._inbox_loop(), name="bridge-inbox"),
            asyncio.create_task(self._outbox_loop(), name="bridge-outbox"),
            asyncio.create_task(self._renew_loop(), name="bridge-leases"),
        ]

    async def stop(self, deadline_s: float = 10.0) -> None:
        """Stop claiming; let in-flight turns and posts finish within the deadline."""
        self._stopping = True
        self.keeper.stop()
        self._inbox_wake.set()
        self._outbox_wake.set()
        running = [*self._turns.values(), *self._posts.values()]
        if running:
            log.info("waiting up to %.0fs for %d turn(s) and post(s)", deadline_s, len(running))
            _, late = await asyncio.wait(running, timeout=deadline_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.gather(*late, return_exceptions=True)
                for name, tokens in self._tokens.items():
                    await self.store.release(name, list(tokens))
                log.warning("handed back %d unfinished item(s) for the next start", len(late))
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)

    # -- intake ------------------------------------------------------------------------------

    def check(self, text: str) -> None:
        """Raise MessageRejected when a message must not go to the agent."""
        if not text.strip():
            raise MessageRejected("The message is empty: there is nothing to send to the agent.")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise MessageRejected("The message has characters that are not valid text.") from None
        limit = self.settings.max_message_chars
        if len(text) > limit:
            raise MessageRejected(
                f"Your message is {len(text):,} characters long; the limit is {limit:,}. "
                "Please shorten it or send it in parts."
            )

    async def submit(self, inbound: Inbound) -> Submitted:
        """Keep a message for its turn and return at once; duplicates stop here."""
        bind_trace(inbound.event_id)
        if not self.gate.channel_open(inbound.thread):
            return Submitted(inbound.event_id, duplicate=False, ignored=True)
        self.check(inbound.text)
        inbound = _storable(inbound)
        intake = await self.store.add_inbound(inbound, lease_s=self._room(self._turns))
        added = intake.added
        self.metrics.accepted(inbound, duplicate=not added)
        if added:
            await self.keeper.accepted(inbound.event_id, inbound.thread.key)
            await self._emit(inbound.thread.key, "accepted")
        if intake.claim is not None:
            self._start("inbox", intake.claim, self._run_turn)
        elif added:
            self._inbox_wake.set()
        return Submitted(inbound.event_id, duplicate=not added)

    async def notify(self, thread: ThreadRef, text: str) -> None:
        """Post a notice in a thread without asking the agent (refusals, help); none in a
        channel the routes' allow_channels leave out."""
        if not self.gate.channel_open(thread):
            return
        await self.store.queue_reply(thread, {"text": text, "kind": "notice"})
        self._outbox_wake.set()

    async def new_conversation(self, thread: ThreadRef) -> str | None:
        """End the thread's conversation; its next message starts a fresh one."""
        return await self.store.end_thread(thread.key)

    async def _emit(self, thread_key: str, what: str) -> None:
        for listener in self.listeners:
            try:
                await listener(thread_key, what)
            except Exception:  # a listener must never break the bridge
                log.exception("bridge listener failed")

    # -- turns -------------------------------------------------------------------------------

    async def _inbox_loop(self) -> None:
        await self._claim_loop(
            "inbox",
            self._inbox_wake,
            self._turns,
            self._run_turn,
            self.store.claim_inbox,
            self.settings.max_turns,
        )

    async def _outbox_loop(self) -> None:
        await self._claim_loop(
            "outbox",
            self._outbox_wake,
            self._posts,
            self._post,
            self.store.claim_outbox,
            self.settings.max_turns,
        )

    async def _claim_loop(
        self,
        name: str,
        wake: asyncio.Event,
        running: dict[int, asyncio.Task[None]],
        work: Callable[[Claim], Awaitable[None]],
        claim: Callable[[list[str], int, float], Awaitable[list[Claim]]],
        bound: int,
    ) -> None:
        batch = 200
        while not self._stopping:
            wake.clear()
            free = min(batch, bound - len(running))
            try:
                claims = await claim(list(self.adapters), free, self.settings.lease_s)
            except Exception as exc:
                self.outage.failed(f"claiming {name} work", exc)
                claims = []
                await asyncio.sleep(self.settings.poll_s)
            else:
                if free > 0:  # (with no room, the store was not asked)
                    self.outage.ok()
            for item in claims:
                self._start(name, item, work)
            if claims and len(claims) == free:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.settings.poll_s)

    def _start(self, name: str, item: Claim, work: Callable[[Claim], Awaitable[None]]) -> None:
        """Run a claimed item; its lease is renewed until it is done."""
        self._tokens[name][item.token] = self._tokens[name].get(item.token, 0) + 1
        running = self._turns if name == "inbox" else self._posts
        running[item.id] = asyncio.create_task(
            self._guard(name, item, work), name=f"{name}-{item.id}"
        )

    def _room(self, running: dict[int, asyncio.Task[None]]) -> float | None:
        """The lease to take new work with at once, or None when this process is full (the
        work then waits in the store for the claim loops, here or in another instance)."""
        if self._stopping or len(running) >= self.settings.max_turns:
            return None
        return self.settings.lease_s

    async def _guard(
        self, name: str, item: Claim, work: Callable[[Claim], Awaitable[None]]
    ) -> None:
        bind_trace(item.payload.get("event_id") or item.payload.get("reply_to"))
        try:
            await work(item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if store_unavailable(exc):  # said once by `outage`; its lease lapses meanwhile
                self.outage.failed(f"{name} item {item.id}", exc)
                log.info("%s item %d: the store is unavailable; it will be retried", name, item.id)
            else:
                log.exception("%s item %d: unexpected failure; it will be retried", name, item.id)
        finally:
            running = self._turns if name == "inbox" else self._posts
            was_full = len(running) >= self.settings.max_turns
            running.pop(item.id, None)
            left = self._tokens[name].get(item.token, 0) - 1
            if left <= 0:
                self._tokens[name].pop(item.token, None)
            else:
                self._tokens[name][item.token] = left
            # A thread's next item is handed on by whoever finishes the one before (the store
            # does it with the finish); the loop is needed only when a full process has room.
            if was_full:
                (self._inbox_wake if name == "inbox" else self._outbox_wake).set()

    async def _renew_loop(self) -> None:
        every = self.settings.lease_s / 3
        while True:
            await asyncio.sleep(every)
            for name, tokens in self._tokens.items():
                if not tokens:
                    continue
                try:
                    await self.store.renew(name, list(tokens), self.settings.lease_s)
                except Exception as exc:
                    self.outage.failed(f"renewing {name} leases", exc)
                else:
                    self.outage.ok()

    async def _run_turn(self, claim: Claim) -> None:
        inbound = Inbound.from_json(claim.payload)
        if await self.gate.turned_away(claim, inbound, self._open):  # core/access.py
            self._outbox_wake.set()  # its notice, and the thread's next message, are queued
            self._inbox_wake.set()
            await self._emit(inbound.thread.key, "turn")
            return
        started = time.monotonic()
        stop_working = self._working_after(inbound.thread)
        user = NewMessage.of_user(inbound, claim.created)
        conversation: Conversation | None = None
        try:
            conversation, fresh = await self._conversation(inbound)
            if claim.attempts > self.settings.max_attempts:
                raise AgentServiceError(f"gave up after {claim.attempts - 1} interrupted tries")
            service = self.services.get(conversation.agent)
            if service is None:
                raise AgentServiceError(f"agent {conversation.agent!r} is not configured any more")
            admission = await self.keeper.admit(claim, conversation, user)
            produced = None
            if admission is not None:  # None: kept until the agent is back (core/breaker.py)
                produced = await self._ask(
                    admission, claim, service, conversation, inbound, fresh=fresh
                )
            if produced is not None:
                await self._store_answer(claim, conversation, [user, *produced])
                self.metrics.turn_answered(conversation.agent, started)
            else:  # kept: the keeper queued its notice for the outbox loop
                self._outbox_wake.set()
        except ClaimLost as exc:
            log.warning("%s; dropping this worker's result", exc)
        except Exception as exc:
            if conversation is None or store_unavailable(exc):
                # The store failed, not the agent: no failure notice (it could not be written,
                # or worse, be written later beside an answer that exists). The lease lapses
                # and the turn is retried once the store is back.
                raise
            if isinstance(exc, AgentServiceError):
                log.warning("turn %s failed: %s", inbound.event_id, exc)
            else:
                log.exception("turn %s failed unexpectedly", inbound.event_id)
            notice = NewMessage(
                role="system", kind="notice", post=True, content=self.settings.failure_notice
            )
            reason = str(exc) if isinstance(exc, AgentServiceError) else f"internal error: {exc!r}"
            await self._finish(claim, conversation, [user, notice], failed=reason)
            self.metrics.turn_failed(conversation.agent, exc, started)
        finally:
            stop_working()
        # An answered or failed turn's replies went to a worker with the turn (`_finish`).
        await self._emit(inbound.thread.key, "turn")

    async def _finish(
        self, claim: Claim, conversation: Conversation, new: list[NewMessage], **how: Any
    ) -> None:
        """Store the turn; its first reply is posted at once, and the thread's next message
        (if one waits) taken at once, not after a trip through the claim loops."""
        handoff = await self.store.finish_turn(
            claim, conversation, new, lease_s=self._room(self._posts), **how
        )
        for item in handoff.posts:
            self._start("outbox", item, self._post)
        if handoff.next_turn is not None:
            self._start("inbox", handoff.next_turn, self._run_turn)

    async def _store_answer(
        self, claim: Claim, conversation: Conversation, new: list[NewMessage]
    ) -> None:
        """Store an answered turn, waiting out a short store outage (`_until_stored`).

        The answer exists only in memory here, so a short outage costs a delay, not a second
        call to the agent. Past `lease_s` the lease lapses and the turn is retried when the
        store is back, so the agent is asked again (the one cost of a long outage). A late
        result that meets a new owner is dropped by `finish_turn`'s claim check (ClaimLost).
        """
        event_id = claim.payload.get("event_id")
        await self._until_stored(
            f"the answer to {event_id}",
            lambda: self._finish(
                claim,
                conversation,
                new,
                remote_id=conversation.remote_id,
                state=conversation.state,
            ),
        )

    async def _until_stored(self, what: str, store: Callable[[], Awaitable[None]]) -> None:
        """Run `store`; while the store is unavailable, try again with backoff for up to
        `lease_s` (after that another worker may hold the item, so the error goes up)."""
        deadline = time.monotonic() + self.settings.lease_s
        for attempt in itertools.count():
            try:
                await store()
            except Exception as exc:
                delay = min(0.2 * 2**attempt, 5.0) * random.uniform(0.5, 1)
                if not store_unavailable(exc) or time.monotonic() + delay > deadline:
                    raise
                self.outage.failed(f"storing {what}", exc)
                if attempt == 0:
                    log.info("%s is done; storing it once the store is back", what)
                await asyncio.sleep(delay)
            else:
                self.outage.ok()
                return

    async def _ask(
        self,
        admission: Admission,
        claim: Claim,
        service: AgentService,
        conversation: Conversation,
        inbound: Inbound,
        *,
        fresh: bool = False,
    ) -> list[NewMessage] | None:
        """Open the conversation at the service if need be and converse, reporting the outcome
        to the agent's breaker; None when the agent is down and the message was kept."""
        try:
            if service.stateful and not conversation.remote_id:
                conversation.remote_id = await service.open(conversation)
                if conversation.remote_id:
                    await self.store.save_remote(conversation)
            produced = await self._converse(service, conversation, inbound, fresh=fresh)
            admission.answered()
            return produced
        except AgentUnavailable as exc:
            if await self.keeper.unavailable(claim, conversation, admission, exc):
                return None
            raise
        except AgentServiceError:
            admission.answered()  # a refusal is still an answer: the service is up
            raise
        finally:
            admission.close()

    async def _open(self, inbound: Inbound) -> Conversation:
        conversation, _ = await self._conversation(inbound)
        return conversation

    async def _conversation(self, inbound: Inbound) -> tuple[Conversation, bool]:
        """The thread's conversation, and whether it was opened just now (so it has no
        history to read: only this thread's turns add to it, and they run one at a time)."""
        existing = await self.store.conversation_for_thread(inbound.thread.key)
        if existing is not None:
            return existing, False
        decision = await self.router.agent_for(inbound.thread)
        # Written with the turn's first write (its finish, mostly): one commit less.
        conversation = await self.store.open_conversation(
            inbound.thread, decision.agent, inbound.data, inbound.author.id or None, with_turn=True
        )
        if decision.route is not None:
            conversation.situation = decision.route.situation
        log.info(
            "thread %s: new conversation %s with agent %s (%s)",
            inbound.thread.key,
            conversation.id,
            decision.agent,
            decision.why,
        )
        return conversation, True

    async def _converse(
        self,
        service: AgentService,
        conversation: Conversation,
        inbound: Inbound,
        *,
        fresh: bool = False,
    ) -> list[NewMessage]:
        """Ask the agent, running the tool calls it makes, until it answers with content."""
        history: list[Turn] = []
        if not service.stateful and not fresh:
            memory = self.config.agent_configs[conversation.agent].memory
            history = await self._history(conversation.id, memory)
        new = [
            Turn(
                role="user",
                content=inbound.text,
                name=inbound.author.name or None,
                author_id=inbound.author.id,
            )
        ]
        produced: list[NewMessage] = []
        steps = 0
        while True:
            response = await self._respond(service, conversation, history, new, inbound.thread)
            if response.remote_id:
                conversation.remote_id = response.remote_id
            if response.state is not None:
                conversation.state = response.state
            for turn in response.turns:
                produced.append(
                    _stored(
                        turn, post=turn.role == "agent" and not turn.hidden and bool(turn.content)
                    )
                )
            if not response.tool_calls:
                return produced
            steps += 1
            if steps > self.settings.max_tool_steps:
                produced.append(
                    NewMessage(
                        role="system",
                        kind="notice",
                        post=True,
                        content=f"The agent stopped after {steps - 1} tool steps with no answer.",
                    )
                )
                return produced
            results = [
                await self._run_tool(conversation.agent, call) for call in response.tool_calls
            ]
            for result in results:
                produced.append(_stored(result, post=False))
            history = [*history, *new, *response.turns]
            new = results

    async def _respond(
        self,
        service: AgentService,
        conversation: Conversation,
        history: list[Turn],
        new: list[Turn],
        thread: ThreadRef,
    ) -> AgentResponse:
        """One call to the agent; a streaming one shows its text in the thread as it grows,
        at most once every `draft_every_s`."""
        adapter = self.adapters.get(thread.source)
        if not (
            getattr(service, "streaming", False)
            and hasattr(service, "stream")
            and hasattr(adapter, "draft")
        ):
            return await service.respond(conversation, history, new)
        streaming = cast(StreamingService, service)
        drafting = cast(DraftingAdapter, adapter)
        shown, at, every = "", 0.0, self.settings.draft_every_s
        async with aclosing(streaming.stream(conversation, history, new)) as events:
            async for event in events:
                if event.response is not None:
                    return event.response
                now = time.monotonic()
                if event.text.strip() and event.text != shown and now - at >= every:
                    shown, at = event.text, now
                    try:
                        await drafting.draft(thread, event.text)
                    except Exception as exc:  # a draft is a courtesy; the answer still comes
                        log.debug("draft in %s failed: %s", thread.key, exc)
        raise AgentUnavailable(f"agent {conversation.agent!r}: the stream ended without an answer")

    async def _run_tool(self, agent: str, call: ToolCall) -> Turn:
        try:
            result = await self.tools.run(agent, call)
        except Exception as exc:  # a broken tool is a result the agent can read, not a crash
            log.exception("tool %s failed", call.name)
            result = f'{{"error": "tool {call.name} failed: {type(exc).__name__}"}}'
        return Turn(role="tool", content=result, name=call.name, tool_call_id=call.id)

    async def _history(self, conversation_id: str, memory: int) -> list[Turn]:
        rows = await self.store.history(conversation_id, limit=memory)
        return [_turn(row) for row in rows if row.kind not in ("notice", "refused")]

    def _working_after(self, thread: ThreadRef) -> Callable[[], None]:
        """Show that the agent works on the thread once the turn has taken `working_after_s`
        (a quick answer needs no "working…": it would only flash before the answer replaces
        it); the function returned stops it. A timer, not a task, until then: most turns
        never get there."""
        adapter = self.adapters.get(thread.source)
        if adapter is None:
            return lambda: None
        started: list[asyncio.Task[None]] = []

        def start() -> None:
            started.append(asyncio.create_task(self._show_working(adapter, thread)))

        timer = asyncio.get_running_loop().call_later(self.settings.working_after_s, start)

        def stop() -> None:
            timer.cancel()
            for task in started:
                task.cancel()

        return stop

    async def _show_working(self, adapter: ChannelAdapter, thread: ThreadRef) -> None:
        while True:
            try:
                await adapter.show_working(thread)
            except Exception as exc:  # showing work is a courtesy; never fail a turn for it
                log.debug("show_working on %s failed: %s", thread.key, exc)
            if adapter.working_every_s is None:
                return
            await asyncio.sleep(adapter.working_every_s)

    # -- posting -----------------------------------------------------------------------------

    async def _post(self, claim: Claim) -> None:
        thread = ThreadRef.parse(claim.thread_key)
        adapter = self.adapters[thread.source]
        payload = claim.payload
        kind: ReplyKind = "notice" if payload.get("kind") == "notice" else "answer"
        reply = Reply(
            thread=thread,
            text=str(payload.get("text", "")),
            kind=kind,
            reply_to=payload.get("reply_to"),
            posted=tuple(payload.get("posted") or ()),
            key=str(claim.id),
            retry=claim.attempts > 1,
        )
        try:
            ids = await adapter.post(reply)
        except PlatformRejected as exc:
            log.error("%s refused a reply in %s for good: %s", thread.source, thread.key, exc)
            await self._close_post(claim, sent=False, error=str(exc))
            self.metrics.post_failed(thread.source)
            return
        except (PlatformRetryable, Exception) as exc:
            if claim.attempts > self.settings.post_retries:
                log.error(
                    "giving up posting to %s after %d attempts: %s", thread.key, claim.attempts, exc
                )
                await self._close_post(claim, sent=False, error=str(exc))
                self.metrics.post_failed(thread.source)
                return
            hint = exc.retry_after if isinstance(exc, PlatformRetryable) else None
            delay = (
                hint
                if hint is not None
                else min(60.0, 2.0**claim.attempts) * random.uniform(0.5, 1)
            )
            log.warning("posting to %s failed (%s); retry in %.1fs", thread.key, exc, delay)
            progress = None
            if isinstance(exc, PlatformRetryable) and exc.posted:
                progress = {**payload, "posted": [*reply.posted, *exc.posted]}
            await self.store.retry_outbox_later(claim, delay, str(exc), progress)
            self.metrics.post_retried(thread.source)
            return
        await self._close_post(claim, sent=True, platform_ids=[*reply.posted, *ids])
        self.metrics.reply_posted(thread.source, kind)
        await self._emit(thread.key, "posted")

    async def _close_post(self, claim: Claim, **how: Any) -> None:
        """Mark a reply posted or failed; the thread's next reply, if one waits, goes now. A
        post that went out is recorded through a short store outage rather than posted again."""

        async def close() -> None:
            following = await self.store.finish_outbox(
                claim, lease_s=self._room(self._posts), **how
            )
            if following is not None:
                self._start("outbox", following, self._post)

        await self._until_stored(f"reply {claim.id}", close)


def _storable(inbound: Inbound) -> Inbound:
    """The message with a NUL or lone surrogate a platform let through in its text, author
    or data replaced (PostgreSQL refuses them), so that storing it cannot fail."""
    author = replace(
        inbound.author,
        id=made_storable(inbound.author.id),
        name=made_storable(inbound.author.name),
    )
    return replace(
        inbound,
        author=author,
        text=made_storable(inbound.text),
        data=made_storable(inbound.data),
    )


def _stored(turn: Turn, *, post: bool) -> NewMessage:
    calls = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in turn.tool_calls]
    return NewMessage(
        role=turn.role,
        content=made_storable(turn.content),  # an agent's NUL would fail the turn's write
        name=turn.name,
        tool_calls=made_storable(calls) or None,
        tool_call_id=turn.tool_call_id,
        post=post,
        kind="hidden" if turn.hidden else "message",
    )


def _turn(row: Any) -> Turn:
    calls = [ToolCall(c["id"], c["name"], c["arguments"]) for c in (row.tool_calls or [])]
    return Turn(
        role=row.role,
        content=row.content,
        name=row.name,
        tool_calls=calls,
        tool_call_id=row.tool_call_id,
        author_id=row.author_id,
        created=row.created,
        hidden=row.kind == "hidden",
    )
