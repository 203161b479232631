"""Which agent serves a thread: the most specific route wins.

Tiers, most specific first: channel, workspace, source, then `default_agent`. At the same
scope a run-time route (set by an admin, kept in the store) overrides the config file's.
A thread keeps the agent it started with; routing is asked only when a conversation opens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from core.config import Config
from core.model import ThreadRef
from core.store import Store

TIERS = ("default", "source", "workspace", "channel")


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
        scope = "/".join(p for p in (r.source, r.workspace or "*", r.channel or "*"))
        return f"{r.tier} route {scope} ({r.origin})"


class Router:
    """Answers `agent_for(thread)` from the config's routes and the admins' ones."""

    cache_s = 1.0  # admin routes set by another process show up within this long

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self._file_routes = [
            Route(r.source, r.workspace, r.channel, r.agent, "config", r.situation, r.respond)
            for r in config.routes
        ]
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

    async def agent_for(self, thread: ThreadRef) -> Decision:
        """The agent a new conversation in `thread` gets."""
        for route in await self.routes():
            if route.matches(thread):
                return Decision(route.agent, route)
        return Decision(self.config.default_agent, None)


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
    )
