"""What an admin changes — routes and conversation metadata — the same from the API, the CLI
and the pages: validated once, logged by the store, and passed on to the agent services that
keep a copy (a sessions agent's situation, an Engage conversation's data and source)."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from core.agents import build_service
from core.agents.base import AgentService
from core.config import Config
from core.errors import AgentServiceError
from core.model import Conversation, ThreadRef
from core.routing import Route, RouteError, Router, check_route, check_scope
from core.search import storable
from core.store import RouteChange, Store

SOURCE_LABEL = re.compile(r"[A-Za-z0-9_.-]{1,32}")
MAX_DATA_KEYS = 100
MAX_KEY = 200
PUSHES_AT_ONCE = 8


class AdminError(Exception):
    """A change refused or failed; `status` is the HTTP status the API answers with."""

    status = 422


class NotFound(AdminError):
    status = 404


class ServiceFailed(AdminError):
    """The agent service that keeps a copy refused or did not answer; nothing was changed."""

    status = 502


@runtime_checkable
class TakesSituation(Protocol):
    """A service whose open conversations can be given a new situation (sessions)."""

    def situation_for(self, conversation: Conversation) -> str | None: ...

    async def update_situation(self, remote_id: str, situation: str) -> None: ...


@runtime_checkable
class TakesMetadata(Protocol):
    """A service that keeps the conversation's data and source (engage-conversations)."""

    async def update_metadata(
        self, remote_id: str, *, data: dict[str, Any] | None, source: str | None
    ) -> None: ...


@dataclass(slots=True)
class RouteOutcome:
    """A route change, and what it did to the open conversations of its scope."""

    change: RouteChange
    situations_updated: int = 0
    situation_failures: list[str] = field(default_factory=list)


class Admin:
    """The admin's changes over one store and router.

    `services` are the running app's clients; without them (the CLI), a client is built from
    the config when one is needed, and `aclose` closes it.
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        router: Router,
        services: Mapping[str, AgentService] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.router = router
        self._given = services
        self._built: dict[str, AgentService] = {}

    def service(self, agent: str) -> AgentService | None:
        if self._given is not None:
            return self._given.get(agent)
        if agent not in self._built:
            config = self.config.agent_configs.get(agent)
            if config is None:
                return None
            self._built[agent] = build_service(agent, config)
        return self._built[agent]

    async def aclose(self) -> None:
        for service in self._built.values():
            await service.aclose()
        self._built.clear()

    # -- routes ---------------------------------------------------------------------------

    async def set_route(
        self,
        source: str,
        workspace: str | None,
        channel: str | None,
        agent: str,
        *,
        situation: str | None = None,
        move_open: bool = False,
        by: str,
    ) -> RouteOutcome:
        """Route a scope to `agent` at run time (see `Store.set_route`); open sessions of the
        scope that keep this route's agent get its new situation."""
        workspace, channel = workspace or None, channel or None
        try:
            check_route(self.config, source, workspace, channel, agent, situation)
        except RouteError as exc:
            raise AdminError(str(exc)) from None
        check_who(by)
        spare = [(r.workspace, r.channel) for r in self.router.file_routes() if r.source == source]
        change = await self.store.set_route(
            source,
            workspace,
            channel,
            agent,
            situation=situation,
            set_by=by,
            move_open=move_open,
            spare=spare,
        )
        await self.router.reload()
        outcome = RouteOutcome(change)
        if change.old_agent is None or change.old_situation != change.new_situation:
            await self._push_situation(outcome)
        return outcome

    async def unset_route(
        self, source: str, workspace: str | None, channel: str | None, *, by: str
    ) -> RouteOutcome:
        """Remove a scope's run-time route; NotFound when it has none."""
        workspace, channel = workspace or None, channel or None
        try:
            check_scope(source, workspace, channel)
        except RouteError as exc:
            raise AdminError(str(exc)) from None
        check_who(by)
        change = await self.store.unset_route(source, workspace, channel, set_by=by)
        if change is None:
            scope = Route(source, workspace, channel, "-", "config").label
            in_file = any(
                r.scope == (source, workspace, channel) for r in self.router.file_routes()
            )
            why = "; its route is in the config file: change it there" if in_file else ""
            raise NotFound(f"no run-time route for {scope}{why}")
        await self.router.reload()
        outcome = RouteOutcome(change)
        await self._push_situation(outcome)
        return outcome

    async def _push_situation(self, outcome: RouteOutcome) -> None:
        """Give the scope's open sessions of the route's agent the situation they would get
        now: the route's that governs them (the changed one, or after an unset the less
        specific one that applies again), else the agent's own (`situation_for` decides).
        Threads under a more specific route are not touched.
        """
        change = outcome.change
        changed = Route(change.source, change.workspace, change.channel, "-", "admin")
        agent = change.new_agent or change.old_agent
        found = await self.store.open_conversations(
            change.source, change.workspace, change.channel, agent
        )
        work: list[tuple[TakesSituation, Conversation, str]] = []
        for conversation in found:
            service = self.service(conversation.agent)
            if not conversation.remote_id or not isinstance(service, TakesSituation):
                continue
            decision = await self.router.agent_for(ThreadRef.parse(conversation.thread_key))
            governing = decision.route
            if governing is not None and governing.rank()[:2] > changed.rank()[:2]:
                continue
            same_agent = governing is not None and governing.agent == conversation.agent
            conversation.situation = governing.situation if governing and same_agent else None
            situation = service.situation_for(conversation)
            if situation is not None:
                work.append((service, conversation, situation))
        gate = asyncio.Semaphore(PUSHES_AT_ONCE)

        async def push(service: TakesSituation, conversation: Conversation, text: str) -> None:
            assert conversation.remote_id is not None
            async with gate:
                try:
                    await service.update_situation(conversation.remote_id, text)
                    outcome.situations_updated += 1
                except AgentServiceError as exc:
                    outcome.situation_failures.append(f"conversation {conversation.id}: {exc}")

        await asyncio.gather(*(push(*item) for item in work))

    # -- conversations ----------------------------------------------------------------------

    async def update_conversation(
        self,
        conversation_id: str,
        *,
        data: Mapping[str, Any] | None = None,
        source: str | None = None,
    ) -> tuple[Conversation, bool]:
        """Merge `data` (None values remove keys) and/or set `source`; for a service that keeps
        them (engage-conversations) the change goes there first, and nothing changes here
        if it fails. The conversation after, and whether the service was updated."""
        check_metadata(data, source)
        if not storable(conversation_id):
            raise NotFound(f"no conversation {conversation_id!r}")
        conversation = await self.store.get_conversation(conversation_id)
        if conversation is None:
            raise NotFound(f"no conversation {conversation_id!r}")
        service = self.service(conversation.agent)
        mirrored = False
        if conversation.remote_id and isinstance(service, TakesMetadata):
            merged = None
            if data is not None:
                merged = {**conversation.data, **data}
                merged = {k: v for k, v in merged.items() if v is not None}
            try:
                await service.update_metadata(conversation.remote_id, data=merged, source=source)
            except AgentServiceError as exc:
                raise ServiceFailed(
                    f"agent {conversation.agent!r} did not take the change ({exc}); "
                    "nothing was changed"
                ) from None
            mirrored = True
        updated = await self.store.update_conversation(conversation_id, data=data, source=source)
        if updated is None:
            raise NotFound(f"no conversation {conversation_id!r}")
        return updated, mirrored


def check_metadata(data: Mapping[str, Any] | None, source: str | None) -> None:
    """Raise AdminError for an update that is empty or could not be kept."""
    if data is None and source is None:
        raise AdminError("nothing to change: give data and/or source")
    if source is not None and not SOURCE_LABEL.fullmatch(source):
        raise AdminError(f"source {source!r}: 1-32 letters, digits or . _ -")
    if data is not None:
        if len(data) > MAX_DATA_KEYS:
            raise AdminError(f"data: at most {MAX_DATA_KEYS} keys at once")
        for key in data:
            if not key or len(key) > MAX_KEY:
                raise AdminError(f"data: a key must be 1-{MAX_KEY} characters")
        _check_json("data", data)


def _check_json(where: str, value: Any) -> None:
    """What every database keeps in JSON: no NUL character, no NaN or infinity."""
    if isinstance(value, str):
        if not storable(value):
            raise AdminError(f"{where}: contains a NUL character or invalid Unicode")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise AdminError(f"{where}: {value} is not a JSON number")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check_json(where, key)
            _check_json(f"{where}.{key}", item)
    elif isinstance(value, list):
        for item in value:
            _check_json(where, item)


def check_who(by: str) -> None:
    if not by or len(by) > MAX_KEY or not storable(by):
        raise AdminError(f"who made the change: 1-{MAX_KEY} characters of valid text")


def data_updates(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` items (the CLI's `--data`) as an update: `KEY=` removes the key."""
    update: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AdminError(f"--data {item!r}: write KEY=VALUE (KEY= removes the key)")
        update[key] = value if value else None
    return update
