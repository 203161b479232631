from __future__ import annotations

from pathlib import Path

from core.config import parse_config
from core.model import ThreadRef
from core.routing import Router
from core.store import Store

CONFIG = {
    "default_agent": "demo",
    "agents": {n: {"service": "local"} for n in ("demo", "slackbot", "team", "chan", "tg")},
    "routes": [
        {"source": "slack", "agent": "slackbot"},
        {"source": "slack", "workspace": "T1", "agent": "team"},
        {"source": "slack", "workspace": "T1", "channel": "C9", "agent": "chan"},
        {"source": "telegram", "channel": "-100", "agent": "tg"},
    ],
}


async def router(tmp_path: Path) -> Router:
    store = Store(f"sqlite+aiosqlite:///{tmp_path}/r.db")
    await store.migrate()
    return Router(parse_config(CONFIG, "test.toml"), store)


async def test_most_specific_route_wins(tmp_path: Path) -> None:
    r = await router(tmp_path)
    assert (await r.agent_for(ThreadRef("slack", "T1", "C9", "1.2"))).agent == "chan"
    assert (await r.agent_for(ThreadRef("slack", "T1", "C8", "1.2"))).agent == "team"
    assert (await r.agent_for(ThreadRef("slack", "T2", "C9", "1.2"))).agent == "slackbot"
    assert (await r.agent_for(ThreadRef("discord", "G", "C", "T"))).agent == "demo"
    assert (await r.agent_for(ThreadRef("telegram", "-", "-100", "5"))).agent == "tg"
    decision = await r.agent_for(ThreadRef("web", "-", "-", "x"))
    assert decision.route is None
    assert "default_agent" in decision.why
    await r.store.close()


async def test_admin_route_overrides_the_file_at_the_same_scope(tmp_path: Path) -> None:
    r = await router(tmp_path)
    await r.store.set_route("slack", "T1", "", "demo", set_by="U1")
    await r.reload()
    decision = await r.agent_for(ThreadRef("slack", "T1", "C8", "1.2"))
    assert (decision.agent, decision.route and decision.route.origin) == ("demo", "admin")
    # a channel route from the file is still more specific than the admin's workspace route
    assert (await r.agent_for(ThreadRef("slack", "T1", "C9", "1.2"))).agent == "chan"
    assert await r.store.delete_route("slack", "T1", "")
    await r.reload()
    assert (await r.agent_for(ThreadRef("slack", "T1", "C8", "1.2"))).agent == "team"
    await r.store.close()
