"""Which agent serves a thread: the most specific route wins.

Tiers, most specific first: channel, workspace, source, then `default_agent`. At the same
scope a run-time route (set by an admin, kept in the store) overrides the config file's.
A thread keeps the agent it started with; routing is asked only when a conversation opens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from core.config import SOURCES, Config, RouteConfig
from core.model import ThreadRef
from core.search import storable
from core.store import Store, aware

TIERS = ("default", "source", "workspace", "channel")
NEEDS_WORKSPACE = ("slack", "discord")  # their channel ids live inside a team / guild
MAX_SCOPE = 200
MAX_SITUATION = 20_000


class RouteError(ValueError):
    """A route that cannot be set: unknown source or agent, a scope that can never match."""


@dataclass(frozen=True, slots=True)
class Route:
    """One routing rule; None in workspace or channel means any."""

    source: str
    workspace: str | None
    channel: str | None
    agent: str
    origin: str  # "config" | "admin"
    situation: str | None = None
    respond: str | None = None
    set_by: str | None = None
    set_at: datetime | None = None  # admin routes: when it was last set
    # Access rules (config file routes only; core/access.py applies them). None: not set.
    allow_users: tuple[str, ...] | None = None
    deny_users: tuple[str, ...] | None = None
    allow_channels: tuple[str, ...] | None = None
    refused_notice: str | None = None

    @property
    def has_access_rules(self) -> bool:
        return any(
            v is not None
            for v in (self.allow_users, self.deny_users, self.allow_channels, self.refused_notice)
        )

    @property
    def scope(self) -> tuple[str, str | None, str | None]:
        return (self.source, self.workspace, self.channel)

    @property
    def label(self) -> str:
        """`source/workspace/channel`, `*` for any."""
        return "/".join((self.source, self.workspace or "*", self.channel or "*"))

    @property
    def tier(self) -> str:
        if self.channel:
            return "channel"
        if self.workspace:
            return "workspace"
        return "source"

    def matches(self, thread: ThreadRef) -> bool:
        return (
            self.source == thread.source
            and (self.workspace is None or self.workspace == thread.workspace)
            and (self.channel is None or self.channel == thread.channel)
        )

    def rank(self) -> tuple[int, int, int]:
        # tier first; a channel route that names its workspace beats one that does not;
        # an admin's route beats the file's at the same scope.
        return (
            TIERS.index(self.tier),
            1 if self.workspace else 0,
            1 if self.origin == "admin" else 0,
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """The agent for a thread and the route that chose it (None: the default agent)."""

    agent: str
    route: Route | None

    @property
    def why(self) -> str:
        if self.route is None:
            return "no route matches; default_agent"
        r = self.route
        return f"{r.tier} route {r.label} ({r.origin})"


@dataclass(frozen=True, slots=True)
class ExplainStep:
    """One line of `routes explain`: a tier, the route there that matches the thread (None:
    none does), and whether it is the one that decides. The default step's `route` is None and
    its `agent` the default agent."""

    tier: str  # "channel" | "workspace" | "source" | "default"
    route: Route | None
    chosen: bool
    agent: str | None = None
    note: str = ""  # why it does or does not decide


class Router:
    """Answers `agent_for(thread)` from the config's routes and the admins' ones."""

    cache_s = 1.0  # admin routes set by another process show up within this long

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self._file_routes = [_from_config(r) for r in config.routes]
        self._admin_routes: list[Route] = []
        self._loaded_at = 0.0

    async def routes(self) -> list[Route]:
        """Every route, the file's and the admins', most specific first."""
        if time.monotonic() - self._loaded_at > self.cache_s:
            await self.reload()
        return sorted([*self._file_routes, *self._admin_routes], key=Route.rank, reverse=True)

    async def reload(self) -> None:
        rows = await self.store.list_routes()
        self._admin_routes = [_from_row(row) for row in rows]
        self._loaded_at = time.monotonic()

    def file_routes(self) -> list[Route]:
        """The config file's routes, as written."""
        return list(self._file_routes)

    async def overridden(self) -> set[Route]:
        """The config file's routes an admin's route replaces (the same scope)."""
        admin = {r.scope for r in await self.routes() if r.origin == "admin"}
        return {r for r in self._file_routes if r.scope in admin}

    async def agent_for(self, thread: ThreadRef) -> Decision:
        """The agent a new conversation in `thread` gets."""
        for route in await self.routes():
            if route.matches(thread):
                return Decision(route.agent, route)
        return Decision(self.config.default_agent, None)

    async def explain(self, thread: ThreadRef) -> list[ExplainStep]:
        """How `agent_for(thread)` decides: each tier's matching routes, most specific tier
        first, then the default; exactly one step is `chosen`."""
        ordered = await self.routes()
        winner = next((r for r in ordered if r.matches(thread)), None)
        steps = []
        for tier in ("channel", "workspace", "source"):
            matching = [r for r in ordered if r.tier == tier and r.matches(thread)]
            if not matching:
                steps.append(ExplainStep(tier, None, False, note="no route matches"))
            for route in matching:
                steps.append(
                    ExplainStep(tier, route, route is winner, route.agent, _note(route, winner))
                )
        chosen = winner is None
        note = "no route matches: the default agent" if chosen else "a route matches"
        steps.append(ExplainStep("default", None, chosen, self.config.default_agent, note))
        return steps


def _note(route: Route, winner: Route | None) -> str:
    if route is winner:
        return "the most specific match"
    assert winner is not None
    if route.scope == winner.scope:
        return "replaced by the admin's route for the same scope"
    if route.tier == winner.tier:
        return "a route naming the workspace is more specific"
    return f"the {winner.tier} route is more specific"


def check_route(
    config: Config,
    source: str,
    workspace: str | None,
    channel: str | None,
    agent: str,
    situation: str | None = None,
) -> None:
    """Raise RouteError when a run-time route could not work (the rules `config check` applies
    to the file's routes)."""
    if source not in SOURCES:
        raise RouteError(f"unknown source {source!r}; use one of: {', '.join(SOURCES)}")
    if agent not in config.agent_configs:
        known = ", ".join(sorted(config.agent_configs)) or "(none)"
        raise RouteError(f"unknown agent {agent!r}; agents: {known}")
    check_scope(source, workspace, channel)
    if situation is not None and len(situation) > MAX_SITUATION:
        raise RouteError(f"situation is over {MAX_SITUATION} characters")
    if situation is not None and not storable(situation):
        raise RouteError("situation contains a NUL character or invalid Unicode")


def check_scope(source: str, workspace: str | None, channel: str | None) -> None:
    """Raise RouteError for a scope no thread could ever be in."""
    if source not in SOURCES:
        raise RouteError(f"unknown source {source!r}; use one of: {', '.join(SOURCES)}")
    for name, value in (("workspace", workspace), ("channel", channel)):
        if value is not None and (
            not value.strip()
            or "/" in value
            or not storable(value)
            or len(value) > MAX_SCOPE
            or value != value.strip()
        ):
            raise RouteError(
                f"{name} {value!r}: an id of 1-{MAX_SCOPE} characters without '/' or spaces "
                "at its ends"
            )
    if channel and not workspace and source in NEEDS_WORKSPACE:
        what = "team id (T…)" if source == "slack" else "guild id"
        raise RouteError(f"a {source} channel route needs its workspace: give the {what}")


def parse_thread(text: str) -> ThreadRef:
    """A thread to explain: `source:workspace/channel/thread`; the thread (and the channel)
    may be left out, as routing never looks at them. ValueError on anything else."""
    source, sep, rest = text.strip().partition(":")
    parts = rest.split("/", 2) if rest else []
    if not sep or source not in SOURCES or not parts or not all(parts) or not storable(rest):
        raise ValueError(
            f"not a thread: {text!r} (write source:workspace/channel/thread, "
            f"e.g. slack:T0123/C0456/1700000000.000100; sources: {', '.join(SOURCES)})"
        )
    parts += ["-"] * (3 - len(parts))
    return ThreadRef(source, parts[0], parts[1], parts[2])


def _from_config(r: RouteConfig) -> Route:
    def ids(values: list[str] | None) -> tuple[str, ...] | None:
        return tuple(values) if values is not None else None

    return Route(
        r.source,
        r.workspace,
        r.channel,
        r.agent,
        "config",
        r.situation,
        r.respond,
        allow_users=ids(r.allow_users),
        deny_users=ids(r.deny_users),
        allow_channels=ids(r.allow_channels),
        refused_notice=r.refused_notice,
    )


def _from_row(row: Any) -> Route:
    return Route(
        source=row.source,
        workspace=row.workspace or None,
        channel=row.channel or None,
        agent=row.agent,
        origin="admin",
        situation=row.situation,
        respond=row.respond,
        set_by=row.set_by,
        set_at=aware(row.updated),
    )
