"""A bridge on a real SQLite store with a recording channel, for tests of the core."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.agents import build_service
from core.bridge import Bridge
from core.config import Config, parse_config
from core.errors import PlatformError
from core.model import Author, Inbound, Reply, ThreadRef
from core.routing import Router
from core.store import Store


class RecordingChannel:
    """A channel that keeps what it is asked to post; it can be told to fail first."""

    working_every_s: float | None = None

    def __init__(self, source: str = "web") -> None:
        self.source = source
        self.posts: list[Reply] = []
        self.working: list[str] = []
        self.failures: list[PlatformError] = []
        self.changed = asyncio.Event()

    async def start(self, bridge: Bridge) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def post(self, reply: Reply) -> list[str]:
        if self.failures:
            raise self.failures.pop(0)
        self.posts.append(reply)
        self.changed.set()
        return [f"p{len(self.posts)}"]

    async def show_working(self, thread: ThreadRef) -> None:
        self.working.append(thread.key)

    def texts(self, thread: str | None = None) -> list[str]:
        return [p.text for p in self.posts if thread is None or p.thread.thread == thread]

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        async def enough() -> None:
            while len(self.posts) < count:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(enough(), timeout)


def make_config(store: Path | str, **extra: Any) -> Config:
    """A config for tests; `store` is a store URL, or a folder for a SQLite file."""
    url = store if isinstance(store, str) else f"sqlite+aiosqlite:///{store}/tb.db"
    raw: dict[str, Any] = {
        "default_agent": "demo",
        "store": {"url": url},
        "bridge": {"poll_s": 0.05, "lease_s": 5, "working_after_s": 0},
        "agents": {"demo": {"service": "local"}},
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key].update(value)
        else:
            raw[key] = value
    return parse_config(raw, "test.toml")


RUNNING: list[Bridge] = []  # stopped by the autouse fixture if a failing test leaves one


async def start_bridge(config: Config, channel: RecordingChannel) -> Bridge:
    store = Store(config.store.url)
    await store.migrate()
    services = {n: build_service(n, a) for n, a in config.agent_configs.items()}
    bridge = Bridge(config, store, Router(config, store), services)
    bridge.add_adapter(channel)
    await bridge.start()
    RUNNING.append(bridge)
    return bridge


async def stop_bridge(bridge: Bridge, deadline_s: float = 5.0) -> None:
    if bridge in RUNNING:
        RUNNING.remove(bridge)
    await bridge.stop(deadline_s)
    for service in bridge.services.values():
        await service.aclose()
    await bridge.store.close()


_counter = 0


def inbound(
    thread: str,
    text: str,
    source: str = "web",
    event: str | None = None,
    user: str = "ann",
    data: dict[str, Any] | None = None,
) -> Inbound:
    global _counter
    _counter += 1
    return Inbound(
        event_id=event or f"{source}:{thread}:{_counter}",
        thread=ThreadRef(source, "-", "-", thread),
        author=Author(user, user.title()),
        text=text,
        data=data if data is not None else {"thread_id": thread},
    )


async def eventually(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll an async or sync check until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
